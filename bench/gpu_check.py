"""The GPU check (``make gpu-check``): the same measurements on an accelerator and on the CPU, compared.

Runs, on ``--device`` (default ``cuda``) and on ``--reference`` (default ``cpu``), in float32:

1. the tiny profile of every figure (``run_all --tiny``) into two folders, then compares every quantization
   table's NLLs;
2. a slice of the study on ``--model`` (default SmolLM2-135M): NLL(w0); RTN int4 (its lattice codes); GPTQ
   int4 on the first ``--gptq-blocks`` decoder blocks (its layer MSEs); QAFT for 8 steps on those blocks; the
   basin radius along 2 random directions; 10 Lanczos steps on one block's Hessian.

Tolerances (a failure exits 1): NLL within 1e-3 nats; RTN codes identical; GPTQ layer MSE within 1e-4
relative; QAFT's final NLL within 1e-3; radii and the top eigenvalue within 1 % relative (an accelerator's
float32 matmuls sum in another order, and TF32 is off). Each measurement's time is printed on both devices.

Usage::

    python -m bench.gpu_check                          # on a CUDA machine: cuda against cpu (about 5 min)
    python -m bench.gpu_check --report bench/gpu.md    # also write the table as markdown
    python -m bench.gpu_check --device cpu --model ref-tiny --segments 2 --seq-len 32  # the logic, on a CPU

Without CUDA, ``--device cuda`` stops at once with the reason (exit 2).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses import run_all
from landscape.curvature import Curvature
from landscape.data import calibration_set, heldout_set
from landscape.engine.basin import RadiusSearch, basin_radius
from landscape.engine.directions import random_direction
from landscape.models import DeviceError, LoadedModel, load_model, resolve_device
from landscape.objectives import nll
from landscape.quant import FinetuneSettings, gptq, qaft, rtn
from landscape.store import read_store
from landscape.weights import quantizable_layers, swapped_weights


@dataclass
class Check:
    """One measurement on both devices: its values, times and whether they agree."""

    name: str
    value: str
    reference: str
    seconds: float
    reference_seconds: float
    ok: bool
    detail: str = ""


@dataclass
class Report:
    device: str
    reference: str
    checks: list[Check] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"GPU check: {self.device} against {self.reference} (float32)", "",
                 f"| measurement | {self.device} | {self.reference} | {self.device} s | {self.reference} s "
                 f"| agree |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            agree = "yes" if c.ok else "NO: " + c.detail
            lines.append(f"| {c.name} | {c.value} | {c.reference} | {c.seconds:.1f} "
                         f"| {c.reference_seconds:.1f} | {agree} |")
        return "\n".join(lines)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time, the device synchronised at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def both(name: str, models: list[tuple[torch.device, LoadedModel]], measure: Callable[[LoadedModel], Any],
         compare: Callable[[Any, Any], tuple[bool, str]], show: Callable[[Any], str]) -> Check:
    """``measure`` on the device and on the reference, compared."""
    (device, lm), (reference, lm_ref) = models
    value, seconds = timed(lambda: measure(lm), device)
    ref_value, ref_seconds = timed(lambda: measure(lm_ref), reference)
    ok, detail = compare(value, ref_value)
    check = Check(name, show(value), show(ref_value), seconds, ref_seconds, ok, detail)
    print(f"  {name}: {check.value} vs {check.reference} ({seconds:.1f} s vs {ref_seconds:.1f} s) "
          f"{'ok' if ok else 'MISMATCH ' + detail}", flush=True)
    return check


def within(abs_tol: float = 0.0, rel_tol: float = 0.0) -> Callable[[float, float], tuple[bool, str]]:
    def compare(a: float, b: float) -> tuple[bool, str]:
        diff = abs(a - b)
        ok = (math.isinf(a) and a == b) or diff <= max(abs_tol, rel_tol * abs(b))
        return ok, f"differ by {diff:.3g}"
    return compare


def study_slice(args: argparse.Namespace, device: torch.device, reference: torch.device) -> list[Check]:
    """NLL, RTN, GPTQ, QAFT, radius and Lanczos on ``args.model``, on both devices."""
    models = [(d, load_model(args.model, torch.float32, d)) for d in (device, reference)]
    lm = models[0][1]
    ctx = lm.info.context_length
    held = heldout_set(lm.tokenizer, args.seq_len, "wiki", args.segments, context_length=ctx)
    calib = calibration_set(lm.tokenizer, args.calib_sequences, args.seq_len, 0, context_length=ctx)
    names = list(quantizable_layers(lm.model))
    # the first decoder blocks' layers (names hold ".<block index>.")
    layers = [n for n in names if any(f".{i}." in n for i in range(args.gptq_blocks))] or names[:4]
    checks = [
        both("NLL(w0), nats/token", models, lambda m: nll(m.model, held, batch_size=4).value,
             within(abs_tol=1e-3), lambda v: f"{v:.5f}"),
        both("RTN int4 lattice points", models,
             lambda m: {n: w.cpu() for n, w in rtn(m.base, "int4").weights.items()},
             lambda a, b: (all(torch.equal(a[n], b[n]) for n in a),
                           f"{sum(int((a[n] != b[n]).sum()) for n in a)} weights differ"),
             lambda v: f"{sum(t.numel() for t in v.values()):,} weights"),
        both(f"GPTQ int4 layer MSE ({len(layers)} layers)", models,
             lambda m: gptq(m.base, calib, "int4", layers=layers, batch_size=4, progress=False).layer_mse,
             lambda a, b: (all(abs(a[n] - b[n]) <= 1e-4 * abs(b[n]) + 1e-12 for n in a),
                           f"max relative {max(abs(a[n] - b[n]) / max(abs(b[n]), 1e-30) for n in a):.2g}"),
             lambda v: f"mean {np.mean(list(v.values())):.4g}"),
        both("QAFT int4, 8 steps: NLL after", models,
             lambda m: _qaft_nll(m, calib, held, layers), within(abs_tol=1e-3), lambda v: f"{v:.5f}"),
    ]
    for seed in range(2):
        def radius(m: LoadedModel, s: int = seed) -> float:
            direction = random_direction(m.base, s, layers=layers)
            return basin_radius(m.base, direction, data=held, search=RadiusSearch(tolerance=0.02)).radius

        checks.append(both(f"R(w0), random direction {seed}", models, radius, within(rel_tol=1e-2),
                           lambda v: f"{v:.4g}"))
    checks.append(both("top Hessian eigenvalue (10 Lanczos steps)", models,
                       lambda m: float(Curvature(m.model, held.subset(range(min(2, held.n_segments))),
                                                 layers=layers[:2], progress=False)
                                       .spectrum(k=1, k_bottom=0, lanczos_steps=10,
                                                 return_eigenvectors=False).top.eigenvalues[0]),
                       within(rel_tol=1e-2), lambda v: f"{v:.5g}"))
    return checks


def _qaft_nll(lm: LoadedModel, calib, held, layers) -> float:
    settings = FinetuneSettings(lr=1e-5, steps=8, batch_size=4)
    result = qaft(lm.base, calib, "int4", settings=settings, layers=layers, progress=False)
    with swapped_weights(lm.model, result.weights):
        return nll(lm.model, held, batch_size=4).value


def figure_tables(out: Path) -> dict[str, float]:
    """Every quantization table's wiki NLL by (table, label), from the stores of a ``run_all`` folder."""
    values = {}
    for path in sorted((out / "data").rglob("quant_table.h5")):
        store = read_store(path)
        for label, value in zip(store.arrays["variants/label"], store.arrays["nll/wiki"]):
            values[f"{path.parent.name}/{label}"] = float(value)
    return values


