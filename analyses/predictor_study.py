"""Which cheap quantity best predicts how far GPTQ falls behind QAFT? (issue #22, item 4)

    python -m analyses.predictor_study            # make predictor: the quick profile, figure 7's models

On every model of figure 7 (``ref-tiny``, the reference family where built, the profile's model;
``--size-models`` takes any list) the quantization table of RTN, GPTQ, QAFT and the full-precision control
is measured at the profile's ``predictor_formats`` (3-6 bits, per-channel, 32-wide groups, MX blocks) on
figure 7's protocol, beside figure 7's own headline-format table, its R(w0) and RTN's features (per-layer
SQNR, ``||w0||``) at every format. Each (model, format) is one case.
:func:`landscape.studies.baselines.compare_predictors` then ranks four predictors of the GPTQ − QAFT gap,
raw and after the control: the score ``||d_RTN|| / R(w0)``, ``||d_RTN|| / ||w0||``, minus RTN's mean SQNR,
and NLL(w0) (Spearman with bootstrap intervals over cases, leave-one-model-out, leave-one-format-out, and the
paired difference to the score).

Writes ``predictor_study.html`` (every case against every predictor) and ``predictor_study.md`` (the tables)
into ``--out``; every number comes from the stores under ``--data``, so a rerun measures nothing twice.
"""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from analyses import fig7_model_size as fig7
from analyses.plan import Step, quant_table_steps, run_figure_script
from analyses.session import Session, basin_store, predictor_protocol, table_store, table_stores
from landscape import plots
from landscape.cli.errors import script_main
from landscape.store import read_store
from landscape.studies.baselines import (
    PredictorComparison,
    compare_predictors,
    measure_rtn_features,
    model_cases,
    read_rtn_features,
)
from landscape.studies.predict import PredictionCase, evaluate_predictor
from landscape.studies.quant_table import read_quant_table

FIGURE = "predictor_study"
TITLE = "Predictors of the GPTQ-QAFT gap"


def formats(session: Session) -> tuple[str, ...]:
    """The headline format (figure 7's table) and the profile's predictor formats."""
    return tuple(dict.fromkeys((session.profile.headline_format, *session.profile.predictor_formats)))


def features_store(session: Session, model: str):
    return session.store_path(model, "rtn-features", {"formats": list(formats(session))})


def features_step(session: Session, model: str) -> Step:
    def run() -> None:
        lm = session.model(model)
        measure_rtn_features(lm.model, formats(session), features_store(session, model),
                             {"model": model, "model_info": lm.info.to_dict()})

    return Step(f"{model}: RTN's SQNR and norms at {len(formats(session))} formats",
                features_store(session, model), 2.0 * len(formats(session)), run, model)


def steps(session: Session) -> list[Step]:
    out = fig7.steps(session)
    for model in fig7.models(session):
        out += [*quant_table_steps(session, model, [predictor_protocol(session, model)]),
                features_step(session, model)]
    return out


def cases(session: Session, adjust_for_control: bool) -> list[PredictionCase]:
    """Every model's cases, from the stores: the predictor table first, then figure 7's headline table."""
    out = []
    for model in fig7.models(session):
        radius = plots.basin_summary(read_store(basin_store(session, model))).median
        tables = [read_quant_table(table_store(session, predictor_protocol(session, model))),
                  read_quant_table(table_stores(session, model)[0])]
        out += model_cases(tables, radius, read_rtn_features(read_store(features_store(session, model))),
                           corpus=session.profile.corpus, adjust_for_control=adjust_for_control)
    return out


def comparisons(session: Session) -> dict[str, PredictorComparison]:
    """``raw`` and ``after the control``: every predictor against the gap."""
    return {"raw": compare_predictors(cases(session, False)),
            "after the control": compare_predictors(cases(session, True))}


def convention(session: Session) -> str:
    """The NLL convention of every model's gaps (each model's tables share their evaluation windows)."""
    corpus = session.profile.corpus
    parts = []
    for model in fig7.models(session):
        table = read_quant_table(table_store(session, predictor_protocol(session, model)))
        e = table.provenance["evaluation"][corpus]
        parts.append(f"{model} {e['n_segments']} × {e['seq_len']} tokens ({e['n_scored_tokens']:,} scored)")
    return (f"NLL: token-mean nats per scored token over disjoint held-out {corpus} windows (stride = "
            f"window): " + "; ".join(parts) + ".")


def figure(session: Session) -> go.Figure:
    return plots.predictors(comparisons(session), notes=[convention(session)])


def reading(session: Session) -> str:
    return plots.reading_predictors(comparisons(session))


def report(session: Session) -> str:
    """The tables in markdown: every case, the threshold rule, the predictors raw and after the control."""
    found = comparisons(session)
    parts = [plots.predictor_cases_markdown(found["raw"], found["after the control"])]
    for kind, comparison in found.items():
        parts += [f"## The threshold rule, gaps {kind}", evaluate_predictor(comparison.cases).markdown()]
    parts += [c.markdown() for c in found.values()]
    return "\n\n".join([*parts, convention(session)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.predictor_study"))
