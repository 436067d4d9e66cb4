"""Curvature against the tokens it is measured on: does the sample Hessian converge (issue 22, item 1)?

    python -m analyses.curvature_convergence --model smollm2-135m --budgets 256 1024 4096 \\
        --replicates 4 4 2 --direction gptq=results/gptq-int4 --direction rtn=results/rtn-int4 \\
        --out results/convergence.h5

At each token budget (held-out windows of ``--seq-len`` tokens; every budget a multiple of it) the
quantities are measured on ``--replicates`` *disjoint* groups of windows
(:class:`landscape.studies.convergence.Budgets`):

* ``spectrum/<tokens>/<r>``: the top ``--k-top`` Hessian eigenvalues by reorthogonalised Lanczos (``--lanczos-
  steps`` products, each over all the replicate's windows);
* ``trace/<tokens>/<r>``: Hutch++ with ``--trace-matvecs`` products (0: none), the same probes at every
  budget;
* ``curvature/<name>`` and ``slope/<name>``: ``u^T H u`` and ``g^T u`` (``u = d / ||d||``) along each
  ``--direction NAME=RESULT`` (a saved quantization result's displacement ``w_q - w0``) and ``--random``
  random filter-normalised directions, per window over the windows of the whole sweep; each budget's
  replicates are sums over their windows (the quantities are additive), so the directions cost one pass,
  not one per budget.

The report (:func:`landscape.studies.convergence.report`) gives, per quantity and budget, the replicates' mean
with a Student-t interval and the largest deviation of a single replicate from the largest budget's mean, the
budget from which every replicate is within ``--tolerance`` (10 %) of it, and in what share of the replicates
each direction is the flattest. One resumable store (one point per task); ``--executor slurm --jobs N`` fans
the tasks out. ``landscape spectrum --budgets`` runs the same sweep at w0 (no directions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
from landscape.data import heldout_set
from landscape.store import check_store_path, provenance, read_store, run_tasks
from landscape.studies import convergence as cv
from landscape.weights import Base


def direction_argument(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RESULT_PATH (e.g. gptq=results/gptq-int4), "
                                         f"got {text!r}")
    return name, path


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The arguments, checked (every refusal before the model loads), with ``args.plan`` (the
    :class:`~landscape.studies.convergence.Budgets`) and ``args.sweep`` (its settings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(p)
    p.add_argument("--budgets", nargs="+", type=int, default=[256, 1024, 4096],
                   help="tokens per replicate at each budget (multiples of --seq-len; default 256 1024 4096)")
    p.add_argument("--replicates", nargs="+", type=int, default=None,
                   help="disjoint replicates: one count for every budget or one per budget (default 4 at "
                        "each budget, 2 at the largest)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k-top", type=int, default=3, help="top eigenvalues per replicate (0: no spectrum)")
    p.add_argument("--lanczos-steps", type=int, default=10)
    p.add_argument("--trace-matvecs", type=int, default=6, help="Hutch++ products per replicate (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Lanczos start vector and the probes")
    p.add_argument("--direction", type=direction_argument, action="append", default=[], metavar="NAME=RESULT",
                   help="a saved quantization result whose displacement is measured (repeatable)")
    p.add_argument("--random", type=int, default=1,
                   help="random filter-normalised directions (seeds 0..N-1; default 1)")
    p.add_argument("--tolerance", type=float, default=cv.DEFAULT_TOLERANCE)
    p.add_argument("--out", required=True)
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="i/n: run only tasks i, i+n, ... into --out (--executor does this for you)")
    progress_argument(p)
    executor_arguments(p)
    args = p.parse_args(argv)
    if args.replicates is None:
        args.replicates = [4] * (len(args.budgets) - 1) + [2]
    if len(args.replicates) not in (1, len(args.budgets)):
        p.error(f"--replicates takes one count or one per budget ({len(args.budgets)}), "
                f"got {args.replicates}")
    missing = [path for _, path in args.direction if not Path(path + ".json").exists()]
    if missing:
        p.error(f"no saved quantization results at {missing} (give the path without .safetensors/.json)")
    try:
        args.plan = cv.Budgets.from_tokens(args.budgets, args.seq_len, args.replicates)
        args.sweep = cv.SweepSettings(args.k_top, args.lanczos_steps, args.trace_matvecs, args.seed,
                                      tuple(args.direction), args.random, args.tolerance)
    except cv.ConvergenceError as err:
        p.error(str(err))
    return args, p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, parser = parse(argv)
    cluster = cluster_settings(args, parser)
    out = check_store_path(args.out, resume=True)
    if cluster.fans_out:
        sweep = Sweep.of_store("curvature-convergence", "analyses.curvature_convergence:main", argv, out,
                               len(cv.task_names(args.plan, args.sweep)), job_flags=("--no-progress",))
        path, = run_sweep(sweep, cluster)
        print(cv.report(read_store(path), args.plan, args.sweep))
        return
    lm = load_model_of(args)
    windows = heldout_set(lm.tokenizer, args.seq_len, corpus_of(args), context_length=lm.info.context_length)
    plan = cv.Budgets.from_tokens(args.budgets, args.seq_len, args.replicates, available=windows.n_segments)
    tasks = cv.sweep_tasks(lm.model, windows, plan, args.sweep, progress=not args.no_progress)
    settings = computed_settings(args, "out", "device", "dtype", "plan", "sweep")
    data = windows.subset(slice(0, plan.n_windows))
    record = provenance("curvature-convergence", Base(lm.model, args.model), data,
                        model_info=lm.info.to_dict(), settings=settings, tasks=list(tasks),
                        directions=dict(args.direction))
    store, path = run_tasks(out, record, tasks, shard=args.shard)
    if args.shard != (0, 1):
        print(shard_report(path, store.done, args.shard, "tasks"))
        return
    print(cv.report(store, plan, args.sweep))


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.curvature_convergence"))
