"""Figure 4: radial NLL profiles along random filter-normalised directions, R(w0), and the displacements.

Along each random direction (unit norm, over every quantized linear) the held-out NLL is measured on a
regular grid of radii and the basin radius R(w0) (first +threshold nats) is found by bracketing and
bisection (:func:`landscape.engine.basin.basin_statistics`). The quantized models of the tables are placed at
their ``||w_q - w0||`` with their NLL on the same windows: outside the basin, yet far below the random
profile at the same distance.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python analyses/fig4_radial_profile.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import plotly.graph_objects as go

from analyses.common import (
    COSTS,
    Session,
    Step,
    eval_set,
    model_protocols,
    quant_table_steps,
    quantized_model_path,
    run_figure_script,
)
from analyses.fig1_nll_vs_bits import tables
from landscape import plots
from landscape.engine.sweep import Execution
from landscape.store import read_store

FIGURE = "fig4_radial_profile"
TITLE = "Radial NLL profile, R(w0) and the quantized displacements"


def displacements(session: Session, model: str) -> dict[str, str]:
    """Table label -> saved result, for every quantized method at every format the tables run QAFT at."""
    from landscape.quant import parse_format

    out = {}
    for protocol in model_protocols(session, model):
        if "qaft" not in protocol.methods:
            continue
        for fmt in (parse_format(f).name for f in protocol.formats):
            for method in (m for m in protocol.methods if m in plots.QUANTIZED_METHODS):
                label = f"{method} {fmt}" + (" s0" if method == "qaft" else "")
                out[label] = str(quantized_model_path(session, model, method, fmt))
    return out


def store(session: Session, model: str) -> Path:
    profile = session.profile_for(model)
    return session.store_path(model, "basin", {"basin": asdict(profile.basin), "eval_seq_len": profile.eval_seq_len,
                                               "tables": [p.to_dict() for p in model_protocols(session, model)]})


def basin_step(session: Session, model: str) -> Step:
    """R(w0) over the profile's random directions, with the radial profile and the displacement norms."""
    settings = session.profile_for(model).basin

    def run() -> None:
        from landscape.engine.basin import RadiusSearch, basin_statistics
        from landscape.engine.directions import DirectionSpec
        from landscape.engine.perturb import NLLObjective
        from landscape.weights import Base, select_layers, weights_fingerprint, weights_norm

        lm = session.model(model)
        layers = select_layers(lm.model)
        base = weights_fingerprint(lm.model, layers)
        specs = [DirectionSpec("random", ("*",), seed=seed, normalization="filter", base_fingerprint=base)
                 for seed in range(settings.n_directions)]
        data = eval_set(session, model, settings.segments)
        search = RadiusSearch(settings.threshold, tolerance=settings.tolerance,
                              initial_fraction=settings.initial_fraction)
        execution = Execution(store=store(session, model), resume=True, provenance={"model_info": lm.info.to_dict()},
                              progress=session.progress)
        basin_statistics(Base(lm.model, model), specs, NLLObjective(data, 4, model), data=data, search=search,
                         profile_radii=np.array(settings.profile_fractions) * weights_norm(lm.model, layers),
                         quant_results=displacements(session, model), execution=execution)

    profile = session.profile_for(model)
    evaluations = settings.n_directions * (len(settings.profile_fractions) + 5 + np.log2(1 / settings.tolerance))
    estimate = evaluations * COSTS.forward(model, settings.segments * profile.eval_seq_len)
    return Step(f"{model}: basin radius along {settings.n_directions} random directions "
                f"({len(settings.profile_fractions)} profile radii + bisection)", store(session, model),
                float(estimate), run, model)


def steps(session: Session) -> list[Step]:
    model = session.profile.model
    return [*quant_table_steps(session, model), basin_step(session, model)]


def figure(session: Session) -> go.Figure:
    return plots.radial_profiles(read_store(store(session, session.profile.model)), tables(session))


def reading(session: Session) -> str:
    return plots.reading_radial(read_store(store(session, session.profile.model)), tables(session))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
