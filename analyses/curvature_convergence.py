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

The report gives, per quantity and budget, the replicates' mean with a Student-t interval and the largest
deviation of a single replicate from the largest budget's mean, the budget from which every replicate is
within ``--tolerance`` (10 %) of it, and in what share of the replicates each direction is the flattest.
One resumable store (one point per task); ``--executor slurm --jobs N`` fans the tasks out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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
from landscape.curvature import Curvature, DirectionalCurvature, Spectrum, TraceEstimate
from landscape.data import heldout_set
from landscape.engine.directions import displacement_direction, random_direction_of_length
from landscape.store import StoreData, check_store_path, provenance, read_store, run_tasks
from landscape.studies import convergence as cv
from landscape.weights import Base


def direction_argument(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RESULT_PATH (e.g. gptq=results/gptq-int4), "
                                         f"got {text!r}")
    return name, path


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The arguments, checked (every refusal before the model loads), with the parser."""
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
    if args.k_top < 0 or args.trace_matvecs < 0 or args.random < 0:
        p.error("--k-top, --trace-matvecs and --random must be >= 0")
    if 0 < args.trace_matvecs < 6:
        p.error(f"--trace-matvecs must be 0 or >= 6 (Hutch++), got {args.trace_matvecs}")
    if args.k_top and args.lanczos_steps < 2 * args.k_top:
        p.error(f"--lanczos-steps must be >= 2 x --k-top = {2 * args.k_top}, got {args.lanczos_steps}")
    names = [n for n, _ in args.direction]
    if len(set(names)) != len(names) or any(n.startswith("random") for n in names):
        p.error(f"direction names must be distinct and not start with 'random', got {names}")
    missing = [path for _, path in args.direction if not Path(path + ".json").exists()]
    if missing:
        p.error(f"no saved quantization results at {missing} (give the path without .safetensors/.json)")
    if not (args.k_top or args.trace_matvecs or args.direction or args.random):
        p.error("nothing to measure: --k-top, --trace-matvecs, --direction and --random are all off")
    try:
        args.plan = cv.Budgets.from_tokens(args.budgets, args.seq_len, args.replicates)
    except cv.ConvergenceError as err:
        p.error(str(err))
    return args, p


def direction_names(args: argparse.Namespace) -> list[str]:
    return [n for n, _ in args.direction] + [f"random{s}" for s in range(args.random)]


def task_names(args: argparse.Namespace) -> list[str]:
    """The store's tasks in order, from the arguments alone (a fanned-out run counts them before loading)."""
    plan, names = args.plan, []
    for i in range(len(plan.segments)):
        for r in range(plan.replicates[i]):
            names += [f"spectrum/{plan.tokens(i)}/{r}"] if args.k_top else []
            names += [f"trace/{plan.tokens(i)}/{r}"] if args.trace_matvecs else []
    for name in direction_names(args):
        names += [f"curvature/{name}", f"slope/{name}"]
    return names


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, parser = parse(argv)
    cluster = cluster_settings(args, parser)
    out = check_store_path(args.out, resume=True)
    if cluster.fans_out:
        sweep = Sweep.of_store("curvature-convergence", "analyses.curvature_convergence:main", argv, out,
                               len(task_names(args)), job_flags=("--no-progress",))
        path, = run_sweep(sweep, cluster)
        print(report(read_store(path), args))
        return
    lm = load_model_of(args)
    plan: cv.Budgets = args.plan
    windows = heldout_set(lm.tokenizer, args.seq_len, corpus_of(args), context_length=lm.info.context_length)
    plan = cv.Budgets.from_tokens(args.budgets, args.seq_len, args.replicates, available=windows.n_segments)
    data = windows.subset(slice(0, plan.n_windows))
    progress = not args.no_progress

    def on(windows_range: range) -> Curvature:
        return Curvature(lm.model, data.subset(list(windows_range)), batch_size=1, progress=progress)

    tasks: dict[str, Callable] = {}
    for i in range(len(plan.segments)):
        for r, group in enumerate(plan.groups(i)):
            key = f"{plan.tokens(i)}/{r}"
            if args.k_top:
                tasks[f"spectrum/{key}"] = lambda g=group: on(g).spectrum(
                    args.k_top, 0, lanczos_steps=args.lanczos_steps,
                    return_eigenvectors=False).to_record(include_eigenvectors=False)
            if args.trace_matvecs:
                tasks[f"trace/{key}"] = lambda g=group: on(g).trace(args.trace_matvecs).to_record()
    sources = dict(args.direction)
    whole = range(plan.n_windows)

    def direction(name: str):
        if name in sources:
            return displacement_direction(lm.model, sources[name])
        return random_direction_of_length(lm.model, int(name.removeprefix("random")), 1.0)

    for name in direction_names(args):
        tasks[f"curvature/{name}"] = lambda n=name: on(whole).rayleigh_quotient(direction(n)).to_record()
        tasks[f"slope/{name}"] = lambda n=name: on(whole).slope(direction(n)).to_record()
    assert list(tasks) == task_names(args)
    settings = computed_settings(args, "out", "device", "dtype", "plan")
    record = provenance("curvature-convergence", Base(lm.model, args.model), data,
                        model_info=lm.info.to_dict(), settings=settings, tasks=list(tasks),
                        directions=sources,
                        windows=[list(map(len, plan.groups(i))) for i in range(len(plan.segments))])
    store, path = run_tasks(out, record, tasks, shard=args.shard)
    if args.shard != (0, 1):
        print(shard_report(path, store.done, args.shard, "tasks"))
        return
    print(report(store, args))


