"""Figure 7: the relative basin radius R(w0) / ||w0|| and the GPTQ - QAFT gap against model size.

For each model (``ref-tiny``, the reference family ``ref-mini``, ``ref-midi``, ``ref-small`` (one recipe at
three sizes) where already built (``make size-family`` trains them; they are never trained here unless named
with ``--size-models``), and the profile's model), the headline-format quantization table (RTN, GPTQ, QAFT and
the full-precision control on the same calibration budget) and R(w0) along random directions, as in figures
1 and 4. Sequence lengths are capped at each model's context. ``--size-models`` takes any list: hub ids
(e.g. ``facebook/opt-125m facebook/opt-350m``) and local directories included.
"""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from analyses.plan import Step, basin_step, facts_step, quant_table_steps, run_figure_script
from analyses.profiles import reference_model_built
from analyses.session import Session, basin_store, facts_store, table_stores
from landscape import plots
from landscape.cli.errors import script_main
from landscape.refmodel import REF_CONFIGS
from landscape.store import StoreData, read_store

FIGURE = "fig7_model_size"
TITLE = "R(w0) and the GPTQ-QAFT gap against model size"
BUILT_HERE = ("ref-tiny",)  # reference models cheap enough to train inside `make figures` (seconds)


def models(session: Session) -> list[str]:
    """The profile's size models that are available (built, or cheap to build), then the main model."""
    profile = session.profile
    main = profile.model
    others = [m for m in profile.size_models
              if m != main and (profile.train_size_models or m in BUILT_HERE or m not in REF_CONFIGS
                                or reference_model_built(m))]
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
