"""The predictor study (beyond the paper): every case of the GPTQ − QAFT gap against every cheap predictor.

Built from :class:`~landscape.studies.baselines.PredictorComparison` objects, which are computed from stores
only (quantization tables, basin radii, RTN features): no model is loaded here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from landscape.plots.common import add_caption
from landscape.studies.baselines import PREDICTORS, CandidateResult, PredictorComparison

PREDICTOR_LABELS = {
    "score": "‖d_RTN‖ / R(w0)",
    "relative_norm": "‖d_RTN‖ / ‖w0‖",
    "neg_sqnr": "− RTN's mean SQNR (dB)",
    "nll_w0": "NLL(w0) (nats/token)",
}
LOG_AXES = ("score", "relative_norm")  # ratios spanning decades
MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _rho(c: CandidateResult) -> str:
    r = c.rank_correlation
    return f"ρ = {r.value:+.2f} [{r.low:+.2f}, {r.high:+.2f}]"


def predictors(comparisons: Mapping[str, PredictorComparison], notes: Sequence[str] = ()) -> go.Figure:
    """One row per kind of gap (``comparisons``: e.g. ``raw`` and ``after the control``), one column per
    predictor of :data:`~landscape.studies.baselines.PREDICTORS`: every case (model × format) as a point,
    coloured by model, with Spearman's ρ and its 95 % bootstrap interval over cases in the panel's title.
    ``notes``: further caption paragraphs (the NLL convention of the tables)."""
    kinds = list(comparisons)
    names = list(PREDICTORS)
    titles = [_rho(_candidate(comparisons[kind], n)) for kind in kinds for n in names]  # the row: its y title
    fig = make_subplots(rows=len(kinds), cols=len(names), subplot_titles=titles, horizontal_spacing=0.06,
                        vertical_spacing=0.3)
    models = list(dict.fromkeys(c.model for comp in comparisons.values() for c in comp.cases))
    for row, kind in enumerate(kinds, start=1):
        cases = comparisons[kind].cases
        for col, name in enumerate(names, start=1):
            for k, model in enumerate(models):
                mine = [c for c in cases if c.model == model]
                fig.add_trace(go.Scatter(
                    x=[PREDICTORS[name](c) for c in mine], y=[c.gap for c in mine], mode="markers",
                    name=model, legendgroup=model, showlegend=row == 1 and col == 1,
                    marker={"color": MODEL_COLORS[k % len(MODEL_COLORS)], "size": 8},
                    text=[c.format for c in mine],
                    hovertemplate=f"{model} %{{text}}: {PREDICTOR_LABELS[name]} = %{{x:.4g}}, "
                                  f"gap = %{{y:+.3f}} nats<extra></extra>"), row=row, col=col)
            fig.update_xaxes(title_text=PREDICTOR_LABELS[name], row=row, col=col,
                             type="log" if name in LOG_AXES else "linear")
        fig.update_yaxes(title_text=f"GPTQ − QAFT ({kind}), nats", row=row, col=1)
    fig.update_layout(title="Which cheap quantity predicts the GPTQ − QAFT gap?", template="plotly_white",
                      width=1500)
    first = next(iter(comparisons.values()))
    fig = add_caption(fig, [
        f"{len(first.cases)} cases: {len(models)} models × "
        f"{len({c.format for c in first.cases})} formats, each one quantization table row set (RTN, GPTQ, "
        f"QAFT, and the full-precision fine-tuning control on the same calibration text). Gap: NLL(GPTQ) − "
        f"NLL(QAFT) on held-out text; after the control: minus what the control gains over w0 (the part of "
        f"QAFT's lead that is not adaptation to the calibration text). R(w0): median radius along random "
        f"filter-normalised directions where the NLL first rises by the basin threshold (figure 7's store). "
        f"SQNR: the mean over layers of 10 log10(‖w‖² / ‖w − w_RTN‖²). ρ: Spearman over cases, 95 % "
        f"bootstrap interval over cases; the tables below the figure in predictor_study.md add "
        f"leave-one-model-out, leave-one-format-out and the paired difference to the score.", *notes])
    return fig.update_layout(height=fig.layout.height + 200 * (len(kinds) - 1))


def _candidate(comparison: PredictorComparison, name: str) -> CandidateResult:
    return next(c for c in comparison.candidates if c.name == name)


def reading_predictors(comparisons: Mapping[str, PredictorComparison]) -> str:
    """Per kind of gap: the best predictor, the score's correlation and its paired difference to the best
    other one, and the weakest leave-one-model-out correlation of the score."""
    parts = []
    for kind, comp in comparisons.items():
        score = _candidate(comp, "score")
        others = [c for c in comp.candidates if c.name != "score"]
        rival = max(others, key=lambda c: c.rank_correlation.value)
        lomo = {m: v for m, v in score.leave_one_model_out.items() if math.isfinite(v)}
        worst = min(lomo, key=lomo.get) if lomo else None
        vs = rival.versus_score
        parts.append(
            f"{kind} ({len(comp.cases)} cases): best {PREDICTOR_LABELS[comp.best()]}; the score "
            f"{PREDICTOR_LABELS['score']} has {_rho(score)}, against {_rho(rival)} for "
            f"{PREDICTOR_LABELS[rival.name]} (difference {vs.value:+.2f} [{vs.low:+.2f}, {vs.high:+.2f}])"
            + (f"; without {worst} the score's ρ is {lomo[worst]:+.2f}" if worst else "")
            + _within(score))
    return "; ".join(parts) + "."


def _within(score: CandidateResult) -> str:
    """The score's Spearman inside each model (where defined): it only ranks that model's formats."""
    inside = {m: v for m, v in score.within_model.items() if math.isfinite(v)}
    if not inside:
        return ""
    return "; within each model " + ", ".join(f"{m} {v:+.2f}" for m, v in inside.items())


def predictor_cases_markdown(raw: PredictorComparison, adjusted: PredictorComparison) -> str:
    """Every case's inputs and both gaps, as a markdown table (the same cases in the same order)."""
    lines = ["| model | format | R(w0) | ‖d_RTN‖ / R | ‖d_RTN‖ / ‖w0‖ | RTN SQNR (dB) | NLL(w0) | gap | "
             "gap after control |", "|---|---|---|---|---|---|---|---|---|"]
    after = {(c.model, c.format): c.gap for c in adjusted.cases}
    nan = math.nan
    for c in raw.cases:
        relative = c.rtn_displacement_norm / c.weights_norm
        lines.append(f"| {c.model} | {c.format} | {c.basin_radius:.4g} | {c.score:.3f} | {relative:.4f} | "
                     f"{c.rtn_sqnr_db:.2f} | {c.nll_w0:.3f} | {c.gap:+.3f} | "
                     f"{after.get((c.model, c.format), nan):+.3f} |")
    return "\n".join(lines)
