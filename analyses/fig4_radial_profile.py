"""Figure 4: radial NLL profiles along random filter-normalised directions, R(w0), and the displacements.

Along each random direction (unit norm, over every quantized linear) the held-out NLL is measured on a
regular grid of radii and the basin radius R(w0) (first +threshold nats) is found by bracketing and
bisection (:func:`landscape.engine.basin.basin_statistics`). The quantized models of the tables are placed at
their ``||w_q - w0||`` with their NLL on the same windows: outside the basin, yet far below the random
profile at the same distance.
"""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from analyses.plan import Step, basin_step, quant_table_steps, run_figure_script
from analyses.session import Session, basin_store, quant_tables
from landscape import plots
from landscape.cli.errors import script_main
from landscape.store import read_store

FIGURE = "fig4_radial_profile"
TITLE = "Radial NLL profile, R(w0) and the quantized displacements"


def steps(session: Session) -> list[Step]:
    model = session.profile.model
    return [*quant_table_steps(session, model), basin_step(session, model)]


def figure(session: Session) -> go.Figure:
    return plots.radial_profiles(read_store(basin_store(session, session.profile.model)),
                                 quant_tables(session, session.profile.model))


def reading(session: Session) -> str:
    return plots.reading_radial(read_store(basin_store(session, session.profile.model)),
                                quant_tables(session, session.profile.model))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.fig4_radial_profile"))
