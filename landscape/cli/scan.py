"""Command-line front ends of the perturbation engine: ``landscape scan``, ``landscape radius``, ``landscape merge``.

Examples::

    landscape scan ref-tiny --kind filter --seed 0 --grid -1:1:21 --out scan.h5
    landscape scan ref-tiny --kind filter --grid -1:1:11 --grid2 -1:1:11 --shard 0/4 --out s0.h5   # one of 4
    landscape merge scan2d.h5 s0.h5 s1.h5 s2.h5 s3.h5
    landscape radius ref-tiny --directions 16 --threshold 0.1 --profile 0:0.2:11 --out radius.h5

Grids are ``START:STOP:COUNT`` (inclusive, evenly spaced). Data: held-out segments of a bundled corpus.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np

from landscape.cli import command, default_seq_len
from landscape.engine.perturb import NLLObjective, default_objectives
from landscape.engine.sweep import Execution
from landscape.weights import Base

RANDOM_KINDS = {"random": "none", "filter": "filter", "layer": "layer"}  # --kind -> normalisation


def parse_grid(text: str) -> np.ndarray:
    """``START:STOP:COUNT`` -> ``COUNT`` evenly spaced coefficients from START to STOP inclusive."""
    from landscape.engine.perturb import grid_axis

    parts = text.split(":")
    try:
        start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
        return grid_axis(start, stop, count)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"grid must be START:STOP:COUNT with finite numbers and an integer "
                                         f"COUNT >= 1 (e.g. -1:1:21), got {text!r}") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(x) for x in text.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}") from None
    return index, count


# argparse takes "-1:1:21" for an option; let arguments that start like a negative number be values.
_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]+(e[-+]?\d+)?:")


def _common_args(p: argparse.ArgumentParser) -> None:
    p._negative_number_matcher = _NEGATIVE_VALUE  # private argparse attribute (3.11-3.13); no public hook exists
    p.add_argument("model", help="smollm2-135m, ref-small, ref-tiny, a hub id or a local directory")
    p.add_argument("--layers", default="*", help="glob(s), comma-separated, of the perturbed layers (default: all "
                                                 "quantizable decoder linears)")
    p.add_argument("--corpus", default="wiki", help="held-out corpus (wiki, sotu; default wiki)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per segment (default 512 smollm2, else 256)")
    p.add_argument("--segments", type=int, default=8, help="held-out segments per evaluation (default 8)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: seq-len)")
    p.add_argument("--batch-size", type=int, default=4, help="segments per forward pass (default 4)")
    p.add_argument("--out", required=True, type=Path, help="HDF5 store to write (moved into place when complete)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished store at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace):
    from landscape.data import heldout_set
    from landscape.models import load_model

    lm = load_model(args.model)
    seq_len = args.seq_len or default_seq_len(lm.info)
    data = heldout_set(lm.tokenizer, seq_len, args.corpus, args.segments, args.stride, lm.info.context_length)
    return lm, data


def _check_quantized(paths: list[str | None]) -> None:
    from landscape.engine.directions import quant_result_path

    for path in paths:
        if path is not None and not os.path.exists(f"{quant_result_path(path)}.json"):
            raise ValueError(f"no saved quantized model at {path} (expected {quant_result_path(path)}.json and "
                             f".safetensors)")


# ----------------------------------------------------------------------------------------------- scan
def _scan_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    kinds = [*RANDOM_KINDS, "displacement"]
    p.add_argument("--kind", choices=kinds, default="filter",
                   help="first direction: random (raw Gaussian), filter / layer (Gaussian, filter- or "
                        "layer-normalised), displacement (toward --quantized); default filter")
    p.add_argument("--seed", type=int, default=0, help="seed of a random first direction (default 0)")
    p.add_argument("--quantized", default=None, help="saved QuantResult for --kind displacement")
    p.add_argument("--grid", required=True, type=parse_grid,
                   help="coefficients along the first direction, START:STOP:COUNT")
    p.add_argument("--kind2", choices=kinds, default=None, help="second direction (default: same as --kind)")
    p.add_argument("--seed2", type=int, default=None, help="seed of a random second direction (default seed + 1)")
    p.add_argument("--quantized2", default=None, help="saved QuantResult for --kind2 displacement")
    p.add_argument("--grid2", type=parse_grid, default=None, help="coefficients along the second direction: a 2-D scan")
    p.add_argument("--orthogonalize", action="store_true", help="Gram-Schmidt the second direction against the first")
    p.add_argument("--layer-mse", action="store_true", help="also store every perturbed layer's output MSE")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: evaluate points i, i+n, ... (default 0/1)")


def _direction(model, kind: str, seed: int, quantized: str | None, layers: str):
    from landscape.engine.directions import displacement_direction, random_direction

    if kind == "displacement":
        return displacement_direction(model, quantized, layers)
    return random_direction(model, seed, RANDOM_KINDS[kind], layers)


@command("scan", "NLL (and layer MSE) on a 1-D or 2-D grid through w0 along random or displacement directions")
def cmd_scan(args: argparse.Namespace) -> int:
    from landscape.engine.directions import orthogonalize
    from landscape.engine.perturb import scan
    from landscape.store import check_store_path

    check_store_path(args.out, args.resume)
    kind2 = args.kind2 or args.kind
    two_d = args.grid2 is not None
    if args.kind == "displacement" and not args.quantized:
        raise ValueError("--kind displacement needs --quantized PATH (a saved QuantResult)")
    if two_d and kind2 == "displacement" and not args.quantized2:
        raise ValueError("a displacement second direction needs --quantized2 PATH")
    _check_quantized([args.quantized, args.quantized2 if two_d else None])
    lm, data = _load(args)
    directions = [_direction(lm.model, args.kind, args.seed, args.quantized, args.layers)]
    if two_d:
        seed2 = args.seed + 1 if args.seed2 is None else args.seed2
        second = _direction(lm.model, kind2, seed2, args.quantized2, args.layers)
        directions.append(orthogonalize(second, directions[0]) if args.orthogonalize else second)
    grid = [args.grid, args.grid2] if two_d else [args.grid]
    objectives = default_objectives(data, args.layer_mse, args.batch_size, lm.info.name)
    execution = Execution(store=args.out, resume=args.resume, shard=args.shard,
                          provenance={"model_info": lm.info.to_dict()}, progress=not args.no_progress)
    result = scan(Base(lm.model, lm.info.name), directions, grid, objectives, data=data, execution=execution)
    nll_values = result.values["nll"][result.done]
    summary = f"; NLL {nll_values.min():.4f} .. {nll_values.max():.4f} nats/token" if nll_values.size else ""
    print(f"{result.path}: {int(result.done.sum())} of {result.done.size} points done "
          f"(shard {args.shard[0]}/{args.shard[1]}){summary}")
    return 0


cmd_scan.add_arguments = _scan_args


# --------------------------------------------------------------------------------------------- radius
def _radius_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--directions", type=int, default=16, help="number of random directions (seeds seed .. seed+n-1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first direction (default 0)")
    p.add_argument("--normalization", choices=["none", "filter", "layer"], default="filter",
                   help="normalisation of the random directions before unit rescaling (default filter)")
    p.add_argument("--threshold", type=float, default=0.1, help="NLL rise that leaves the basin (nats; default 0.1)")
    p.add_argument("--relative", action="store_true", help="threshold is a fraction of NLL(w0)")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative width of the final bracket (default 0.01)")
    p.add_argument("--profile", type=parse_grid, default=None,
                   help="also the radial profile at these radii, in fractions of ||w0||, START:STOP:COUNT")
    p.add_argument("--quantized", action="append", default=[],
                   help="saved QuantResult whose displacement norm is reported beside R (repeatable)")


@command("radius", "basin radius R(w0) along random directions, with the radial profile and quantized displacements")
def cmd_radius(args: argparse.Namespace) -> int:
    from landscape.engine.basin import RadiusSearch, basin_statistics
    from landscape.engine.directions import DirectionSpec, check_spec, quant_result_path
    from landscape.store import check_store_path
    from landscape.weights import layer_patterns, weights_fingerprint, weights_norm

    check_store_path(args.out, args.resume)
    if args.directions < 1:
        raise ValueError(f"--directions must be >= 1, got {args.directions}")
    if args.profile is not None and (args.profile < 0).any():
        raise ValueError(f"--profile radii are fractions of ||w0|| and must be >= 0, got {np.round(args.profile, 6).tolist()}")
    search = RadiusSearch(args.threshold, args.relative, args.tolerance)
    _check_quantized(args.quantized)
    lm, data = _load(args)
    patterns = layer_patterns(args.layers)
    layers = check_spec(lm.model, DirectionSpec("random", patterns, seed=args.seed))
    fingerprint = weights_fingerprint(lm.model, layers)
    specs = [DirectionSpec("random", patterns, seed=args.seed + i, normalization=args.normalization,
                           base_fingerprint=fingerprint) for i in range(args.directions)]
    norm0 = weights_norm(lm.model, layers)
    profile = args.profile * norm0 if args.profile is not None else ()
    results = {quant_result_path(q).name: q for q in args.quantized}
    execution = Execution(store=args.out, resume=args.resume, provenance={"model_info": lm.info.to_dict()},
                          progress=not args.no_progress)
    stats = basin_statistics(Base(lm.model, lm.info.name), specs, NLLObjective(data, args.batch_size, lm.info.name),
                             data=data, search=search, profile_radii=profile, quant_results=results,
                             execution=execution)
    q = stats.quantiles()
    print(f"{args.out}: NLL(w0) = {stats.center_value:.4f}, level {stats.level:.4f}, ||w0|| = {stats.weights_norm:.2f}")
    print(f"R(w0) median {stats.median:.3f} ({stats.median / stats.weights_norm:.2%} of ||w0||), "
          f"10-90% {q[0.1]:.3f} .. {q[0.9]:.3f} over {len(stats.per_direction)} directions")
    for label, norm in stats.displacement_norms.items():
        print(f"  {label}: ||w_q - w0|| = {norm:.3f} = {norm / stats.median:.2f} x median R")
    return 0


cmd_radius.add_arguments = _radius_args


# ---------------------------------------------------------------------------------------------- merge
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="merged store to write")
    p.add_argument("shards", nargs="+", type=Path, help="stores of the same run (e.g. shards i/n of one scan)")


@command("merge", "merge the stores of one run (shards of a sweep) into one store")
def cmd_merge(args: argparse.Namespace) -> int:
    from landscape.store import merge_stores, read_store

    path = merge_stores(args.out, args.shards)
    merged = read_store(path)
    print(f"{path}: {int(merged.done.sum())} of {merged.done.size} points done, from {len(args.shards)} stores")
    return 0


cmd_merge.add_arguments = _merge_args