def report(store: StoreData, args: argparse.Namespace) -> str:
    """The convergence table of a finished store (Markdown) and the flattest-direction shares."""
    plan, rows = args.plan, []
    budgets = range(len(plan.segments))

    def per_budget(task: str, read: Callable) -> list[list[float]]:
        return [[read(f"{task}/{plan.tokens(i)}/{r}") for r in range(plan.replicates[i])] for i in budgets]

    for j in range(args.k_top):
        rows.append(cv.converge(f"lambda_{j + 1}", per_budget(
            "spectrum", lambda t, j=j: float(Spectrum.from_data(store, t).top.eigenvalues[j])), plan,
            tolerance=args.tolerance))
    if args.trace_matvecs:
        rows.append(cv.converge("trace (Hutch++)", per_budget(
            "trace", lambda t: TraceEstimate.from_data(store, t).value), plan, tolerance=args.tolerance))
    curvatures = {}
    for name in direction_names(args):
        for kind, symbol in (("curvature", "u^T H u"), ("slope", "g^T u")):
            est = DirectionalCurvature.from_data(store, f"{kind}/{name}")
            values = cv.group_estimates(est.unit_sums, est.unit_tokens, plan)
            rows.append(cv.converge(f"{symbol}, {name}", values, plan, tolerance=args.tolerance))
            if kind == "curvature":
                curvatures[name] = values
    conv = store.provenance["nll_convention"]
    lines = [cv.markdown(rows, plan), "",
             f"Held-out {conv['corpus']} windows of {args.seq_len} tokens (token-mean NLL; each window's "
             f"first token unscored); replicates of a budget are disjoint; intervals: Student t over "
             f"replicates; 'max dev': the largest |replicate - reference| / |reference|, reference = the "
             f"largest budget's mean; curvature in nats/token per squared weight unit, slope per weight "
             f"unit."]
    if len(curvatures) > 1:
        lines += ["", "Share of replicates in which each direction has the smallest u^T H u:"]
        for i in budgets:
            shares = cv.flattest_share({n: v[i] for n, v in curvatures.items()})
            lines.append(f"- {plan.labels()[i]}: " + ", ".join(f"{n} {s:.0%}" for n, s in shares.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.curvature_convergence"))