def tiny_figures(device: torch.device, reference: torch.device) -> Check:
    """``run_all --tiny`` on both devices; the tables' NLLs compared."""
    with tempfile.TemporaryDirectory() as tmp:
        runs, seconds = [], []
        for role, d in (("device", device), ("reference", reference)):
            out = Path(tmp) / role
            argv = ["--tiny", "--out", str(out), "--device", str(d), "--no-png", "--no-progress"]
            code, took = timed(lambda a=argv: run_all.main(a), d)
            if code != 0:
                return Check("tiny profile, every figure", f"exit {code}", "", took, 0.0, False,
                             f"run_all failed on {d}")
            runs.append(figure_tables(out))
            seconds.append(took)
    a, b = runs
    worst = max((abs(a[k] - b[k]) for k in a), default=math.inf)
    ok = a.keys() == b.keys() and worst <= 1e-3
    check = Check("tiny profile, every figure: table NLLs", f"{len(a)} rows", f"{len(b)} rows",
                  seconds[0], seconds[1], ok, f"max difference {worst:.3g}")
    print(f"  {check.name}: max difference {worst:.3g} ({check.seconds:.1f} s vs "
          f"{check.reference_seconds:.1f} s) {'ok' if ok else 'MISMATCH'}", flush=True)
    return check


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The same measurements on an accelerator and on the CPU.")
    p.add_argument("--device", default="cuda", help="the accelerator (default cuda)")
    p.add_argument("--reference", default="cpu", help="what it is compared with (default cpu)")
    p.add_argument("--model", default="smollm2-135m", help="the study slice's model (default smollm2-135m)")
    p.add_argument("--segments", type=int, default=8, help="held-out segments (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per segment (default 512)")
    p.add_argument("--calib-sequences", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--gptq-blocks", type=int, default=2, help="decoder blocks quantized (default 2)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip the tiny figure run")
    p.add_argument("--report", type=Path, default=None, help="also write the table here (markdown)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, reference = resolve_device(args.device), resolve_device(args.reference)
    except DeviceError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    report = Report(str(device), str(reference))
    print(f"gpu-check: {device} against {reference}, torch {torch.__version__}", flush=True)
    if args.figures:
        report.checks.append(tiny_figures(device, reference))
    report.checks += study_slice(args, device, reference)
    table = report.markdown()
    print("\n" + table)
    if args.report is not None:
        args.report.write_text(table + "\n", encoding="utf-8")
    return 0 if all(c.ok for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
