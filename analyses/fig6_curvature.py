"""Figure 6: the Hessian of the held-out NLL at w0 (top eigenvalues, trace, density) and the curvature
along each quantization displacement.

At w0: reorthogonalised Lanczos (top and bottom eigenvalues), a Hutch++ trace and a stochastic Lanczos
quadrature density (:mod:`landscape.curvature`). Along the path ``w0 + t d`` of each displacement ``d``
(RTN, GPTQ and QAFT at the headline format, and a random filter-normalised direction of GPTQ's length):
the Rayleigh quotient ``u^T H u``, ``u = d / ||d||``. One store, one point per task, so a killed run
resumes at the next task.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import plotly.graph_objects as go

from analyses.plan import COSTS, Step, quant_table_steps, run_figure_script
from analyses.session import Session, eval_set, model_protocols, quantized_model_path
from landscape import plots
from landscape.cli.errors import script_main
from landscape.curvature import Curvature
from landscape.engine.directions import displacement_direction, random_direction_of_length
from landscape.store import provenance, read_store, run_tasks

FIGURE = "fig6_curvature"
TITLE = "Hessian spectrum and curvature along the displacements"
DISPLACEMENTS = ("rtn", "gptq", "qaft")
PATH_METHODS = (*DISPLACEMENTS, "random")


def store(session: Session) -> Path:
    model = session.profile.model
    return session.store_path(model, "curvature", {
        "curvature": asdict(session.profile.curvature), "format": session.profile.headline_format,
        "tables": [p.to_dict() for p in model_protocols(session, model)]})


def path_label(method: str, fmt: str) -> str:
    return ("random direction (GPTQ's length)" if method == "random"
            else f"{plots.METHOD_LABELS[method]} {fmt}")


def measure(session: Session) -> None:
    p, model = session.profile, session.profile.model
    c, fmt = p.curvature, p.headline_format
    lm = session.model(model)
    data = eval_set(session, model, c.segments, seq_len=c.seq_len)
    sources = {m: str(quantized_model_path(session, model, m, fmt)) for m in DISPLACEMENTS}

    def direction(method: str):
        """The displacement ``w_q - w0``, or a random filter-normalised direction as long as GPTQ's."""
        if method != "random":  # streamed: the path's flat vector is its only copy
            return displacement_direction(lm.base, sources[method], streamed=True)
        length = displacement_direction(lm.base, sources["gptq"], streamed=True).norm()
        return random_direction_of_length(lm.base, c.random_seed, length)

    curvature = Curvature(lm.model, data, batch_size=1, progress=session.progress)
    # The Lanczos bases and the Hutch++ sketch go to files beside the store (removed after each run;
    # bit-identical results): a vector of SmolLM2's decoder weights is 0.4 GB; the process holds the one in
    # use.
    krylov_dir = store(session).parent
    tasks = {
        "spectrum": lambda: curvature.spectrum(
            c.k_top, c.k_bottom, lanczos_steps=c.lanczos_steps, return_eigenvectors=False,
            krylov_dir=krylov_dir).to_record(include_eigenvectors=False),
        "trace": lambda: curvature.trace(c.trace_matvecs, krylov_dir=krylov_dir).to_record(),
        "density": lambda: curvature.density(c.density_runs, c.density_steps,
                                             krylov_dir=krylov_dir).to_record(),
        **{f"path/{path_label(m, fmt)}": (lambda m=m: curvature.along(
            direction(m), t=c.path_t, level=c.level).to_record()) for m in PATH_METHODS},
    }
    paths = {path_label(m, fmt): {"method": m, "source": sources.get(
        m, f"random filter-normalised seed {c.random_seed}, scaled to ||w_gptq - w0||")}
             for m in PATH_METHODS}
    layout = "<task>/<array> from each result's to_record(); <task>/attrs: its JSON attributes"
    run_tasks(store(session),
              provenance("curvature", lm.base, data, model_info=lm.info.to_dict(), settings=asdict(c),
                         format=fmt, tasks=list(tasks), paths=paths, layout=layout), tasks)


def steps(session: Session) -> list[Step]:
    p, model = session.profile, session.profile.model
    c = p.curvature
    # Every product covers all the tokens (a path point: one product per segment of them).
    products = (c.lanczos_steps + 3 * (c.trace_matvecs // 3) + c.density_runs * c.density_steps
                + len(PATH_METHODS) * len(c.path_t))
    estimate = products * COSTS.hvp(model, c.segments * c.seq_len)
    return [*quant_table_steps(session, model),
            Step(f"{model}: Hessian at w0 (Lanczos {c.lanczos_steps}, trace {c.trace_matvecs}, density "
                 f"{c.density_runs}x{c.density_steps}) and along {len(PATH_METHODS)} paths", store(session),
                 estimate, lambda: measure(session), model)]


def figure(session: Session) -> go.Figure:
    return plots.curvature(read_store(store(session)))


def reading(session: Session) -> str:
    return plots.reading_curvature(read_store(store(session)))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.fig6_curvature"))
