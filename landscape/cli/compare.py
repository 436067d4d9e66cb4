"""``landscape compare``: the displacement report of saved quantized models of one base model.

Example::

    landscape quantize ref-tiny --method rtn  --format int4 --out q/rtn.int4
    landscape quantize ref-tiny --method gptq --format int4 --out q/gptq.int4
    landscape quantize ref-tiny --method qaft --format int4 --out q/qaft.int4
    landscape compare ref-tiny q/rtn.int4 q/gptq.int4 q/qaft.int4 --eigenvectors 4 --out compare.h5

Every result is loaded and checked (files present, unchanged since saved, same base weights as the model, on
its format's grid) before any evaluation. A result is labelled by its method and format; results that share
that label are told apart by the shortest trailing part of their paths (``runs/a/g4`` and ``runs/b/g4``:
``rtn int4 (a/g4)`` and ``rtn int4 (b/g4)``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from landscape.cli.common import (
    Command,
    check_eigenvector_settings,
    check_memory,
    data_arguments,
    limit_arguments,
    load_with_data,
    model_argument,
    parse_grid,
    progress_argument,
    store_arguments,
    work_limits,
)
from landscape.curvature import Curvature
from landscape.engine.directions import quant_result_path
from landscape.quant.result import QuantResult, distinct_names
from landscape.store import check_store_path
from landscape.studies.compare import ComparisonSettings, check_same_base, compare_displacements


def label_pair(text: str) -> tuple[str, str]:
    """``START=>END`` (two result labels) -> ``(START, END)``."""
    start, sep, end = text.partition("=>")
    if not sep or not start.strip() or not end.strip():
        raise argparse.ArgumentTypeError(f"a segment is START=>END with two result labels (e.g. 'gptq "
                                         f"int4=>qaft int4'), got {text!r}")
    return start.strip(), end.strip()


def result_labels(stems: list[Path], labels: list[str]) -> list[str]:
    """One row label per result: its ``label`` (method and format), followed by the shortest distinguishing
    trailing part of its path (:func:`distinct_names`) among the results that share that label."""
    out = list(labels)
    for label in set(labels):
        same = [i for i, x in enumerate(labels) if x == label]
        if len(same) > 1:
            for i, name in zip(same, distinct_names([stems[i] for i in same])):
                out[i] = f"{label} ({name})"
    return out


CURVATURE_T_DEFAULT = parse_grid("0:1:3")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    model_argument(p)
    limit_arguments(p, "points along the paths (NLL and curvature, over every result)")
    p.add_argument("results", nargs="+", metavar="RESULT",
                   help="saved QuantResults (PATH of PATH.json + PATH.safetensors, from "
                        "`landscape quantize`)")
    data_arguments(p, segments=8, stride=False)
    p.add_argument("--path", type=parse_grid, default=parse_grid("0:1:5"),
                   help="coordinates t of the NLL along w0 + t (w_q - w0), START:STOP:COUNT (default 0:1:5)")
    p.add_argument("--curvature-t", type=parse_grid, default=CURVATURE_T_DEFAULT,
                   help="coordinates of the Rayleigh quotient along the path, START:STOP:COUNT "
                        "(default 0:1:3)")
    p.add_argument("--no-curvature", action="store_true", help="skip the curvature (Hessian-vector products)")
    p.add_argument("--curvature-segments", type=int, default=4,
                   help="first held-out segments used for Hessian products and eigenvectors (default 4)")
    p.add_argument("--eigenvectors", type=int, default=0,
                   help="project on the top K Hessian eigenvectors (Lanczos; default 0: none)")
    p.add_argument("--lanczos-steps", type=int, default=None,
                   help="Lanczos steps for the eigenvectors (default max(50, 2K)); not-converged pairs are "
                        "reported")
    p.add_argument("--krylov-dir", type=Path, default=None,
                   help="keep the Lanczos basis in memory-mapped files in this directory (large models)")
    p.add_argument("--between", type=label_pair, action="append", default=None, metavar="START=>END",
                   help="NLL along the segment between two results' endpoints (repeatable; labels as "
                        "printed); default every GPTQ and QAFT pair of a format")
    p.add_argument("--per-layer", action="store_true", help="also print per-layer norms and MSE")
    store_arguments(p, required=False, resume=False)
    progress_argument(p)


def run_compare(args: argparse.Namespace) -> int:
    check_eigenvector_settings(args.eigenvectors, args.lanczos_steps, args.curvature_segments,
                               "--curvature-segments")
    if args.krylov_dir is not None and not args.krylov_dir.is_dir():
        raise ValueError(f"--krylov-dir {args.krylov_dir} is not an existing directory")
    if args.no_curvature and not np.array_equal(args.curvature_t, CURVATURE_T_DEFAULT):
        raise ValueError("--curvature-t gives the points of a curvature that --no-curvature skips: drop one")
    if args.out is not None:
        check_store_path(args.out)  # writable and new, before the comparison (was: failed after it)
    points = len(args.results) * (len(args.path) + (0 if args.no_curvature else len(args.curvature_t)))
    work_limits(args).check_points("this comparison (points along the paths, over every result)", points)
    settings = ComparisonSettings(path_t=args.path, curvature_t=() if args.no_curvature else args.curvature_t,
                                  between=args.between or "gptq-qaft", batch_size=args.batch_size)
    stems = [quant_result_path(p) for p in args.results]
    missing = [str(s) for s in stems
               if not (os.path.exists(f"{s}.json") and os.path.exists(f"{s}.safetensors"))]
    if missing:
        raise ValueError(f"no saved quantized model at {missing} (each needs PATH.json and PATH.safetensors)")
    distinct_names(stems)  # the same result given twice is refused
    loaded = [QuantResult.load(s) for s in stems]
    results = dict(zip(result_labels(stems, [r.label for r in loaded]), loaded))

    lm, data = load_with_data(args)
    # each result and its direction beside the model, and (with --eigenvectors) a Krylov basis and products
    steps = args.lanczos_steps or 2 * args.eigenvectors
    basis = 0 if not args.eigenvectors or args.krylov_dir else steps + 7
    check_memory(lm, args, "this comparison", points, 2 * len(stems) + basis,
                 "fewer results, or --krylov-dir for the eigenvectors' basis")
    curvature_data = data.subset(slice(0, min(args.curvature_segments, data.n_segments)))
    eigenvectors = None
    if args.eigenvectors:
        check_same_base(lm.base, results)  # before the Lanczos run
        curvature = Curvature(lm.model, curvature_data, batch_size=args.batch_size,
                              progress=not args.no_progress)
        eigenvectors = curvature.spectrum(args.eigenvectors, 0, lanczos_steps=args.lanczos_steps,
                                          krylov_dir=args.krylov_dir)
    comparison = compare_displacements(lm.base, results, data, curvature_data=curvature_data,
                                       eigenvectors=eigenvectors, settings=settings,
                                       progress=not args.no_progress)
    if lm.info.caveat:
        print(f"caveat: {lm.info.caveat}\n")
    print(comparison.markdown(per_layer=args.per_layer))
    if args.out is not None:
        print(f"\nwrote {comparison.to_store(args.out)}")
    return 0


COMMANDS = (Command("compare",
                    "displacements of quantized models of one base: norms, cosines, eigen-projections, "
                    "curvature, NLL along paths, layer MSE", compare_arguments, run_compare),)
