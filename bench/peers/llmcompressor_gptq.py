"""Our GPTQ against llm-compressor's ``GPTQModifier`` on SmolLM2-135M, matched (issue #21, GPTQ peer).

Runs in ``bench/peers/.venv-gptq`` (llm-compressor pins transformers and compressed-tensors; ours are not
its). Both quantize the 210 decoder linears (lm_head untouched) to int<b>, asymmetric, one scale and zero
point per output channel (min-max of w0, range widened to include 0), act-order, damping 0.01 x mean diag
H, lazy blocks of 128 columns, on the same 128 calibration sequences x 256 tokens (``calibration_set``,
seed 0; llm-compressor's sampler is told not to shuffle and runs them 16 at a time, which changes only
the summation order of H) with sequential inputs (block i sees the outputs of the already quantized
blocks < i). Known differences that stay: ours is true-sequential inside a block (a layer's inputs
reflect the quantized layers before it), llm-compressor calibrates a whole decoder block on its
full-precision weights; ours solves in float64, theirs in float32; inputs never active (H_jj = 0) keep
their weights in ours and are zeroed in theirs. The control row ``ours_block_sequential`` (ours with
``true_sequential=False``) separates the first from the rest.

Reported per format: held-out NLL (16 x 256 wiki tokens) of w0, RTN, ours, llm-compressor's and the
control, the paired 95 % bootstrap interval of ours - llm-compressor (and of ours - control), the
fraction of weights on identical lattice points (overall and per decoder block), the cosine between the two
displacements w - w0,
whether both used the same scales and zero points (their zero point is signed: ours minus 2^(b-1)),
seconds of each.

    bench/peers/.venv-gptq/bin/python -m bench.peers.llmcompressor_gptq --out bench/peers/llmcompressor.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

from bench.peers.common import interval, smollm2_problem
from landscape.objectives import nll
from landscape.quant import gptq, rtn
from landscape.quant.formats import make_grid, parse_format
from landscape.quant.gptq import GPTQSettings
from landscape.weights import get_layer, quantizable_layers, swapped_weights, weight_matrix

DAMP, BLOCK = 0.01, 128
SETTINGS = {"damp": DAMP, "block_size": BLOCK, "act_order": True, "sequential": True,
            "granularity": "channel", "symmetric": False, "calibration": "128 x 256 tokens, seed 0",
            "heldout": "16 x 256 wiki tokens"}


def llmcompressor_gptq(model, calib, fmt: str) -> tuple[dict[str, torch.Tensor], dict, float]:
    """llm-compressor's GPTQ on a copy of ``model``: its lattice points and qparams per layer, seconds."""
    q = parse_format(fmt)
    student = copy.deepcopy(model)
    names = list(quantizable_layers(student))
    weights = QuantizationArgs(num_bits=q.bits, type="int", symmetric=False, strategy="channel",
                               actorder="static")
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], block_size=BLOCK, dampening_frac=DAMP)
    data = Dataset.from_dict({"input_ids": calib.tokens.tolist(),
                              "attention_mask": torch.ones_like(calib.tokens).tolist()})
    t0 = time.perf_counter()
    oneshot(model=student, dataset=data, recipe=recipe, num_calibration_samples=calib.n_segments,
            max_seq_length=calib.tokens.shape[1], shuffle_calibration_samples=False, batch_size=16,
            pipeline="sequential")
    seconds = time.perf_counter() - t0
    final, qparams = {}, {}
    for name in names:
        layer = get_layer(student, name)
        final[name] = layer.weight.detach().float().clone()  # GPTQ writes the dequantized lattice points
        qparams[name] = (layer.weight_scale.detach().float().reshape(-1, 1).clone(),
                         layer.weight_zero_point.detach().float().reshape(-1, 1).clone())
    return final, qparams, seconds


