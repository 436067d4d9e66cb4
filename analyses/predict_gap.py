"""How well does ``||w_RTN - w0|| / R(w0)`` predict where GPTQ falls far behind QAFT? (issue #6, item 4)

    python -m analyses.predict_gap \\
        --model smollm2-135m 114.6 results/quant_table/core-*.h5 \\
        --model ref-small 34.6 results/quant_table_ref/core-*.h5 --out results/predict_gap.h5

Each ``--model NAME RADIUS STORE...`` gives a model's R(w0) (median over random filter-normalised directions,
``landscape radius`` or figure 4's store) and its quantization-table stores; every format with RTN, GPTQ and
QAFT rows becomes one case (QAFT averaged over its seeds). Prints
:func:`landscape.studies.predict.evaluate_predictor`'s table (score, measured gap, rule verdicts,
Spearman(score, gap) with a bootstrap interval over cases) and writes it to ``--out``. With ``--baselines``
each model is loaded once to measure RTN's per-layer SQNR and ``||w0||``, and the score is compared with
``||d_RTN|| / ||w0||``, RTN's SQNR and NLL(w0) as predictors of the same gaps
(:func:`landscape.studies.baselines.compare_predictors`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from landscape.cli.errors import script_main
from landscape.models import load_model
from landscape.outputs import check_output_path
from landscape.studies.baselines import compare_predictors, rtn_features, with_features
from landscape.studies.predict import cases_from_quant_table, evaluate_predictor
from landscape.studies.quant_table import read_quant_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", action="append", required=True, metavar="NAME RADIUS STORE",
                   help="a model, its R(w0) and its quant-table stores (repeat per model)")
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--adjust-for-control", action="store_true",
                   help="subtract the full-precision control's gain from each gap "
                        "(tables with fp-finetune rows)")
    p.add_argument("--gap-threshold", type=float, default=0.1,
                   help="'far behind': gap above this (nats/token)")
    p.add_argument("--baselines", action="store_true",
                   help="also compare the score with ||d_RTN||/||w0||, RTN's SQNR and NLL(w0) "
                        "(loads each model)")
    p.add_argument("--out", default=None, help="also write the evaluation to this new HDF5 store")
    args = p.parse_args(argv)
    inputs = []
    for spec in args.model:
        if len(spec) < 3:
            p.error(f"--model needs NAME RADIUS STORE..., got {spec}")
        try:
            radius = float(spec[1])
        except ValueError:
            radius = math.nan
        if not radius > 0:
            p.error(f"--model {spec[0]}: RADIUS must be R(w0) > 0, got {spec[1]!r}")
        missing = [s for s in spec[2:] if not Path(s).is_file()]
        if missing:
            p.error(f"--model {spec[0]}: no store at {missing}")
        inputs.append((spec[0], radius, spec[2:]))
    out = check_output_path(args.out) if args.out else None
    if out is not None and out.exists():
        p.error(f"--out {out} exists (choose another path or remove it)")

    cases = []
    for name, radius, stores in inputs:
        for store in stores:
            table = read_quant_table(store)
            if table.provenance["model"] != name:
                p.error(f"{store} is a table of {table.provenance['model']}, not of {name}")
            known = {(c.model, c.format) for c in cases}
            cases += [c for c in cases_from_quant_table(table, radius, corpus=args.corpus,
                                                                 adjust_for_control=args.adjust_for_control)
                      if (c.model, c.format) not in known]  # a format in two stores counts once
    evaluation = evaluate_predictor(cases, gap_threshold=args.gap_threshold)
    print(evaluation.markdown())
    if args.baselines:
        measured = []
        for name in dict.fromkeys(c.model for c in cases):
            lm = load_model(name)
            measured += [with_features(c, rtn_features(lm.base, c.format), c.nll_w0)
                         for c in cases if c.model == name]
        print("\n" + compare_predictors(measured).markdown())
    print(f"\nNLL: token-mean nats per scored token on held-out {args.corpus}, each table's own convention "
          f"(in its provenance)")
    if out is not None:
        evaluation.to_store(out)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.predict_gap"))
