"""Figure 5: 1-D and 2-D slices of the held-out NLL through w0 spanned by the GPTQ and QAFT displacements.

At the headline format: 1-D slices along each unit displacement ``(w_q - w0) / ||w_q - w0||`` from
``t = -0.5`` to ``1.5`` of its length (``t = 1`` is the quantized model) and along a random
filter-normalised direction over GPTQ's distances; a 2-D slice ``w0 + a u + b v`` with ``u`` along GPTQ
and ``v`` the QAFT displacement made orthogonal to it, so both endpoints lie in the plane.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from analyses.plan import COSTS, Step, quant_table_steps, run_figure_script
from analyses.session import Session, eval_set, model_protocols, quantized_model_path
from landscape import plots
from landscape.cli.errors import script_main
from landscape.engine.directions import (
    displacement_direction,
    orthogonalize,
    plane_coordinates,
    random_direction,
)
from landscape.engine.perturb import scan
from landscape.engine.sweep import Execution
from landscape.store import read_store
from landscape.weights import Base

FIGURE = "fig5_slices"
TITLE = "Slices through w0 along the GPTQ and QAFT displacements"
LINES = ("gptq", "qaft", "random")


def store(session: Session, kind: str) -> Path:
    model = session.profile.model
    return session.store_path(model, f"slice-{kind}", {
        "slices": asdict(session.profile.slices), "format": session.profile.headline_format,
        "tables": [p.to_dict() for p in model_protocols(session, model)]})


def displacement(session: Session, lm, method: str):
    """``w_q - w0`` toward the headline format's quantized model, streamed: a layer is read from the result's
    file when asked for, so only the direction a scan holds whole (:meth:`Direction.whole`) takes memory."""
    path = quantized_model_path(session, session.profile.model, method, session.profile.headline_format)
    return displacement_direction(lm.model, str(path), streamed=True)


def line_step(session: Session, kind: str) -> Step:
    """A 1-D slice along a displacement (``gptq``, ``qaft``) or a random direction over GPTQ's distances."""
    p, model = session.profile, session.profile.model
    fmt = p.headline_format
    label = "random filter-normalised direction" if kind == "random" else f"{plots.METHOD_LABELS[kind]} {fmt}"

    def run() -> None:
        lm = session.model(model)
        t = np.linspace(-0.5, 1.5, p.slices.points_1d)  # t = 0 (w0) and t = 1 (the endpoint) lie on the grid
        gptq = displacement(session, lm, "gptq")
        if kind == "random":
            direction = random_direction(lm.model, p.slices.random_seed, "filter", streamed=True)
            length, endpoint = gptq.norm(), None
        else:
            direction = gptq if kind == "gptq" else displacement(session, lm, kind)
            length = endpoint = direction.norm()
        # one whole direction beside the model (the scan holds w0 of its layers): the unit vector
        scan(Base(lm.model, model), direction.unit().whole(), t * length,
             data=eval_set(session, model, p.slices.segments), batch_size=4,
             execution=Execution(store=store(session, kind), resume=True, progress=session.progress,
                                 provenance={"model_info": lm.info.to_dict(),
                                             "slice": {"label": label, "method": kind, "format": fmt,
                                                       "endpoint": endpoint}}))

    estimate = p.slices.points_1d * COSTS.forward(model, p.slices.segments * p.eval_seq_len)
    return Step(f"{model}: 1-D slice along {label} ({p.slices.points_1d} points)", store(session, kind),
                estimate, run, model)


def plane_step(session: Session) -> Step:
    """The 2-D slice spanned by the GPTQ and QAFT displacements."""
    p, model = session.profile, session.profile.model
    n = p.slices.points_2d

    def run() -> None:
        lm = session.model(model)
        gptq, qaft = displacement(session, lm, "gptq"), displacement(session, lm, "qaft")
        # the two unit vectors are the only whole directions (the displacements are read when needed)
        u, v = gptq.unit().whole(), orthogonalize(qaft, gptq).unit().whole()
        a_qaft, b_qaft = plane_coordinates(qaft, u, v)
        a_gptq = gptq.norm()
        a_span = max(a_gptq, abs(a_qaft))
        a = np.linspace(min(0.0, a_qaft) - 0.25 * a_span, max(a_gptq, a_qaft) + 0.25 * a_span, n)
        b = np.linspace(-0.25 * b_qaft, 1.25 * b_qaft, n)
        fmt = p.headline_format
        endpoints = {f"GPTQ {fmt}": {"a": a_gptq, "b": 0.0, "method": "gptq"},
                     f"QAFT {fmt}": {"a": a_qaft, "b": b_qaft, "method": "qaft"}}
        scan(Base(lm.model, model), [u, v], [a, b], data=eval_set(session, model, p.slices.segments),
             batch_size=4,
             execution=Execution(store=store(session, "plane"), resume=True, progress=session.progress,
                                 provenance={"model_info": lm.info.to_dict(),
                                             "slice": {"format": fmt, "endpoints": endpoints}}))

    estimate = n * n * COSTS.forward(model, p.slices.segments * p.eval_seq_len)
    return Step(f"{model}: 2-D slice through w0, GPTQ and QAFT ({n} x {n} points)", store(session, "plane"),
                estimate, run, model)


def steps(session: Session) -> list[Step]:
    return [*quant_table_steps(session, session.profile.model), *(line_step(session, k) for k in LINES),
            plane_step(session)]


def stores(session: Session):
    return [read_store(store(session, k)) for k in LINES], read_store(store(session, "plane"))


def figure(session: Session) -> go.Figure:
    return plots.slices(*stores(session))


def reading(session: Session) -> str:
    return plots.reading_slices(*stores(session))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.fig5_slices"))
