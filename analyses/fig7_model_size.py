"""Figure 7: the relative basin radius R(w0) / ||w0|| and the GPTQ - QAFT gap against model size.

For each model (the reference models ``ref-tiny``, ``ref-small`` when it is already built (it is never
trained here), and the profile's model), the headline-format quantization table (RTN, GPTQ, QAFT on
the same calibration budget) and R(w0) along random directions, as in figures 1 and 4. Sequence
lengths are capped at each model's context.
"""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from analyses.plan import Step, basin_step, facts_step, quant_table_steps, run_figure_script
from analyses.profiles import reference_model_built
from analyses.session import Session, basin_store, facts_store, table_stores
from landscape import plots
from landscape.cli.errors import script_main
from landscape.store import StoreData, read_store

FIGURE = "fig7_model_size"
TITLE = "R(w0) and the GPTQ-QAFT gap against model size"
BUILT_HERE = ("ref-tiny",)  # reference models cheap enough to train inside `make figures` (seconds)


def models(session: Session) -> list[str]:
    """The profile's size models that are available (built, or cheap to build), then the main model."""
    main = session.profile.model
    others = [m for m in session.profile.size_models
              if m != main and (m in BUILT_HERE or not m.startswith("ref-") or reference_model_built(m))]
    return [*others, main]


def steps(session: Session) -> list[Step]:
    out: list[Step] = []
    for model in models(session):
        out += [*quant_table_steps(session, model), facts_step(session, model), basin_step(session, model)]
    return out


def stores(session: Session) -> list[tuple[StoreData, StoreData, StoreData]]:
    """Per model: its facts, its basin-radius store and its headline quantization table."""
    return [(read_store(facts_store(session, m)), read_store(basin_store(session, m)),
             read_store(table_stores(session, m)[0])) for m in models(session)]


def figure(session: Session) -> go.Figure:
    return plots.model_size(stores(session), session.profile.headline_format)


def reading(session: Session) -> str:
    return plots.reading_model_size(stores(session), session.profile.headline_format)


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.fig7_model_size"))
