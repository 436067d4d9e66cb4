"""Curvature at w0 and along several formats' displacements (issue #6; figure 6 covers one format).

    python -m analyses.curvature_study --model smollm2-135m --results results/quant_table/results \\
        --formats int4 int4-g64 int3-g64 --out results/curvature_study.h5

On held-out wiki windows, or those of ``--text FILE`` (``--segments`` x ``--seq-len`` tokens; every Hessian
product covers all of them):

* ``spectrum``: the top ``--k-top`` and bottom ``--k-bottom`` Hessian eigenvalues at w0 by reorthogonalised
  Lanczos with ``--lanczos-steps`` products, with each Ritz pair's residual and convergence flag;
* ``trace``: Hutch++ with ``--trace-matvecs`` products;
* ``path/<method> <format>``: the Rayleigh quotient ``u^T H(w0 + t d) u``, ``u = d / ||d||``, at each ``--t``
  along the displacement ``d`` of RTN, GPTQ and QAFT (seed 0) saved by the quantization tables (same
  calibration set), and along a random filter-normalised direction of GPTQ's length, with a bootstrap
  interval over the segments; and the slope ``g(w0 + t d)^T u`` there, so the printed table can split the
  quadratic model of ``NLL(w0 + d) - NLL(w0)`` into its first-order (``||d|| g^T u``) and second-order
  (``||d||^2 u^T H u / 2``) parts at w0.

One resumable store, one point per task (a killed run resumes at the next task); ``--executor local|slurm``
with ``--jobs N`` runs the tasks as N jobs (:mod:`landscape.cluster`). Prints a Markdown table.
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
from landscape.curvature import Curvature, read_curvature
from landscape.data import calibration_set, heldout_set
from landscape.engine.directions import displacement_direction, random_direction_of_length
from landscape.quant import parse_format
from landscape.store import check_store_path, provenance, read_store, run_tasks
from landscape.studies.quant_table import Protocol, Variant, result_key
from landscape.weights import Base

METHODS = ("rtn", "gptq", "qaft")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(p)
    p.add_argument("--results", required=True, help="the quantization tables' results/ folder")
    p.add_argument("--formats", nargs="*", default=["int4", "int4-g64", "int3-g64"],
                   help="formats whose RTN, GPTQ and QAFT displacements (and a random one) are followed")
    p.add_argument("--also", nargs="+", default=[], metavar="NAME",
                   help="also the displacements of these saved results (file stems in the results folder, "
                        "e.g. fp-finetune-lr0.0003-e1-b4-s0 for the full-precision control, "
                        "gptq+lorc-int4-r8)")
    p.add_argument("--qaft-lr", type=float, default=3e-4,
                   help="the QAFT runs' learning rate (their file names)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="the tables' calibration sequence length")
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k-top", type=int, default=10)
    p.add_argument("--k-bottom", type=int, default=3)
    p.add_argument("--lanczos-steps", type=int, default=80)
    p.add_argument("--trace-matvecs", type=int, default=30)
    p.add_argument("--t", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    p.add_argument("--no-spectrum", action="store_true", help="only the paths")
    p.add_argument("--no-paths", action="store_true", help="only the spectrum and the trace")
    p.add_argument("--krylov-dir",
                   help="keep the Lanczos basis in memory-mapped files in this directory (60 steps "
                        "on SmolLM2 need 25 GiB, more than a 24 GiB machine has)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="i/n: run only tasks i, i+n, ... into --out (--executor does this for you)")
    progress_argument(p)
    executor_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    formats = [parse_format(f).name for f in args.formats]
    if args.segments < 2:
        p.error(f"--segments must be >= 2 (the path intervals are over segments), got {args.segments}")
    if args.no_paths and args.also:
        p.error("--no-paths takes no --also (it names paths)")
    if args.no_spectrum and (args.no_paths or not (formats or args.also)):
        p.error("--no-spectrum without paths (--no-paths, or no --formats and no --also) "
                "leaves nothing to do")
    if args.krylov_dir is not None and not Path(args.krylov_dir).is_dir():
        p.error(f"--krylov-dir {args.krylov_dir} is not an existing directory")
    if args.trace_matvecs < 6:
        p.error(f"--trace-matvecs must be >= 6 (Hutch++ needs two residual probes for its error), got "
                f"{args.trace_matvecs}")
    cluster = cluster_settings(args, p)
    out = check_store_path(args.out, resume=True)
    if cluster.fans_out:
        count = len(task_names(args, formats))
        sweep = Sweep.of_store("curvature-study", "analyses.curvature_study:main", argv, out, count,
                               job_flags=("--no-progress",))
        path, = run_sweep(sweep, cluster)
        report(read_store(path))
        return

    lm = load_model_of(args)
    calib = calibration_set(lm.tokenizer, 128, args.calib_seq_len, 0, corpus_of(args),
                            context_length=lm.info.context_length)
    results = Path(args.results) / f"calib-{calib.content_hash}"
    protocol = Protocol(model=args.model, qaft_lr=args.qaft_lr)  # only its QAFT settings name the files
    sources = {(m, f): results / result_key(protocol, Variant(m, f)) for f in formats for m in METHODS}
    extra = {name: results / name for name in args.also}
    missing = [] if args.no_paths else [str(s) for s in (*sources.values(), *extra.values())
                                        if not s.with_name(s.name + ".json").exists()]
    if missing:
        p.error(f"no saved results {missing}: run python -m analyses.quant_table first")
    data = heldout_set(lm.tokenizer, args.seq_len, corpus_of(args), args.segments,
                       context_length=lm.info.context_length)

    def displacement(source: Path):  # streamed: a path's flat vector is its only copy
        return displacement_direction(lm.model, source, streamed=True)

    def random_like(fmt: str):
        length = displacement(sources[("gptq", fmt)]).norm()
        return random_direction_of_length(lm.model, args.random_seed, length)

    curvature = Curvature(lm.model, data, batch_size=1, progress=not args.no_progress)
    tasks = {}
    if not args.no_spectrum:
        tasks["spectrum"] = lambda: curvature.spectrum(
            args.k_top, args.k_bottom, lanczos_steps=args.lanczos_steps, return_eigenvectors=False,
            krylov_dir=args.krylov_dir).to_record(include_eigenvectors=False)
        tasks["trace"] = lambda: curvature.trace(args.trace_matvecs).to_record()
    def path_task(direction):  # direction: built when the task runs, so a finished task loads nothing
        return lambda: curvature.along(direction(), t=args.t, level=0.95, slope=True).to_record()

    paths = {}
    for f in formats if not args.no_paths else ():
        for m in METHODS:
            paths[f"{m} {f}"] = str(sources[(m, f)])
            tasks[f"path/{m} {f}"] = path_task(
                lambda m=m, f=f: displacement(sources[(m, f)]))
        label = f"random (GPTQ {f}'s length)"
        paths[label] = f"filter seed {args.random_seed}, GPTQ {f}'s norm"
        tasks[f"path/{label}"] = path_task(lambda f=f: random_like(f))
    for name, source in extra.items():
        paths[name] = str(source)
        tasks[f"path/{name}"] = path_task(lambda source=source: displacement(source))
    assert list(tasks) == task_names(args, formats)
    # device and dtype: the provenance's own
    settings = computed_settings(args, "out", "results", "krylov_dir", "device", "dtype")
    record = provenance("curvature", Base(lm.model, args.model), data, model_info=lm.info.to_dict(),
                        settings=settings, tasks=list(tasks), paths=paths)
    store, path = run_tasks(out, record, tasks, shard=args.shard)
    if args.shard != (0, 1):
        print(shard_report(path, store.done, args.shard, "tasks"))
        return
    report(store)


def task_names(args: argparse.Namespace, formats: list[str]) -> list[str]:
    """The store's tasks, in order, from the arguments alone (a fanned-out run counts them before loading)."""
    names = [] if args.no_spectrum else ["spectrum", "trace"]
    for f in formats if not args.no_paths else ():
        names += [f"path/{m} {f}" for m in METHODS] + [f"path/random (GPTQ {f}'s length)"]
    return names + [f"path/{name}" for name in args.also]


def report(store) -> None:
    """Print the store's spectrum, trace and path table (:meth:`landscape.curvature.CurvatureRecord.markdown`)
    and the NLL convention."""
    print(read_curvature(store).markdown())
    conv = store.provenance["nll_convention"]
    print(f"\nNLL: token-mean over {conv['n_segments']} x {conv['seq_len']} held-out {conv['corpus']} "
          f"tokens; curvature in nats/token per squared weight unit, slope g^T u (u = d / ||d||) "
          f"per weight unit")


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.curvature_study"))
