"""Command-line front ends of the perturbation engine: ``landscape scan``, ``landscape radius``,
``landscape merge``.

Examples::

    landscape scan ref-tiny --kind filter --seed 0 --grid -1:1:21 --out scan.h5
    landscape scan ref-tiny --kind filter --grid -1:1:11 --grid2 -1:1:11 --shard 0/4 --out s0.h5   # one of 4
    landscape merge scan2d.h5 s0.h5 s1.h5 s2.h5 s3.h5
    landscape scan ref-tiny --kind filter --grid -1:1:11 --grid2 -1:1:11 --executor local --jobs 4 --out s.h5
    landscape radius ref-tiny --directions 16 --threshold 0.1 --profile 0:0.2:11 --out radius.h5
    landscape radius my-llama --directions 64 --executor slurm --jobs 16 --slurm-partition gpu \
        --slurm-gpus-per-task 1 --out radius64.h5

Grids are ``START:STOP:COUNT`` (inclusive, evenly spaced). Data: held-out segments of a bundled corpus.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from landscape.cli.common import (
    Command,
    check_eigenvector_settings,
    cluster_settings,
    data_arguments,
    executor_arguments,
    fan_out,
    limit_arguments,
    load_with_data,
    model_argument,
    parse_grid,
    parse_shard,
    progress_argument,
    store_arguments,
    work_limits,
)
from landscape.cluster import shard_report
from landscape.curvature import Curvature
from landscape.engine.basin import BasinStatistics, RadiusSearch, basin_statistics, eigenvector_directions
from landscape.engine.directions import (
    DirectionSpec,
    check_spec,
    displacement_direction,
    orthogonalize,
    quant_result_path,
    random_direction,
)
from landscape.engine.perturb import NLLObjective, default_objectives, scan
from landscape.engine.sweep import Execution
from landscape.quant.result import distinct_names
from landscape.store import check_store_path, merge_stores, read_store
from landscape.weights import layer_patterns, quantizable_layers, weights_norm
from landscape.workload import WorkEstimate, scan_workload

RANDOM_KINDS = {"random": "none", "filter": "filter", "layer": "layer"}  # --kind -> normalisation


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    """What scan and radius share: the model, the perturbed layers, the held-out data, the store, progress,
    the memory mode."""
    model_argument(p)
    p.add_argument("--layers", default="*",
                   help="glob(s), comma-separated, of the perturbed layers (default: all "
                        "quantizable decoder linears)")
    p.add_argument("--low-memory", action="store_true",
                   help="stream the directions layer by layer (NLL only): about one model of memory, more "
                        "time per point")
    data_arguments(p, segments=8)
    store_arguments(p)
    limit_arguments(p)
    progress_argument(p)
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="i/n: evaluate only points (directions) i, i+n, ... into --out; join the stores with "
                        "`landscape merge` (--executor does this for you)")
    executor_arguments(p)


def check_quantized(paths: list[str | None]) -> None:
    for path in paths:
        if path is not None and not os.path.exists(f"{quant_result_path(path)}.json"):
            raise ValueError(f"no saved quantized model at {path} (expected {quant_result_path(path)}.json "
                             f"and .safetensors)")


# ----------------------------------------------------------------------------------------------- scan
def scan_arguments(p: argparse.ArgumentParser) -> None:
    sweep_arguments(p)
    kinds = [*RANDOM_KINDS, "displacement"]
    p.add_argument("--kind", choices=kinds, default="filter",
                   help="first direction: random (raw Gaussian), filter / layer (Gaussian, filter- or "
                        "layer-normalised), displacement (toward --quantized); default filter")
    p.add_argument("--seed", type=int, default=0, help="seed of a random first direction (default 0)")
    p.add_argument("--quantized", default=None, help="saved QuantResult for --kind displacement")
    p.add_argument("--grid", required=True, type=parse_grid,
                   help="coefficients along the first direction, START:STOP:COUNT")
    p.add_argument("--kind2", choices=kinds, default=None, help="second direction (default: same as --kind)")
    p.add_argument("--seed2", type=int, default=None,
                   help="seed of a random second direction (default seed + 1)")
    p.add_argument("--quantized2", default=None, help="saved QuantResult for --kind2 displacement")
    p.add_argument("--grid2", type=parse_grid, default=None,
                   help="coefficients along the second direction: a 2-D scan")
    p.add_argument("--orthogonalize", action="store_true",
                   help="Gram-Schmidt the second direction against the first")
    p.add_argument("--layer-mse", action="store_true", help="also store every perturbed layer's output MSE")


def sweep_workload(lm, data, args: argparse.Namespace, what: str, points: int, directions: int,
                   evaluations_per_point: int = 1) -> WorkEstimate:
    """The work and memory estimate of a scan or radius search on the loaded model (landscape.workload)."""
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    layer_mse = getattr(args, "layer_mse", False)
    streamed = args.low_memory and not layer_mse
    layers = len(quantizable_layers(lm.model)) if layer_mse else 0
    vocab = lm.model.get_input_embeddings().num_embeddings
    return scan_workload(what, points, directions, model_bytes, model_bytes, data.n_segments,
                         data.tokens.shape[1], args.batch_size, vocab, 8 * (1 + layers) + 1, streamed,
                         evaluations_per_point)


def direction(model, kind: str, seed: int, quantized: str | None, layers: str, streamed: bool):
    if kind == "displacement":
        return displacement_direction(model, quantized, layers, streamed=streamed)
    return random_direction(model, seed, RANDOM_KINDS[kind], layers, streamed=streamed)


def run_scan(args: argparse.Namespace) -> int:
    cluster = cluster_settings(args)
    check_store_path(args.out, args.resume)
    kind2 = args.kind2 or args.kind
    two_d = args.grid2 is not None
    if args.kind == "displacement" and not args.quantized:
        raise ValueError("--kind displacement needs --quantized PATH (a saved QuantResult)")
    if two_d and kind2 == "displacement" and not args.quantized2:
        raise ValueError("a displacement second direction needs --quantized2 PATH")
    if not two_d and (args.kind2 or args.quantized2 or args.seed2 is not None or args.orthogonalize):
        given = [f for f, v in (("--kind2", args.kind2), ("--quantized2", args.quantized2),
                                ("--seed2", args.seed2), ("--orthogonalize", args.orthogonalize)) if v]
        raise ValueError(f"{', '.join(given)} describe a second direction, which only a 2-D scan has: add "
                         f"--grid2 START:STOP:COUNT, or drop them")
    if args.quantized2 and kind2 != "displacement":
        raise ValueError(f"--quantized2 is the target of a displacement second direction, but the second "
                         f"direction is {kind2!r}: add --kind2 displacement, or drop --quantized2")
    check_quantized([args.quantized, args.quantized2 if two_d else None])
    points = len(args.grid) * (len(args.grid2) if two_d else 1)
    limits = work_limits(args)
    limits.check_points("this scan", points)
    if cluster.fans_out:
        for path in fan_out(args, cluster, "scan", args.out, points):
            print(f"{path}: {points} points, merged from {args.jobs} jobs"
                  f"{nll_summary(read_store(path).arrays['nll'])}")
        return 0
    lm, data = load_with_data(args)
    streamed = args.low_memory and not args.layer_mse  # each layer's direction computed while it is applied
    directions = [direction(lm.base, args.kind, args.seed, args.quantized, args.layers, streamed)]
    if two_d:
        seed2 = args.seed + 1 if args.seed2 is None else args.seed2
        second = direction(lm.base, kind2, seed2, args.quantized2, args.layers, streamed)
        directions.append(orthogonalize(second, directions[0]) if args.orthogonalize else second)
    grid = [args.grid, args.grid2] if two_d else [args.grid]
    objectives = default_objectives(data, args.layer_mse, args.batch_size, lm.info.name)
    sweep_workload(lm, data, args, "this scan", points, len(directions)).check(limits)
    execution = Execution(store=args.out, resume=args.resume, shard=args.shard,
                          provenance={"model_info": lm.info.to_dict()}, progress=not args.no_progress)
    result = scan(lm.base, directions, grid, objectives, data=data, execution=execution)
    summary = nll_summary(result.values["nll"][result.done])
    print(f"{result.path}: {int(result.done.sum())} of {result.done.size} points done "
          f"(shard {args.shard[0]}/{args.shard[1]}){summary}")
    return 0


# --------------------------------------------------------------------------------------------- radius
def radius_arguments(p: argparse.ArgumentParser) -> None:
    sweep_arguments(p)
    p.add_argument("--directions", type=int, default=16,
                   help="number of random directions (seeds seed .. seed+n-1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first direction (default 0)")
    p.add_argument("--normalization", choices=["none", "filter", "layer"], default="filter",
                   help="normalisation of the random directions before unit rescaling (default filter)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="NLL rise that leaves the basin (nats; default 0.1)")
    p.add_argument("--relative", action="store_true", help="threshold is a fraction of NLL(w0)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="relative width of the final bracket (default 0.01)")
    p.add_argument("--profile", type=parse_grid, default=None,
                   help="also the radial profile at these radii, in fractions of ||w0||, START:STOP:COUNT")
    p.add_argument("--quantized", action="append", default=[],
                   help="saved QuantResult whose displacement norm is reported beside R (repeatable)")
    worst = p.add_argument_group("worst-case basin", "R also along special directions, with the same "
                                 "threshold: the basin's narrowest side against the random (most-case) R")
    worst.add_argument("--along-quantized", action="store_true",
                       help="also R along each --quantized result's normalised displacement")
    worst.add_argument("--eigenvectors", type=int, default=0,
                       help="also R along both signs of the top K Hessian eigenvectors (Lanczos on the "
                            "first --hessian-segments held-out segments; default 0: none)")
    worst.add_argument("--hessian-segments", type=int, default=2,
                       help="held-out segments for the Hessian of --eigenvectors (default 2)")
    worst.add_argument("--lanczos-steps", type=int, default=None,
                       help="Lanczos steps for --eigenvectors (default max(50, 2K))")


def run_radius(args: argparse.Namespace) -> int:
    cluster = cluster_settings(args)
    check_store_path(args.out, args.resume)
    if args.directions < 1:
        raise ValueError(f"--directions must be >= 1, got {args.directions}")
    if args.profile is not None and (args.profile < 0).any():
        raise ValueError(f"--profile radii are fractions of ||w0|| and must be >= 0, got "
                         f"{np.round(args.profile, 6).tolist()}")
    search = RadiusSearch(args.threshold, args.relative, args.tolerance)
    check_quantized(args.quantized)
    labels = distinct_names(args.quantized)  # runs/a/g4 and runs/b/g4: a/g4 and b/g4; twice: refused
    special = check_worst_case(args, cluster.fans_out)
    points = (args.directions + special) * (1 + (len(args.profile) if args.profile is not None else 0))
    limits = work_limits(args)
    limits.check_points("this radius search (directions x (1 + profile radii))", points)
    if cluster.fans_out:
        for path in fan_out(args, cluster, "radius", args.out, args.directions):
            report_radius(BasinStatistics.from_store(path), path)
        return 0
    lm, data = load_with_data(args)
    sweep_workload(lm, data, args, "this radius search", points, 1, search.max_evaluations).check(limits)
    base = lm.base
    patterns = layer_patterns(args.layers)
    layers = check_spec(base, DirectionSpec("random", patterns, seed=args.seed))
    specs = [DirectionSpec("random", patterns, seed=args.seed + i, normalization=args.normalization,
                           base_fingerprint=base.fingerprint(layers)) for i in range(args.directions)]
    norm0 = weights_norm(lm.model, layers)
    profile = args.profile * norm0 if args.profile is not None else ()
    results = dict(zip(labels, args.quantized))
    directions = [*specs, *worst_case_directions(lm, data, args, patterns, results)]
    execution = Execution(store=args.out, resume=args.resume, shard=args.shard,
                          provenance={"model_info": lm.info.to_dict()}, progress=not args.no_progress,
                          low_memory=args.low_memory)
    stats = basin_statistics(base, directions, NLLObjective(data, args.batch_size, lm.info.name), data=data,
                             search=search, profile_radii=profile, quant_results=results, execution=execution)
    if stats is None:  # one shard of the directions
        print(shard_report(args.out, read_store(args.out).done, args.shard, "directions"))
        return 0
    report_radius(stats, args.out)
    return 0


def check_worst_case(args: argparse.Namespace, fans_out: bool) -> int:
    """How many special (worst-case) directions the run adds; bad settings refused before any work."""
    check_eigenvector_settings(args.eigenvectors, args.lanczos_steps, args.hessian_segments,
                               "--hessian-segments")
    if args.along_quantized and not args.quantized:
        raise ValueError("--along-quantized searches R along each --quantized result's displacement: give at "
                         "least one --quantized")
    if args.eigenvectors and fans_out:
        raise ValueError("--eigenvectors runs the Lanczos search in this process: drop --executor (or search "
                         "the random directions with --executor and the eigenvectors in a second run)")
    return 2 * args.eigenvectors + (len(args.quantized) if args.along_quantized else 0)


def worst_case_directions(lm, data, args: argparse.Namespace, patterns, results: dict[str, str]) -> list:
    """The normalised displacements (as specs, regenerable) and both signs of the top Hessian eigenvectors."""
    out: list = []
    if args.along_quantized:
        out += [displacement_direction(lm.base, path, patterns, streamed=True).spec
                for path in results.values()]
    if args.eigenvectors:
        hessian_data = data.subset(slice(0, min(args.hessian_segments, data.n_segments)))
        curvature = Curvature(lm.model, hessian_data, layers=list(patterns), batch_size=args.batch_size,
                              progress=not args.no_progress)
        top = curvature.spectrum(args.eigenvectors, 0, lanczos_steps=args.lanczos_steps).top
        out += eigenvector_directions(lm.base, top, f", on {hessian_data.n_segments} x "
                                                    f"{hessian_data.tokens.shape[1]} held-out tokens")
    return out


def nll_summary(values: np.ndarray) -> str:
    """``; NLL a .. b nats/token`` over the finite values, and how many are not finite (no ``nan .. nan``)."""
    finite = values[np.isfinite(values)]
    out = f"; NLL {finite.min():.4f} .. {finite.max():.4f} nats/token" if finite.size else ""
    if finite.size < values.size:
        out += (f"; {values.size - finite.size} points have a non-finite NLL (nan/inf: the perturbed weights "
                f"left the range of the model's dtype; choose smaller coefficients)")
    return out


def report_radius(stats: BasinStatistics, path: Path) -> None:
    q = stats.quantiles()
    print(f"{path}: NLL(w0) = {stats.center_value:.4f}, level {stats.level:.4f}, "
          f"||w0|| = {stats.weights_norm:.2f}")
    print(f"R(w0) median {stats.median:.3f} ({stats.median / stats.weights_norm:.2%} of ||w0||), "
          f"10-90% {q[0.1]:.3f} .. {q[0.9]:.3f} over {len(stats.radii)} "
          f"{'random ' if stats.along() else ''}directions")
    unbounded = int(np.isinf(stats.radii).sum())
    if unbounded:
        print(f"  {unbounded} of {len(stats.radii)} directions never left the basin up to the search's "
              f"largest radius, 10 x ||w0|| (their R is reported as inf, a lower bound): a smaller "
              f"--threshold finds a crossing sooner")
    for label, norm in stats.displacement_norms.items():
        print(f"  {label}: ||w_q - w0|| = {norm:.3f} = {norm / stats.median:.2f} x median R")
    along = stats.along()
    if along:
        print("worst case: R along special directions (same threshold), and R / median R:")
        for label, radius in along.items():
            print(f"  {label}: R = {radius:.4g} ({radius / stats.median:.3g} x median R)")
        if np.isfinite(stats.worst_to_most_case()):
            print(f"  worst- to most-case radius (sharpest eigenvector / median random): "
                  f"{stats.worst_to_most_case():.3g}")


# ---------------------------------------------------------------------------------------------- merge
def merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="merged store to write")
    p.add_argument("shards", nargs="+", type=Path,
                   help="stores of the same run (e.g. shards i/n of one scan)")


def run_merge(args: argparse.Namespace) -> int:
    path = merge_stores(args.out, args.shards)
    merged = read_store(path)
    print(f"{path}: {int(merged.done.sum())} of {merged.done.size} points done, from "
          f"{len(args.shards)} stores")
    if not merged.complete:
        print(f"unfinished: the stores miss {int((~merged.done).sum())} points; run the sweep's command with "
              f"--out {args.out} --resume (without --shard) to compute them")
    return 0


COMMANDS = (
    Command("scan", "NLL (and layer MSE) on a 1-D or 2-D grid through w0 along random or "
                    "displacement directions",
            scan_arguments, run_scan),
    Command("radius", "basin radius R(w0) along random directions, with the radial profile and quantized "
                      "displacements", radius_arguments, run_radius),
    Command("merge", "merge the stores of one run (shards of a sweep) into one store", merge_arguments,
            run_merge),
)
