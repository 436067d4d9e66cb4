"""Figure 1: held-out NLL against bits per weight for RTN, GPTQ, GPTQ + LoRC and QAFT, with the fp32 line.

Every method quantizes the same decoder linears onto the same grid of w0 with the same calibration
sequences (:func:`landscape.studies.quant_table.run_quant_table`); NLL on in-domain (wiki) and out-of-domain
(sotu) held-out text with 95 % bootstrap intervals over segments, and the full-precision fine-tuning control.
"""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from analyses.plan import Step, quant_table_steps, run_figure_script
from analyses.session import Session, quant_tables
from landscape import plots
from landscape.cli.errors import script_main

FIGURE = "fig1_nll_vs_bits"
TITLE = "NLL against bits per weight"


def steps(session: Session) -> list[Step]:
    return quant_table_steps(session, session.profile.model)


def figure(session: Session) -> go.Figure:
    return plots.nll_vs_bits(quant_tables(session, session.profile.model))


def reading(session: Session) -> str:
    return plots.reading_nll_vs_bits(quant_tables(session, session.profile.model))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.fig1_nll_vs_bits"))
