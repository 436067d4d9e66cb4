"""``landscape spectrum``: Hessian (or Gauss-Newton) curvature of the held-out NLL at a model's weights w0.

Example::

    landscape spectrum ref-small --k 10 --k-bottom 3 --trace-matvecs 30 --density-runs 4 --out spectrum.h5
    landscape spectrum smollm2-135m --segments 2 --seq-len 128 --lanczos-steps 60 --krylov-dir /scratch \\
        --out s.h5
    landscape spectrum my-llama --density-runs 8 --executor slurm --jobs 3 --slurm-gpus-per-task 1 --out s.h5
    landscape spectrum smollm2-135m --seq-len 128 --budgets 256 1024 4096 --replicates 4 4 2 --k 3 \
        --k-bottom 0 --lanczos-steps 10 --trace-matvecs 6 --out convergence.h5

One resumable store (:func:`landscape.store.run_tasks`): the tasks ``spectrum`` (top/bottom eigenpairs with
residuals and convergence flags), ``trace`` (Hutch++) and ``density`` (stochastic Lanczos quadrature), one
point each, so a killed run resumes at the next task; ``--executor`` runs the tasks as jobs. Every setting is
checked before the model loads. ``--budgets`` makes it a convergence sweep (the top eigenvalues and the trace
at each token budget on disjoint replicates: :mod:`landscape.studies.convergence`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from landscape.cli.common import (
    Command,
    check_memory,
    cluster_settings,
    computed_settings,
    data_arguments,
    executor_arguments,
    fan_out,
    limit_arguments,
    load_with_data,
    model_argument,
    parse_shard,
    progress_argument,
    work_limits,
)
from landscape.cluster import shard_report
from landscape.curvature import Curvature, read_curvature
from landscape.store import check_store_path, provenance, read_store, run_tasks
from landscape.studies import convergence
from landscape.weights import quantizable_layers, weight_matrix


def spectrum_arguments(p: argparse.ArgumentParser) -> None:
    model_argument(p)
    limit_arguments(p, "Hessian-vector products")
    p.add_argument("--layers", default=None,
                   help="glob(s), comma-separated, of the layers whose weights span the space (default: "
                        "every quantizable decoder linear); a subset gives that diagonal block "
                        "of the Hessian")
    p.add_argument("--operator", default="hessian", choices=["hessian", "ggn"],
                   help="the NLL Hessian, or the generalized Gauss-Newton matrix (PSD)")
    data_arguments(p, segments=4, batch_size=1, stride=False)
    p.add_argument("--k", type=int, default=10, help="top eigenpairs (largest algebraic; default 10)")
    p.add_argument("--k-bottom", type=int, default=3, help="bottom eigenpairs (default 3; 0 for none)")
    p.add_argument("--lanczos-steps", type=int, default=None,
                   help="Krylov dimension = products spent (default max(50, 2 (k + k_bottom)))")
    p.add_argument("--trace-matvecs", type=int, default=30, help="Hutch++ products (>= 6; 0 skips the trace)")
    p.add_argument("--density-runs", type=int, default=0, help="SLQ runs of the spectral density (0: none)")
    p.add_argument("--density-steps", type=int, default=50, help="Lanczos steps per SLQ run (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the start and probe vectors")
    p.add_argument("--krylov-dir", type=Path, default=None,
                   help="keep Lanczos bases and the Hutch++ sketch in memory-mapped files in this directory "
                        "instead of in memory")
    p.add_argument("--budgets", nargs="+", type=int, default=None, metavar="TOKENS",
                   help="a convergence sweep instead: top --k eigenvalues and the trace at each token budget "
                        "(multiples of --seq-len, which must be given), on --replicates disjoint groups of "
                        "held-out windows each (landscape.studies.convergence)")
    p.add_argument("--replicates", nargs="+", type=int, default=[3],
                   help="with --budgets: disjoint replicates, one count or one per budget (default 3)")
    p.add_argument("--save-eigenvectors", action="store_true",
                   help="store the eigenvectors too ((k + k_bottom) x every selected weight)")
    p.add_argument("--out", required=True, type=Path,
                   help="HDF5 store (resumed if unfinished, read if finished)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="i/n: run only tasks i, i+n, ... of spectrum, trace, density (--executor does this)")
    progress_argument(p)
    executor_arguments(p)


def check_spectrum_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the bad setting (before the model loads)."""
    for name, low in (("k", 1), ("k_bottom", 0), ("density_runs", 0), ("density_steps", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.trace_matvecs != 0 and args.trace_matvecs < 6:
        raise ValueError(f"--trace-matvecs must be 0 (no trace) or >= 6 (Hutch++ needs two residual probes "
                         f"for its error), got {args.trace_matvecs}")
    if args.lanczos_steps is not None and args.lanczos_steps < args.k + args.k_bottom:
        raise ValueError(f"--lanczos-steps must be >= k + k_bottom = {args.k + args.k_bottom}, got "
                         f"{args.lanczos_steps}")
    if args.budgets is not None:
        check_sweep_args(args)
    if args.krylov_dir is not None and not args.krylov_dir.is_dir():
        raise ValueError(f"--krylov-dir {args.krylov_dir} is not an existing directory")
    if args.budgets is not None:  # every replicate's products run over its windows: count them in windows
        products = sum((args.sweep.lanczos_steps + args.trace_matvecs) * s * r
                       for s, r in zip(args.plan.segments, args.plan.replicates))
    else:
        products = ((args.lanczos_steps or max(50, 2 * (args.k + args.k_bottom))) + args.trace_matvecs
                    + args.density_runs * args.density_steps)
    work_limits(args).check_points("this spectrum (Hessian-vector products: Lanczos, trace, density)",
                                   products)


def check_sweep_args(args: argparse.Namespace) -> None:
    """``--budgets``: the sweep's plan and settings (``args.plan``, ``args.sweep``), and the flags it does not
    take refused, before the model loads."""
    flags = (("--k-bottom", args.k_bottom), ("--density-runs", args.density_runs), ("--layers", args.layers),
             ("--save-eigenvectors", args.save_eigenvectors), ("--krylov-dir", args.krylov_dir),
             ("--operator ggn", args.operator != "hessian"))
    unsupported = [flag for flag, used in flags if used]
    if unsupported:
        raise ValueError(f"--budgets runs a convergence sweep of the Hessian's top eigenvalues and trace "
                         f"over every decoder linear; it does not take {', '.join(unsupported)} (give "
                         f"--k-bottom 0)")
    if args.seq_len is None:
        raise ValueError("--budgets needs --seq-len (every budget is a whole number of windows of it)")
    args.plan = convergence.Budgets.from_tokens(args.budgets, args.seq_len, args.replicates)
    args.sweep = convergence.SweepSettings(args.k, args.lanczos_steps or max(10, 2 * args.k),
                                           args.trace_matvecs, args.seed)
    args.segments = args.plan.n_windows


def spectrum_tasks(args: argparse.Namespace) -> list[str]:
    if args.budgets is not None:
        return convergence.task_names(args.plan, args.sweep)
    return ["spectrum"] + ["trace"] * bool(args.trace_matvecs) + ["density"] * bool(args.density_runs)


def run_spectrum(args: argparse.Namespace) -> int:
    check_spectrum_args(args)
    cluster = cluster_settings(args)
    out = check_store_path(args.out, resume=True)
    if cluster.fans_out:
        for path in fan_out(args, cluster, "spectrum", out, len(spectrum_tasks(args)), ("--no-progress",)):
            print(read_curvature(read_store(path)).markdown())
            print(f"\nunits: nats/token per squared weight unit; store: {path}")
        return 0
    lm, data = load_with_data(args)
    if args.budgets is not None:
        return run_sweep_at_w0(args, out, lm, data)
    dimension = sum(weight_matrix(m).numel() for m in quantizable_layers(lm.model).values())
    steps = min(dimension, max(args.lanczos_steps or max(50, 2 * (args.k + args.k_bottom)),
                               args.density_steps if args.density_runs else 0))  # more are refused below
    # a double-backward product holds about 6 weight-sized buffers (measured on SmolLM2), the basis one a step
    basis = 0 if args.krylov_dir else steps + 1
    check_memory(lm, args, "this spectrum (Hessian-vector products)", steps, 6 + basis,
                 "fewer --lanczos-steps, --layers, or --krylov-dir for the basis")
    layers = [g.strip() for g in args.layers.split(",")] if args.layers else None
    curvature = Curvature(lm.model, data, layers=layers, operator=args.operator, batch_size=args.batch_size,
                          progress=not args.no_progress)
    tasks = {"spectrum": lambda: curvature.spectrum(
        args.k, args.k_bottom, lanczos_steps=args.lanczos_steps, seed=args.seed,
        return_eigenvectors=args.save_eigenvectors,
        krylov_dir=args.krylov_dir).to_record(include_eigenvectors=args.save_eigenvectors)}
    if args.trace_matvecs:
        tasks["trace"] = lambda: curvature.trace(args.trace_matvecs, seed=args.seed,
                                                 krylov_dir=args.krylov_dir).to_record()
    if args.density_runs:
        tasks["density"] = lambda: curvature.density(args.density_runs, args.density_steps, seed=args.seed,
                                                     krylov_dir=args.krylov_dir).to_record()
    assert list(tasks) == spectrum_tasks(args)
    curvature.check_spectrum(args.k, args.k_bottom, lanczos_steps=args.lanczos_steps,  # before the store
                             return_eigenvectors=args.save_eigenvectors, krylov_dir=args.krylov_dir)
    if args.density_runs:
        curvature.check_density(args.density_runs, args.density_steps, krylov_dir=args.krylov_dir)
    settings = computed_settings(args, "out", "krylov_dir", "model", "device", "dtype")
    store, path = run_tasks(out, provenance("curvature", lm.base, data, model_info=lm.info.to_dict(),
                                            settings=settings, tasks=list(tasks)), tasks, shard=args.shard)
    if args.shard != (0, 1):
        print(shard_report(path, store.done, args.shard, "tasks"))
        return 0
    if lm.info.caveat:
        print(f"caveat: {lm.info.caveat}\n")
    print(read_curvature(store).markdown())
    print(f"\nunits: nats/token per squared weight unit; store: {out}")
    return 0


def run_sweep_at_w0(args: argparse.Namespace, out: Path, lm, data) -> int:
    """``--budgets``: the convergence sweep's spectrum and trace tasks into the store, then its report."""
    check_memory(lm, args, "this sweep (Hessian-vector products)", args.sweep.lanczos_steps, 6 + 3,
                 "fewer --lanczos-steps or a smaller model")
    tasks = convergence.sweep_tasks(lm.model, data, args.plan, args.sweep, progress=not args.no_progress)
    settings = computed_settings(args, "out", "krylov_dir", "model", "device", "dtype", "plan", "sweep")
    record = provenance("curvature-convergence", lm.base, data, model_info=lm.info.to_dict(),
                        settings=settings, tasks=list(tasks))
    store, path = run_tasks(out, record, tasks, shard=args.shard)
    if args.shard != (0, 1):
        print(shard_report(path, store.done, args.shard, "tasks"))
        return 0
    print(convergence.report(store, args.plan, args.sweep))
    print(f"\nstore: {out}")
    return 0


COMMANDS = (Command("spectrum",
                    "Hessian (or GGN) eigenvalues at w0: top/bottom eigenpairs, Hutch++ trace, SLQ "
                    "density, into a resumable store", spectrum_arguments, run_spectrum),)
