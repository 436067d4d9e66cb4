"""QAFT with SGD (heavy-ball momentum) against AdamW: what the leaner optimiser costs in held-out NLL.

AdamW keeps two float32 moments of every trained weight, SGD with momentum one, so ``--optimizer sgd`` saves
a copy of the trained layers (a 7B model's QAFT state: 4 copies instead of 5). This study trains QAFT at int4
and int3 with each optimiser on the same 128 calibration sequences (same batches, steps, schedule and seed)
and reports each held-out NLL with its 95 % segment-bootstrap interval and the paired SGD − AdamW difference.

SGD's learning rate is in weight per unit gradient, not AdamW's weight per step. ``--sgd-lr auto`` matches
the typical step: AdamW moves a weight by about ``lr`` per step, SGD with momentum ``m`` by
``lr_sgd * g / (1 - m)`` in steady state, so ``lr_sgd = lr * (1 - m) / rms(g)`` with ``g`` the gradient of
the calibration NLL over every trained weight at the RTN start (one batch of the run's size). The rule
matches the step's size on average only: SGD does not rescale each weight's step as Adam does.

One resumable store: ``<out>/<model>/optimizer-<hash>.h5``.

Usage::

    python -m analyses.optimizer                     # SmolLM2-135M: four QAFT runs, about 20 min on 2 cores
    python -m analyses.optimizer --model ref-tiny --segments 4 --seq-len 32 --calib-sequences 8   # seconds
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
from landscape.data import TokenSet, calibration_set, corpus_label, heldout_set
from landscape.models import LoadedModel
from landscape.objectives import nll
from landscape.quant import rtn
from landscape.quant.qaft import FinetuneSettings, qaft
from landscape.quant.training import token_losses
from landscape.stats import difference_interval, token_mean_interval
from landscape.store import StoreRecord, read_store, run_tasks
from landscape.weights import swapped_weights

FORMATS = ("int4", "int3")
OPTIMIZERS = ("adamw", "sgd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="QAFT with SGD (momentum) against AdamW: held-out NLL.")
    model_options(p)
    p.add_argument("--segments", type=int, default=16, help="held-out segments of every NLL (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--calib-sequences", type=int, default=128, help="training sequences (default 128)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW's learning rate (default 3e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (default 0.9)")
    p.add_argument("--sgd-lr", default="auto",
                   help="SGD's learning rate, or auto: lr * (1 - momentum) / rms(gradient at RTN) (default)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per pass (default 1)")
    p.add_argument("--out", type=Path, default=Path("figures/data"), help="store folder (figures/data)")
    args = p.parse_args(argv)
    if args.sgd_lr != "auto":
        try:
            args.sgd_lr = float(args.sgd_lr)
        except ValueError:
            p.error(f"--sgd-lr must be a number > 0 or auto, got {args.sgd_lr!r}")
        if not args.sgd_lr > 0:
            p.error(f"--sgd-lr must be a number > 0 or auto, got {args.sgd_lr!r}")
    return args


def gradient_rms(lm: LoadedModel, calib: TokenSet, start: dict[str, torch.Tensor], batch_size: int) -> float:
    """Root mean square of the calibration NLL's gradient over every weight of ``start``'s layers, at the
    model with ``start`` swapped in (the first ``batch_size`` sequences)."""
    batch = calib.subset(range(batch_size))
    leaves = [lm.model.get_submodule(n).weight for n in start]
    was = [p.requires_grad for p in lm.model.parameters()]
    with swapped_weights(lm.model, start):
        try:
            for p in lm.model.parameters():
                p.requires_grad_(False)
            for leaf in leaves:
                leaf.requires_grad_(True)
            logits = lm.model(input_ids=batch.tokens.to(leaves[0].device)).logits
            loss, _ = token_losses(logits, batch.tokens.to(logits.device), batch.score_mask.to(logits.device))
            grads = torch.autograd.grad(loss, leaves)
        finally:
            for p, flag in zip(lm.model.parameters(), was):
                p.requires_grad_(flag)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) / sum(g.numel() for g in grads))


def settings_for(args: argparse.Namespace, optimizer: str, sgd_lr: float) -> FinetuneSettings:
    common = {"epochs": 1.0, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
              "seed": 0}
    if optimizer == "sgd":
        return FinetuneSettings(lr=sgd_lr, optimizer="sgd", momentum=args.momentum, **common)
    return FinetuneSettings(lr=args.lr, **common)


def nll_record(lm: LoadedModel, held: TokenSet, weights: dict[str, torch.Tensor],
               settings: FinetuneSettings | None = None, seconds: float = 0.0) -> StoreRecord:
    with swapped_weights(lm.model, weights):
        result = nll(lm.model, held, batch_size=4, model_name=lm.info.name)
    arrays = {"segment_nll_sum": result.segment_nll_sum, "segment_tokens": result.segment_tokens}
    if settings is not None:
        arrays.update(lr=np.float64(settings.lr), seconds=np.float64(seconds))
    return StoreRecord({"kind": "nll", "convention": result.convention.to_dict(),
                        "settings": settings.to_dict() if settings else None}, arrays=arrays)


def tasks_for(lm: LoadedModel, args: argparse.Namespace, calib: TokenSet, held: TokenSet) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for fmt in FORMATS:
        start = rtn(lm.base, fmt).weights
        sgd_lr = args.sgd_lr if args.sgd_lr != "auto" else (
            args.lr * (1 - args.momentum) / gradient_rms(lm, calib, start, args.batch_size))
        tasks[f"rtn-{fmt}"] = lambda start=start: nll_record(lm, held, start)
        for optimizer in OPTIMIZERS:
            def run(fmt=fmt, optimizer=optimizer, sgd_lr=sgd_lr) -> StoreRecord:
                settings = settings_for(args, optimizer, sgd_lr)
                result = qaft(lm.base, calib, fmt, settings, progress=True)
                return nll_record(lm, held, result.weights, settings, result.seconds)
            tasks[f"{optimizer}-{fmt}"] = run
    return tasks


def store_path(args: argparse.Namespace) -> Path:
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    return args.out / model_slug(args.model) / f"optimizer-{stable_hash(settings, 10)}.h5"


def report(arrays: dict[str, np.ndarray]) -> str:
    lines = ["| format | RTN (start) | QAFT AdamW | QAFT SGD | SGD − AdamW (paired 95 %) | lr AdamW / SGD |",
             "|---|---|---|---|---|---|"]

    def mean(task: str) -> str:
        i = token_mean_interval(arrays[f"{task}/segment_nll_sum"], arrays[f"{task}/segment_tokens"])
        return f"{i.value:.4f} [{i.low:.4f}, {i.high:.4f}]"

    for fmt in FORMATS:
        a, s = f"adamw-{fmt}", f"sgd-{fmt}"
        diff = difference_interval(arrays[f"{a}/segment_nll_sum"], arrays[f"{a}/segment_tokens"],
                                   arrays[f"{s}/segment_nll_sum"], arrays[f"{s}/segment_tokens"])
        lines.append(f"| {fmt} | {mean(f'rtn-{fmt}')} | {mean(a)} | {mean(s)} | "
                     f"{diff.value:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] | "
                     f"{float(arrays[f'{a}/lr']):.3g} / {float(arrays[f'{s}/lr']):.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = store_path(args)
    print(f"store: {path}", flush=True)
    if path.exists():  # finished earlier: no model to load
        stored = read_store(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        lm = load_model_of(args)
        ctx = lm.info.context_length
        held = heldout_set(lm.tokenizer, args.seq_len, corpus_of(args), args.segments, context_length=ctx)
        calib = calibration_set(lm.tokenizer, args.calib_sequences, args.seq_len, 0, corpus_of(args),
                                context_length=ctx)
        tasks = tasks_for(lm, args, calib, held)
        provenance = {"kind": "optimizer", "model": lm.info.name, "dtype": str(args.dtype),
                      "device": str(args.device), "tasks": list(tasks),
                      "settings": {k: str(v) for k, v in vars(args).items()}}
        stored = run_tasks(path, provenance, tasks)[0]
    scored = int(np.sum(stored.arrays["rtn-int4/segment_tokens"]))
    print(f"\n{args.model}: QAFT, 1 epoch over {args.calib_sequences} x {args.seq_len} calibration tokens in "
          f"batches of {args.batch_size}; NLL in nats per scored token, token-mean over {args.segments} x "
          f"{args.seq_len} held-out {corpus_label(corpus_of(args))} tokens ({scored:,} scored, stride "
          f"{args.seq_len})\n")
    print(report(stored.arrays))
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.optimizer"))
