"""The quantization results table (issues #4 and #11): every method at every format, in and out of domain.

    python -m analyses.quant_table --model smollm2-135m --out results/quant_table
    python -m analyses.quant_table --model ref-small --calib-seq-len 256 --out results/quant_table

    python -m analyses.quant_table --model smollm2-135m --executor slurm --jobs 8 --slurm-gpus-per-task 1

Runs two protocols into one directory (so they share their saved quantized models):
``core`` (RTN, GPTQ with and without act-order, QAFT with its full-precision control, GPTQ+LoRC) at the
formats where the study's effect lives, and ``wide`` (RTN and GPTQ over 8/4/3/2 bits per-channel and
4/3 bits in groups, plus W4A8). Both are resumable: rerun the same command after an interruption.
Prints each table as Markdown with the NLL convention; the stores hold every per-segment NLL sum.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analyses.session import corpus_of, load_model_of, model_options
from landscape.cli.common import (
    cluster_settings,
    executor_arguments,
    limit_arguments,
    parse_shard,
    positive_int,
    progress_argument,
    work_limits,
)
from landscape.cli.errors import script_main
from landscape.cluster import Sweep, run_sweep
from landscape.studies.quant_table import (
    Protocol,
    check_formats_fit,
    read_quant_table,
    run_quant_table,
    table_control_gaps,
    task_groups,
    variants,
)

CORE_METHODS = ("rtn", "gptq", "qaft", "fp-finetune", "gptq-noact", "gptq+lorc")
GROUP = {"smollm2-135m": 64}  # SmolLM2's hidden size 576 is not divisible by 128


def protocols(args: argparse.Namespace) -> dict[str, Protocol]:
    g = args.group_size or GROUP.get(args.model, 128)
    common = dict(model=args.model, calib_seq_len=args.calib_seq_len, eval_seq_len=args.eval_seq_len,
                  eval_segments=args.eval_segments, qaft_lr=args.qaft_lr, seeds=tuple(range(args.seeds)),
                  layer_mse_sequences=args.layer_mse_sequences, calib_corpus=corpus_of(args),
                  eval_corpora=(corpus_of(args), "sotu"))
    core_methods = tuple(args.core_methods)
    return {
        **{f"core-{f}": Protocol(**common, formats=(f,), methods=core_methods) for f in args.core_formats},
        "wide": Protocol(**common, formats=("int8", "int4", "int3", "int2", f"int4-g{g}", f"int3-g{g}"),
                         methods=("rtn", "gptq"), act_bits=((4, 8),)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(p)
    p.add_argument("--out", default="results/quant_table")
    p.add_argument("--calib-seq-len", type=positive_int, default=256)
    p.add_argument("--eval-seq-len", type=positive_int, default=256)
    p.add_argument("--eval-segments", type=positive_int, default=16)
    p.add_argument("--qaft-lr", type=float, default=3e-4)
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="seeds of QAFT and its control (>= 3 for a comparison)")
    p.add_argument("--core-formats", nargs="+", default=["int3", "int4"])
    p.add_argument("--core-methods", nargs="+", default=list(CORE_METHODS),
                   help=f"methods of the core protocols (default all: {' '.join(CORE_METHODS)})")
    p.add_argument("--layer-mse-sequences", type=positive_int, default=16,
                   help="first calibration sequences of every row's summed layer MSE (one forward pass each)")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help="group size of the wide protocol's group formats (default 64 for smollm2-135m, else "
                        "128; it must divide every layer's in_features)")
    p.add_argument("--only", nargs="+", default=None, help="run only these protocols (e.g. core-int3 wide)")
    p.add_argument("--tag", default="",
                   help="suffix of the store names (e.g. '-lr1e-3' for a variant protocol "
                        "beside the default ones, sharing their saved quantized models)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="i/n: measure only the rows of groups i, i+n, ... (a row and the rows built on its "
                        "result are one group) into <out>/<protocol>.h5.shards/ (--executor does this for "
                        "you)")
    progress_argument(p)
    executor_arguments(p)
    limit_arguments(p, "rows (quantized models measured, each a GPTQ or a training)", default=1000)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    runs = protocols(args)  # every protocol is validated before the model loads
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            p.error(f"--only {unknown}: no such protocol; choose from {sorted(runs)}")
        runs = {name: runs[name] for name in args.only}
    work_limits(args).check_points("these tables (rows: quantized models measured)",
                                   sum(len(variants(protocol)) for protocol in runs.values()))
    cluster = cluster_settings(args, p)
    out = Path(args.out)
    if cluster.fans_out:
        stores = {out / f"{name}{args.tag}.h5": len(variants(protocol)) for name, protocol in runs.items()}
        sweep = Sweep("quant-table", "analyses.quant_table:main", tuple(argv),
                      lambda i, n: ["--shard", f"{i}/{n}"], stores, out / f"quant_table{args.tag}.shards",
                      job_flags=("--no-progress",))
        paths = run_sweep(sweep, cluster)
    else:
        lm = load_model_of(args)
        check_formats_fit(lm.model, list(runs.values()))  # every table's formats, before the first table
        groups = task_groups(list(runs.values()))  # one order over every protocol: no result computed twice
        paths = [run_quant_table(protocol, out, progress=not args.no_progress, lm=lm, name=name + args.tag,
                                 shard=args.shard, groups=groups) for name, protocol in runs.items()]
        if args.shard != (0, 1):
            print(f"shard {args.shard[0]}/{args.shard[1]}: " + ", ".join(str(p) for p in paths))
            return
    for (name, _), path in zip(runs.items(), paths):
        report(name + args.tag, args.model, path)


def report(name: str, model: str, path: Path) -> None:
    """A finished table as Markdown, its NLL convention and the control-adjusted gaps."""
    table = read_quant_table(path)
    print(f"\n## {name}: {model}\n")
    print(table.markdown())
    ev = table.provenance["evaluation"]
    print("\nNLL: token-mean nats per scored token; " + "; ".join(
        f"{c}: {e['n_segments']} x {e['seq_len']} tokens, stride {e['stride']}, {e['n_scored_tokens']} "
        f"scored, data {e['data_hash']}" for c, e in ev.items()))
    # how much of QAFT's advantage over GPTQ is left after the full-precision control
    for gap in table_control_gaps(table.rows, table.provenance["protocol"]["eval_corpora"]):
        print(gap.sentence())
    if table.provenance.get("model_caveat"):
        print(f"Caveat: {table.provenance['model_caveat']}")


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.quant_table"))
