"""Our QAFT against torchao's quantization-aware training on SmolLM2-135M, matched (``make peers``).

Runs in ``bench/peers/.venv`` (torchao's pins are not ours). Both start with latent weights at w0 (so the
first forward pass of each is the RTN model, and every weight keeps its distance to its rounding boundary),
train the same 210 decoder linears on the same 128 calibration sequences in the same batches (seed 0),
with AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), the same peak rate, linear-warm-up-free cosine
schedule and step count, token-mean NLL, micro-batches of one sequence; torchao fake-quantizes through its
``QATConfig(weight_config=IntxFakeQuantizeConfig(intN, per channel, asymmetric, is_dynamic=False))`` with
our scales and zero points injected (its signed codes: our zero point minus 2^(b-1)), so both train on one
lattice.
Reported per format: held-out NLL of each (16 x 256 wiki tokens) with the paired 95 % bootstrap interval of
the difference, the fraction of identical lattice points, the cosine between the two displacements, seconds.

    bench/peers/.venv/bin/python -m bench.peers.torchao_qat --out bench/PEERS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torchao
from torchao.quantization import quantize_
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
from torchao.quantization.qat.linear import FakeQuantizedLinear

from bench.peers.common import interval, smollm2_problem
from landscape.objectives import nll
from landscape.quant import rtn
from landscape.quant.formats import make_grid, parse_format
from landscape.quant.qaft import ADAMW_BETAS, ADAMW_EPS, FinetuneSettings, qaft
from landscape.quant.training import (
    learning_rate_at,
    micro_batches,
    scored_tokens,
    token_losses,
    training_batches,
)
from landscape.weights import get_layer, quantizable_layers, swapped_weights, weight_matrix

INT_DTYPES = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}
SETTINGS = FinetuneSettings(lr=3e-4, epochs=1.0, batch_size=4, seed=0, micro_batch_size=1)


def torchao_qat(model, calib, fmt: str, start: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], float, float]:
    """torchao's QAT of ``model`` (a copy is trained, latent weights from w0) on our grid; its final lattice
    points, seconds, and the fraction of weights whose first fake-quantized value is not RTN's (``start``):
    near-ties only, since it multiplies by 1/scale where we divide by the scale (over 0.1 % is an error)."""
    q = parse_format(fmt)
    student = copy.deepcopy(model)
    names = list(start)
    for p in student.parameters():
        p.requires_grad_(False)
    config = IntxFakeQuantizeConfig(INT_DTYPES[q.bits], "per_channel", is_symmetric=False, is_dynamic=False)
    quantize_(student, QATConfig(weight_config=config, step="prepare"),
              filter_fn=lambda module, fqn: fqn in names)
    offset = 2 ** (q.bits - 1)
    first_differences = total = 0
    for name in names:
        layer = get_layer(student, name)
        assert isinstance(layer, FakeQuantizedLinear), (name, type(layer))
        fq = layer.weight_fake_quantizer
        fq(layer.weight)  # computes its own min-max parameters once; ours replace them
        grid = make_grid(weight_matrix(get_layer(model, name)).detach(), q, name)
        fq.scale = grid.scale.reshape(fq.scale.shape).to(fq.scale.dtype).clone()
        fq.zero_point = (grid.zero - offset).reshape(fq.zero_point.shape).to(fq.zero_point.dtype).clone()
        layer.weight.requires_grad_(True)
        with torch.no_grad():  # the same lattice as ours: its first forward is RTN's model, up to near-ties
            first = fq(layer.weight)  # (it multiplies by 1/scale where we divide by the scale)
        first_differences += int((first != start[name]).sum())
        total += first.numel()
    if first_differences > total // 1000:
        raise RuntimeError(f"torchao's first fake-quantized weights differ from RTN's in {first_differences} "
                           f"of {total} entries: the injected grid is not ours")
    params = [get_layer(student, n).weight for n in names]
    optimizer = torch.optim.AdamW(params, lr=SETTINGS.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    steps = SETTINGS.steps_for(calib.n_segments)
    batches = training_batches(calib.n_segments, SETTINGS.batch_size, steps, SETTINGS.seed)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, SETTINGS.lr, steps, SETTINGS.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(batches[step], SETTINGS.micro_batch_size)
        n_scored = scored_tokens(calib, batches[step]) if len(chunks) > 1 else None
        for rows in chunks:
            logits = student(input_ids=calib.tokens[rows]).logits
            loss, _ = token_losses(logits, calib.tokens[rows], calib.score_mask[rows], None, n_scored)
            loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        final = {n: get_layer(student, n).weight_fake_quantizer(get_layer(student, n).weight).detach().clone()
                 for n in names}
    return final, seconds, first_differences / total


def compare_format(lm, calib, held, fmt: str) -> dict:
    base = lm.base
    start = rtn(base, fmt).weights
    t0 = time.perf_counter()
    ours = qaft(base, calib, fmt, SETTINGS, progress=False)
    ours_s = time.perf_counter() - t0
    theirs, theirs_s, first_differences = torchao_qat(lm.model, calib, fmt, start)
    w0 = {n: weight_matrix(m).detach() for n, m in quantizable_layers(lm.model).items() if n in start}
    results = {}
    for label, weights in (("ours", ours.weights), ("torchao", theirs), ("rtn", start)):
        with swapped_weights(lm.model, weights):
            results[label] = nll(lm.model, held, batch_size=4)
    d_ours = torch.cat([(ours.weights[n] - w0[n]).flatten().double() for n in w0])
    d_theirs = torch.cat([(theirs[n] - w0[n]).flatten().double() for n in w0])
    same = sum(int(torch.isclose(ours.weights[n], theirs[n], rtol=0, atol=1e-7).sum()) for n in w0)
    total = sum(w.numel() for w in w0.values())
    return {"format": fmt, "nll_rtn": results["rtn"].value, "nll_ours": results["ours"].value,
            "nll_torchao": results["torchao"].value,
            "difference": interval(results["torchao"], results["ours"]),  # ours - torchao
            "identical_lattice_points": same / total, "first_forward_not_rtn": first_differences,
            "cosine": float(torch.nn.functional.cosine_similarity(d_ours, d_theirs, dim=0)),
            "seconds_ours": ours_s, "seconds_torchao": theirs_s,
            "steps": SETTINGS.steps_for(calib.n_segments)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["int4", "int3"])
    p.add_argument("--out", type=Path, default=Path("bench/peers/torchao.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lm, calib, held = smollm2_problem()
    rows = []
    for fmt in args.formats:
        rows.append(compare_format(lm, calib, held, fmt))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torchao": torchao.__version__, "torch": torch.__version__,
                                    "settings": SETTINGS.to_dict(), "calibration": calib.provenance(),
                                    "heldout": held.provenance(), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
