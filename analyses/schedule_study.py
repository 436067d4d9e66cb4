"""Does learning-rate decay make a model fragile to quantization? (issue #22, item 5)

    python -m analyses.schedule_study            # make schedule: ref-mini (cosine) against ref-mini-const

Recent work (arXiv 2510.06213) reports that the decay of the learning rate, more than the number of training
tokens, drives post-training quantization error. The toolkit trains one recipe twice on the same tokens in
the same order: ``ref-mini`` decays its learning rate (cosine to 10 % of the peak after the warm-up) and
``ref-mini-const`` holds it at the peak. For each model (``--size-models`` takes any list) this measures, on
figure 7's protocol: NLL(w0); RTN's, GPTQ's and QAFT's NLL at the headline format and at the predictor study's
formats (the same tables, reused); R(w0) along random filter-normalised directions; and the top Hessian
eigenvalues and trace of the held-out NLL at w0 (:data:`CURVATURE`).

Writes ``schedule_study.html`` and ``schedule_study.md`` into ``--out``, from the stores under ``--data``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import plotly.graph_objects as go

from analyses.plan import COSTS, Step, basin_step, facts_step, quant_table_steps, run_figure_script
from analyses.predictor_study import formats
from analyses.session import Session, basin_store, eval_set, predictor_protocol, table_store, table_stores
from landscape import plots
from landscape.cli.errors import script_main
from landscape.curvature import Curvature, read_curvature
from landscape.plots.predictor import MODEL_COLORS
from landscape.refmodel import REF_CONFIGS
from landscape.store import provenance, read_store, run_tasks

FIGURE = "schedule_study"
TITLE = "Learning-rate decay and quantization"
PAIR = ("ref-mini", "ref-mini-const")
METHODS = ("rtn", "gptq", "qaft")
CURVATURE = {"max_segments": 8, "k_top": 3, "lanczos_steps": 40, "trace_matvecs": 12}
"""The Hessian at w0: on the first ``max_segments`` held-out windows of the tables' length (quick profile: 8 x
256 tokens, 2,040 scored: from about a thousand tokens the trace settles on SmolLM2, README "How much of that
survives more data"), ``k_top`` eigenvalues from ``lanczos_steps`` Lanczos steps, Hutch++ with
``trace_matvecs`` products."""


def curvature_sample(session: Session, model: str) -> tuple[int, int]:
    """``(segments, seq_len)`` of the Hessian's sample for ``model``."""
    profile = session.profile_for(model)
    return min(CURVATURE["max_segments"], profile.eval_segments), profile.eval_seq_len


def models(session: Session) -> list[str]:
    """``--size-models`` where given, else :data:`PAIR`."""
    return list(session.profile.size_models) if session.profile.train_size_models else list(PAIR)


def curvature_store(session: Session, model: str):
    segments, seq_len = curvature_sample(session, model)
    return session.store_path(model, "curvature-w0", {**CURVATURE, "segments": segments, "seq_len": seq_len})


def curvature_step(session: Session, model: str) -> Step:
    segments, seq_len = curvature_sample(session, model)

    def run() -> None:
        lm = session.model(model)
        data = eval_set(session, model, segments, seq_len=seq_len)
        curvature = Curvature(lm.model, data, batch_size=1, progress=session.progress)
        tasks = {"spectrum": lambda: curvature.spectrum(CURVATURE["k_top"], 1,
                                                        lanczos_steps=CURVATURE["lanczos_steps"],
                                                        return_eigenvectors=False).to_record(
                                                            include_eigenvectors=False),
                 "trace": lambda: curvature.trace(CURVATURE["trace_matvecs"]).to_record()}
        run_tasks(curvature_store(session, model),
                  provenance("curvature", lm.base, data, model_info=lm.info.to_dict(), settings=CURVATURE,
                             tasks=list(tasks)), tasks)

    products = CURVATURE["lanczos_steps"] + CURVATURE["trace_matvecs"]
    return Step(f"{model}: Hessian at w0 on {segments} x {seq_len} tokens (top {CURVATURE['k_top']}, trace)",
                curvature_store(session, model), products * COSTS.hvp(model, segments * seq_len), run, model)


def steps(session: Session) -> list[Step]:
    out: list[Step] = []
    for model in models(session):
        out += [*quant_table_steps(session, model),
                *quant_table_steps(session, model, [predictor_protocol(session, model)]),
                facts_step(session, model), basin_step(session, model), curvature_step(session, model)]
    return out


def schedule_of(model: str) -> str:
    cfg = REF_CONFIGS.get(model)
    if cfg is None:
        return "not trained here"
    if cfg.min_lr_fraction >= 1:
        return f"constant {cfg.lr:g} after {cfg.warmup_steps} warm-up steps"
    return f"cosine {cfg.lr:g} → {cfg.min_lr_fraction * cfg.lr:g} after {cfg.warmup_steps} warm-up steps"


