"""``landscape compare``: the displacement report of saved quantized models of one base model.

Example::

    landscape quantize ref-tiny --method rtn  --format int4 --out q/rtn.int4
    landscape quantize ref-tiny --method gptq --format int4 --out q/gptq.int4
    landscape quantize ref-tiny --method qaft --format int4 --out q/qaft.int4
    landscape compare ref-tiny q/rtn.int4 q/gptq.int4 q/qaft.int4 --eigenvectors 4 --out compare.h5

Every result is loaded and checked (files present, same base weights as the model) before any evaluation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from landscape.cli import command, default_seq_len
from landscape.cli.scan import parse_grid


def _label_pair(text: str) -> tuple[str, str]:
    """``START=>END`` (two result labels) -> ``(START, END)``."""
    start, sep, end = text.partition("=>")
    if not sep or not start.strip() or not end.strip():
        raise argparse.ArgumentTypeError(f"a segment is START=>END with two result labels (e.g. 'gptq int4=>qaft "
                                         f"int4'), got {text!r}")
    return start.strip(), end.strip()


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m, ref-small, ref-tiny, a hub id or a local directory")
    p.add_argument("results", nargs="+", metavar="RESULT",
                   help="saved QuantResults (PATH of PATH.json + PATH.safetensors, from `landscape quantize`)")
    p.add_argument("--corpus", default="wiki", help="held-out corpus of the NLLs (wiki, sotu; default wiki)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per segment (default 512 smollm2, else 256)")
    p.add_argument("--segments", type=int, default=8, help="held-out segments of every NLL (default 8)")
    p.add_argument("--batch-size", type=int, default=4, help="segments per forward pass (default 4)")
    p.add_argument("--path", type=parse_grid, default=parse_grid("0:1:5"),
                   help="coordinates t of the NLL along w0 + t (w_q - w0), START:STOP:COUNT (default 0:1:5)")
    p.add_argument("--curvature-t", type=parse_grid, default=parse_grid("0:1:3"),
                   help="coordinates of the Rayleigh quotient along the path, START:STOP:COUNT (default 0:1:3)")
    p.add_argument("--no-curvature", action="store_true", help="skip the curvature (Hessian-vector products)")
    p.add_argument("--curvature-segments", type=int, default=4,
                   help="first held-out segments used for Hessian products and eigenvectors (default 4)")
    p.add_argument("--eigenvectors", type=int, default=0,
                   help="project on the top K Hessian eigenvectors (Lanczos; default 0: none)")
    p.add_argument("--lanczos-steps", type=int, default=None,
                   help="Lanczos steps for the eigenvectors (default max(50, 2K)); not-converged pairs are reported")
    p.add_argument("--krylov-dir", type=Path, default=None,
                   help="keep the Lanczos basis in memory-mapped files in this directory (large models)")
    p.add_argument("--between", type=_label_pair, action="append", default=None, metavar="START=>END",
                   help="NLL along the segment between two results' endpoints (repeatable; labels as printed); "
                        "default every GPTQ and QAFT pair of a format")
    p.add_argument("--per-layer", action="store_true", help="also print per-layer norms and MSE")
    p.add_argument("--out", type=Path, default=None, help="also write the comparison to this HDF5 store")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("compare", "displacements of quantized models of one base: norms, cosines, eigen-projections, "
                    "curvature, NLL along paths, layer MSE")
def cmd_compare(args: argparse.Namespace) -> int:
    from landscape.data import heldout_set
    from landscape.engine.directions import quant_result_path
    from landscape.models import load_model
    from landscape.quant.result import QuantResult
    from landscape.studies.compare import ComparisonSettings, compare_displacements

    for name in ("segments", "batch_size", "curvature_segments"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eigenvectors < 0:
        raise ValueError(f"--eigenvectors must be >= 0, got {args.eigenvectors}")
    if args.lanczos_steps is not None and args.lanczos_steps < max(args.eigenvectors, 1):
        raise ValueError(f"--lanczos-steps must be >= --eigenvectors ({args.eigenvectors}), got {args.lanczos_steps}")
    if args.krylov_dir is not None and not args.krylov_dir.is_dir():
        raise ValueError(f"--krylov-dir {args.krylov_dir} is not an existing directory")
    if args.out is not None and (args.out.exists() or Path(f"{args.out}.partial").exists()):
        raise ValueError(f"{args.out} already exists: choose another --out or remove it")
    stems = [quant_result_path(p) for p in args.results]
    missing = [str(s) for s in stems if not (os.path.exists(f"{s}.json") and os.path.exists(f"{s}.safetensors"))]
    if missing:
        raise ValueError(f"no saved quantized model at {missing} (each needs PATH.json and PATH.safetensors)")
    loaded = [QuantResult.load(s) for s in stems]
    results = {}
    for stem, result in zip(stems, loaded):
        label = result.label if [r.label for r in loaded].count(result.label) == 1 else f"{result.label} ({stem.name})"
        results[label] = result

    lm = load_model(args.model)
    seq_len = args.seq_len or default_seq_len(lm.info)
    data = heldout_set(lm.tokenizer, seq_len, args.corpus, args.segments, context_length=lm.info.context_length)
    curvature_data = data.subset(slice(0, min(args.curvature_segments, data.n_segments)))
    eigenvectors = None
    if args.eigenvectors:
        from landscape.curvature import Curvature
        from landscape.studies.compare import check_same_base

        check_same_base(lm.model, results)  # before the Lanczos run
        curvature = Curvature(lm.model, curvature_data, batch_size=args.batch_size,
                              progress=not args.no_progress)
        eigenvectors = curvature.spectrum(args.eigenvectors, 0, lanczos_steps=args.lanczos_steps,
                                          krylov_dir=args.krylov_dir)
    settings = ComparisonSettings(path_t=args.path, curvature_t=() if args.no_curvature else args.curvature_t,
                                  between=args.between or "gptq-qaft", batch_size=args.batch_size)
    comparison = compare_displacements(lm.base, results, data, curvature_data=curvature_data,
                                       eigenvectors=eigenvectors, settings=settings, progress=not args.no_progress)
    if lm.info.caveat:
        print(f"caveat: {lm.info.caveat}\n")
    print(comparison.markdown(per_layer=args.per_layer))
    if args.out is not None:
        print(f"\nwrote {comparison.to_store(args.out)}")
    return 0


cmd_compare.add_arguments = _compare_args
