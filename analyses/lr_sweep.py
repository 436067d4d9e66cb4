"""QAFT learning-rate selection on the calibration budget alone (issues #4 and #11).

    python -m analyses.lr_sweep --model smollm2-135m --formats int3 int4 --out results/lr_sweep.h5
    python -m analyses.lr_sweep --model my-llama --executor slurm --jobs 6 --slurm-gpus-per-task 1

For each format (``fp32``: the full-precision control, which gets its own rate),
:func:`landscape.quant.lr_selection.select_learning_rate` splits the 128 calibration sequences
(seeded) into 112 training and 16 validation sequences, trains QAFT on the 112 with each candidate rate
(every other setting as in the quantization table: one epoch, batch 4, seed 0) and measures the token-mean
NLL of the snapped result on the 16. Held-out text is never read. Every (format, candidate) is one task of a
resumable store (a killed run resumes at the next task; ``--executor`` runs the tasks as jobs); the sweeps
are :meth:`~landscape.quant.qaft.LearningRateSweep.combined` from them and printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from analyses.session import corpus_of, load_model_of, model_options
from landscape.cli.common import (
    cluster_settings,
    computed_settings,
    executor_arguments,
    parse_shard,
    progress_argument,
)
from landscape.cli.errors import script_main
from landscape.cluster import Sweep, run_sweep, shard_report
from landscape.data import calibration_set
from landscape.quant import parse_format
from landscape.quant.lr_selection import (
    DEFAULT_VALIDATION_SEQUENCES,
    LearningRateSweepSettings,
    select_learning_rate,
)
from landscape.quant.qaft import FinetuneSettings, LearningRateSweep
from landscape.store import StoreData, StoreRecord, check_store_path, provenance, read_store, run_tasks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(p)
    p.add_argument("--formats", nargs="+", default=["int3", "int4"],
                   help="QAFT formats; 'fp32' sweeps the full-precision control (fp-finetune) instead")
    p.add_argument("--candidates", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--calib-sequences", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--validation", type=int, default=DEFAULT_VALIDATION_SEQUENCES)
    p.add_argument("--out", default="results/lr_sweep.h5", help="the store (resumed if unfinished)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="i/n: run only tasks i, i+n, ... into --out (--executor does this for you)")
    progress_argument(p)
    executor_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    # bad ones fail before loading
    formats = [f if f == "fp32" else parse_format(f).name for f in args.formats]
    if any(c <= 0 for c in args.candidates):
        p.error(f"--candidates must be learning rates > 0, got {args.candidates}")
    cluster = cluster_settings(args, p)
    out = check_store_path(args.out, resume=True)
    candidates = sorted(set(args.candidates))
    names = [task_name(fmt, lr) for fmt in formats for lr in candidates]
    if cluster.fans_out:
        sweep = Sweep.of_store("lr-sweep", "analyses.lr_sweep:main", argv, out, len(names),
                               job_flags=("--no-progress",))
        path, = run_sweep(sweep, cluster)
        report(read_store(path))
        return
    lm = load_model_of(args)
    calib = calibration_set(lm.tokenizer, args.calib_sequences, args.calib_seq_len, 0, corpus_of(args),
                            context_length=lm.info.context_length)

    def candidate(fmt: str, lr: float) -> StoreRecord:
        """One candidate's sweep (the control: the same loop with the quantizer off, its own rate)."""
        control = fmt == "fp32"
        search = LearningRateSweepSettings((lr,), n_validation=args.validation)
        part = select_learning_rate(lm.base, calib, None if control else fmt,
                                    FinetuneSettings(quantize=not control), search,
                                    progress=not args.no_progress)
        return StoreRecord(part.to_dict(), arrays={"validation_nll": np.float64(part.validation_nll[0])})

    tasks = {task_name(fmt, lr): (lambda fmt=fmt, lr=lr: candidate(fmt, lr))
             for fmt in formats for lr in candidates}
    settings = computed_settings(args, "out", "device", "dtype")
    record = provenance("lr_sweep", lm.base, calibration=calib.provenance(), settings=settings,
                        formats=formats, candidates=candidates, tasks=names)
    store, path = run_tasks(out, record, tasks, shard=args.shard)
    if args.shard != (0, 1):
        print(shard_report(path, store.done, args.shard, "tasks"))
        return
    report(store)


def task_name(fmt: str, lr: float) -> str:
    return f"{fmt}/lr{lr:g}"


def sweeps(store: StoreData) -> dict[str, LearningRateSweep]:
    """Each format's sweep, combined from its candidates' tasks."""
    prov = store.provenance
    return {fmt: LearningRateSweep.combined([
        LearningRateSweep(**json.loads(str(store.arrays[f"{task_name(fmt, lr)}/attrs"])))
        for lr in prov["candidates"]]) for fmt in prov["formats"]}


def report(store: StoreData) -> None:
    prov = store.provenance
    seq_len = prov["calibration"]["seq_len"]
    for fmt, sweep in sweeps(store).items():
        method = "fp-finetune (control)" if fmt == "fp32" else "QAFT"
        print(f"\n## {prov['model']} {fmt}: {method} lr on {len(sweep.train_sequences)} calibration "
              f"sequences, validated on {len(sweep.validation_sequences)} (token-mean NLL, {seq_len}-token "
              f"sequences; {sweep.seconds:.0f} s)\n")
        print(sweep.table())


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.lr_sweep"))