def summary(session: Session) -> list[dict[str, Any]]:
    """Per model, from its stores: schedule, NLL(w0), R(w0) (absolute and over ||w0||), top eigenvalues and
    trace at w0, what the full-precision control gains, and per format the NLL of RTN, GPTQ and QAFT minus
    NLL(w0) (nats/token on the tables' held-out windows, each with its paired 95 % bootstrap interval)."""
    out = []
    for model in models(session):
        rows: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        tables = (table_store(session, predictor_protocol(session, model)), table_stores(session, model)[0])
        for path in tables:
            table = read_store(path)
            corpus = plots.in_domain(table)
            for row in plots.quant_rows(table):
                key = (row["method"], "" if row["method"] in ("fp32", "fp-finetune") else row["format"] or "")
                rows.setdefault(key, (row, corpus))
        fp32, corpus = rows[("fp32", "")]
        stats = plots.basin_summary(read_store(basin_store(session, model)))
        hessian = read_curvature(read_store(curvature_store(session, model)))
        relative = stats.quantiles((0.5,), relative=True)[0.5]
        out.append({
            "model": model, "schedule": schedule_of(model), "nll_w0": float(fp32["nll"][corpus]),
            "relative_radius": relative, "radius": stats.median, "weights_norm": stats.weights_norm,
            "top": [float(v) for v in hessian.spectrum.top.eigenvalues],
            "top_converged": int(np.sum(hessian.spectrum.top.converged)), "trace": hessian.trace.value,
            "trace_stderr": hessian.trace.stderr,
            "control": plots.gap_interval(rows[("fp-finetune", "")][0], fp32, corpus),
            "cost": {fmt: {m: plots.gap_interval(rows[(m, fmt)][0], fp32, corpus) for m in METHODS}
                     for fmt in formats(session)},
            "convention": hessian.provenance["nll_convention"]})
    return out


def figure(session: Session) -> go.Figure:
    points = summary(session)
    fmts = list(formats(session))
    fig = go.Figure()
    for k, p in enumerate(points):
        for method, dash in (("rtn", "solid"), ("gptq", "dash")):
            fig.add_trace(go.Scatter(
                x=fmts, y=[p["cost"][f][method].value for f in fmts], mode="lines+markers",
                error_y={"type": "data", "array": [p["cost"][f][method].high - p["cost"][f][method].value
                                                   for f in fmts],
                         "arrayminus": [p["cost"][f][method].value - p["cost"][f][method].low for f in fmts]},
                name=f"{p['model']}: {plots.METHOD_LABELS[method]}",
                line={"color": MODEL_COLORS[k % len(MODEL_COLORS)], "dash": dash},
                hovertemplate=f"{p['model']} {method} %{{x}}: +%{{y:.4f}} nats<extra></extra>"))
    fig.update_xaxes(title_text="format")
    fig.update_yaxes(title_text="NLL − NLL(w0) (nats/token, held-out wiki; 95 % paired bootstrap)")
    fig.update_layout(title="Quantization cost of a model trained with and without learning-rate decay",
                      template="plotly_white")
    return plots.add_caption(fig, [
        "Each model's held-out NLL after RTN (solid) and GPTQ (dashed) minus its own NLL(w0), at the "
        "headline format and the predictor study's formats; one calibration set for every method and model "
        "(figure 7's protocol). " + " ".join(
            f"{p['model']} ({p['schedule']}): NLL(w0) {p['nll_w0']:.3f}, R(w0) {p['radius']:.4g} = "
            f"{100 * p['relative_radius']:.3g} % of ‖w0‖, top eigenvalue {p['top'][0]:.3g}, trace "
            f"{p['trace']:.4g} ± {p['trace_stderr']:.2g}, the full-precision control "
            f"{p['control'].value:+.4f} nats." for p in points),
        f"Curvature: the Hessian of the token-mean NLL at w0 over the quantized linears, on each model's "
        f"first held-out windows ({CURVATURE['lanczos_steps']} Lanczos steps, Hutch++ with "
        f"{CURVATURE['trace_matvecs']} products). "
        + plots.nll_convention_sentence(points[0]["convention"])])


def _interval(i) -> str:
    return f"{i.value:+.4f} [{i.low:+.4f}, {i.high:+.4f}]"


def reading(session: Session) -> str:
    points = summary(session)
    fmt = session.profile.headline_format
    return "; ".join(f"{p['model']} ({p['schedule']}): NLL(w0) {p['nll_w0']:.3f}, RTN {fmt} "
                     f"{_interval(p['cost'][fmt]['rtn'])}, GPTQ {_interval(p['cost'][fmt]['gptq'])} nats, "
                     f"R(w0)/‖w0‖ {100 * p['relative_radius']:.3g} %, λ1 {p['top'][0]:.3g}"
                     for p in points) + "."


def report(session: Session) -> str:
    points = summary(session)
    fmts = list(formats(session))
    lines = ["| model | schedule | NLL(w0) | R(w0) (‖w0‖) | top eigenvalues | trace | control − w0 |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        top = (", ".join(f"{v:.3g}" for v in p["top"])
               + f" ({p['top_converged']} of {len(p['top'])} converged)")
        lines.append(f"| {p['model']} | {p['schedule']} | {p['nll_w0']:.4f} | {p['radius']:.4g} "
                     f"({p['weights_norm']:.4g}; {100 * p['relative_radius']:.3g} %) | {top} | "
                     f"{p['trace']:.4g} ± {p['trace_stderr']:.2g} | {_interval(p['control'])} |")
    lines += ["", "| format | " + " | ".join(f"{p['model']}: RTN / GPTQ / QAFT − w0" for p in points) + " |",
              "|---|" + "---|" * len(points)]
    for f in fmts:
        cells = [" / ".join(_interval(p["cost"][f][m]) for m in METHODS) for p in points]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "Costs: NLL minus the same table's NLL(w0) on the same held-out windows, nats/token, "
              "paired 95 % bootstrap over windows (each table's NLL convention is in its provenance). "
              "The Hessian's sample: " + plots.nll_convention_sentence(points[0]["convention"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.schedule_study"))
