"""How far bf16 results may be trusted: the study's key numbers in bfloat16 against float32, same model.

For each dtype, one resumable store (``<out>/<model>/precision-<dtype>-<hash>.h5``) holds: NLL(w0); RTN and
GPTQ at int4 and int3 (held-out NLL of each); the basin radius R(w0) along 4 random filter-normalised
directions; and the top Hessian eigenvalue of one decoder block (Lanczos). The report prints each number in
both dtypes with its 95 % segment-bootstrap interval and the paired bf16 − fp32 difference (same segments).

Usage::

    python -m analyses.precision                       # SmolLM2-135M on the CPU (about an hour on 2 cores)
    python -m analyses.precision --model ref-tiny --segments 4 --seq-len 64 --calib-sequences 16   # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.session import corpus_of, load_model_of, model_options, model_slug
from landscape.cache import stable_hash
from landscape.cli.errors import script_main
from landscape.curvature import Curvature
from landscape.data import calibration_set, corpus_label, heldout_set
from landscape.engine.basin import RadiusSearch, basin_radius
from landscape.engine.directions import random_direction
from landscape.models import LoadedModel
from landscape.objectives import nll
from landscape.quant import gptq, rtn
from landscape.stats import difference_interval, token_mean_interval
from landscape.store import StoreRecord, read_store, run_tasks
from landscape.weights import quantizable_layers, swapped_weights

DTYPES = ("float32", "bfloat16")
QUANTIZERS = {"rtn": rtn, "gptq": gptq}
FORMATS = ("int4", "int3")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The study's key numbers in bfloat16 against float32.")
    model_options(p, dtype=False)  # both dtypes, one after the other
    p.add_argument("--segments", type=int, default=16, help="held-out segments of every NLL (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per segment (default 512)")
    p.add_argument("--calib-sequences", type=int, default=128, help="GPTQ calibration budget (default 128)")
    p.add_argument("--directions", type=int, default=4, help="random directions for R(w0) (default 4)")
    p.add_argument("--radius-segments", type=int, default=4, help="segments of R(w0) (default 4)")
    p.add_argument("--lanczos-steps", type=int, default=20, help="Lanczos steps (default 20)")
    p.add_argument("--out", type=Path, default=Path("figures/data"), help="store folder (figures/data)")
    return p.parse_args(argv)


def nll_record(lm: LoadedModel, held, weights: dict[str, torch.Tensor] | None = None) -> StoreRecord:
    with swapped_weights(lm.model, weights or {}):
        result = nll(lm.model, held, batch_size=4, model_name=lm.info.name)
    arrays = {"segment_nll_sum": result.segment_nll_sum, "segment_tokens": result.segment_tokens}
    return StoreRecord({"kind": "nll", "convention": result.convention.to_dict()}, arrays=arrays)


def tasks_for(lm: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    ctx = lm.info.context_length
    held = heldout_set(lm.tokenizer, args.seq_len, corpus_of(args), args.segments, context_length=ctx)
    calib = calibration_set(lm.tokenizer, args.calib_sequences, args.seq_len, 0, corpus_of(args),
                            context_length=ctx)
    tasks: dict[str, Any] = {"w0": lambda: nll_record(lm, held)}
    for method, quantize in QUANTIZERS.items():
        for fmt in FORMATS:
            def measure(quantize=quantize, fmt=fmt) -> StoreRecord:
                result = (quantize(lm.base, fmt) if quantize is rtn
                          else quantize(lm.base, calib, fmt, batch_size=4))
                return nll_record(lm, held, result.weights)

            tasks[f"{method}-{fmt}"] = measure

    def radii() -> StoreRecord:
        data = held.subset(range(args.radius_segments))
        values = [basin_radius(lm.base, random_direction(lm.base, seed), data=data).relative_radius
                  for seed in range(args.directions)]
        return StoreRecord({"kind": "radius", "search": RadiusSearch().__dict__},
                           arrays={"relative_radius": np.asarray(values)})

    def top_eigenvalue() -> StoreRecord:
        block0 = [n for n in quantizable_layers(lm.model) if ".0." in n]  # the first decoder block
        curvature = Curvature(lm.model, held.subset(range(2)), layers=block0, progress=False)
        top = curvature.spectrum(k=1, k_bottom=0, lanczos_steps=args.lanczos_steps,
                                 return_eigenvectors=False).top
        return StoreRecord({"kind": "top_eigenvalue", "lanczos_steps": args.lanczos_steps},
                           arrays={"eigenvalue": top.eigenvalues[:1], "residual": top.residuals[:1]})

    tasks["radius"], tasks["top_eigenvalue"] = radii, top_eigenvalue
    return tasks


def store_path(args: argparse.Namespace, dtype: str) -> Path:
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    return args.out / model_slug(args.model) / f"precision-{dtype}-{stable_hash(settings, 10)}.h5"


def interval_text(sums: np.ndarray, tokens: np.ndarray) -> str:
    i = token_mean_interval(sums, tokens)
    return f"{i.value:.4f} [{i.low:.4f}, {i.high:.4f}]"


def report(stores: dict[str, Any]) -> str:
    a, b = (stores[d].arrays for d in DTYPES)
    lines = ["| quantity | float32 | bfloat16 | bf16 − fp32 (paired 95 %) |", "|---|---|---|---|"]
    for task in ["w0", *(f"{m}-{f}" for m in QUANTIZERS for f in FORMATS)]:
        sa, ta = a[f"{task}/segment_nll_sum"], a[f"{task}/segment_tokens"]
        sb, tb = b[f"{task}/segment_nll_sum"], b[f"{task}/segment_tokens"]
        diff = difference_interval(sa, ta, sb, tb)  # B - A: bf16 - fp32
        lines.append(f"| NLL {task} (nats/token) | {interval_text(sa, ta)} | {interval_text(sb, tb)} | "
                     f"{diff.value:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] |")
    ra, rb = a["radius/relative_radius"], b["radius/relative_radius"]
    rel = [f"{100 * r:.2g} %" if r > 1e-9 else "0 (same bracket)" for r in np.abs(rb - ra) / ra]
    lines.append(f"| R(w0)/‖w0‖, {len(ra)} directions (median, min-max) | {np.median(ra):.4g} "
                 f"({ra.min():.4g}-{ra.max():.4g}) | {np.median(rb):.4g} ({rb.min():.4g}-{rb.max():.4g}) | "
                 f"per direction: {', '.join(rel)} (bisection to {100 * RadiusSearch().tolerance:g} %) |")
    ea, eb = float(a["top_eigenvalue/eigenvalue"][0]), float(b["top_eigenvalue/eigenvalue"][0])
    lines.append(f"| top Hessian eigenvalue, block 0 | {ea:.5g} | {eb:.5g} | "
                 f"{100 * (eb - ea) / abs(ea):+.2g} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = {}
    for dtype in DTYPES:
        path = store_path(args, dtype)
        print(f"{dtype}: {path}", flush=True)
        if path.exists():  # finished earlier: no model to load
            stores[dtype] = read_store(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        lm = load_model_of(argparse.Namespace(**vars(args), dtype=dtype))
        tasks = tasks_for(lm, args)
        provenance = {"kind": "precision", "model": lm.info.name, "dtype": dtype, "device": str(args.device),
                      "tasks": list(tasks), "settings": {k: str(v) for k, v in vars(args).items()}}
        stores[dtype] = run_tasks(path, provenance, tasks)[0]
        del lm
    table = report(stores)
    conv = stores["float32"].arrays
    n_tokens = int(np.sum(conv["w0/segment_tokens"]))
    print(f"\n{args.model} on {args.device}: NLL token-mean over {args.segments} x {args.seq_len} held-out "
          f"{corpus_label(corpus_of(args))} tokens ({n_tokens:,} scored, stride {args.seq_len}); R(w0) on "
          f"the first {args.radius_segments} segments; eigenvalue on 2 segments.\n")
    print(table)
    return 0 if all(math.isfinite(float(v)) for v in conv["w0/segment_nll_sum"]) else 1


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.precision"))