def lattice_agreement(w0, a, b, fmt: str, qparams=None) -> dict:
    """Identical lattice points of ``a`` and ``b``, cosine of their displacements, qparam agreement."""
    q = parse_format(fmt)
    same = total = 0
    max_scale_rel, zero_same, zero_total = 0.0, 0, 0
    per_block: dict[int, list[int]] = {}  # decoder block -> [identical, total]: where the two runs part
    for name, w in w0.items():
        grid = make_grid(w, q, name)
        tol = 1e-6 * grid.per_column(grid.scale)
        diff = (a[name] - b[name]).abs()
        identical = int(((diff <= tol) | (a[name] == b[name])).sum())
        same += identical
        total += w.numel()
        counts = per_block.setdefault(int(name.split(".layers.")[1].split(".")[0]), [0, 0])
        counts[0], counts[1] = counts[0] + identical, counts[1] + w.numel()
        if qparams is not None:
            scale, zero = qparams[name]
            max_scale_rel = max(max_scale_rel, float(((scale - grid.scale).abs() / grid.scale).max()))
            zero_same += int((zero + 2 ** (q.bits - 1) == grid.zero).sum())
            zero_total += zero.numel()
    d_a = torch.cat([(a[n] - w0[n]).flatten().double() for n in w0])
    d_b = torch.cat([(b[n] - w0[n]).flatten().double() for n in w0])
    out = {"identical_lattice_points": same / total,
           "identical_by_block": [round(i / t, 5) for _, (i, t) in sorted(per_block.items())],
           "cosine": float(torch.nn.functional.cosine_similarity(d_a, d_b, dim=0))}
    if qparams is not None:
        out.update(max_relative_scale_difference=max_scale_rel, identical_zero_points=zero_same / zero_total)
    return out


def compare_format(lm, calib, held, fmt: str, control: bool) -> dict:
    base = lm.base
    w0 = {n: weight_matrix(m).detach().clone() for n, m in quantizable_layers(lm.model).items()}
    theirs, qparams, theirs_s = llmcompressor_gptq(lm.model, calib, fmt)
    t0 = time.perf_counter()
    ours = gptq(base, calib, fmt, progress=False).weights
    ours_s = time.perf_counter() - t0
    runs = {"ours": ours, "llmcompressor": theirs, "rtn": rtn(base, fmt).weights}
    seconds = {"ours": ours_s, "llmcompressor": theirs_s}
    if control:
        t0 = time.perf_counter()
        runs["ours_block_sequential"] = gptq(base, calib, fmt, GPTQSettings(true_sequential=False),
                                             progress=False).weights
        seconds["ours_block_sequential"] = time.perf_counter() - t0
    assert set(theirs) == set(ours) == set(w0), "the two methods quantized different layers"
    results = {"w0": nll(lm.model, held, batch_size=4)}
    for label, weights in runs.items():
        with swapped_weights(lm.model, weights):
            results[label] = nll(lm.model, held, batch_size=4)
    row = {"format": fmt, "layers": len(w0), "nll": {k: v.value for k, v in results.items()},
           "difference_ours_minus_llmcompressor": interval(results["llmcompressor"], results["ours"]),
           "llmcompressor_vs_ours": lattice_agreement(w0, theirs, ours, fmt, qparams),
           "seconds": seconds}
    if control:
        ctl = runs["ours_block_sequential"]
        row["difference_ours_minus_block_sequential"] = interval(results["ours_block_sequential"],
                                                                 results["ours"])
        row["difference_block_sequential_minus_llmcompressor"] = interval(results["llmcompressor"],
                                                                          results["ours_block_sequential"])
        row["llmcompressor_vs_block_sequential"] = lattice_agreement(w0, theirs, ctl, fmt)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["int4", "int3"])
    p.add_argument("--no-control", action="store_true", help="skip ours with true_sequential=False")
    p.add_argument("--out", type=Path, default=Path("bench/peers/llmcompressor.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lm, calib, held = smollm2_problem()
    rows = []
    for fmt in args.formats:
        rows.append(compare_format(lm, calib, held, fmt, not args.no_control))
        print(json.dumps(rows[-1]), flush=True)
    versions = {pkg: version(pkg) for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"versions": versions, "settings": SETTINGS,
                                    "calibration": calib.provenance(), "heldout": held.provenance(),
                                    "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
