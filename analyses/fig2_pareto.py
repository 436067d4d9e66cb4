"""Figure 2: Pareto plot of held-out NLL against model size in bits (MiB), every method and format.

Sizes count the quantized linears at their storage bits (codes, scales, zero points, LoRC factors) and
every other weight in fp16; the points are those of figure 1's quantization tables.
"""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from analyses.plan import Step, facts_step, quant_table_steps, run_figure_script
from analyses.session import Session, facts_store, quant_tables
from landscape import plots
from landscape.cli.errors import script_main
from landscape.store import read_store

FIGURE = "fig2_pareto"
TITLE = "Pareto: NLL against model size"


def steps(session: Session) -> list[Step]:
    model = session.profile.model
    return [*quant_table_steps(session, model), facts_step(session, model)]


def figure(session: Session) -> go.Figure:
    return plots.pareto(quant_tables(session, session.profile.model),
                        read_store(facts_store(session, session.profile.model)))


def reading(session: Session) -> str:
    return plots.reading_pareto(quant_tables(session, session.profile.model),
                                read_store(facts_store(session, session.profile.model)))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.fig2_pareto"))
