"""The SGD-against-AdamW QAFT study (analyses/optimizer.py) on ref-tiny: the table's numbers are the stored
ones, the SGD learning rate follows its rule, and a rerun reads the store instead of training again."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import optimizer
from landscape.data import calibration_set
from landscape.models import load_model
from landscape.quant import rtn
from landscape.store import read_store

ARGV = ["--model", "ref-tiny", "--segments", "4", "--seq-len", "32", "--calib-sequences", "8"]


def test_the_table_reports_the_stored_numbers_and_a_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
    assert optimizer.main([*ARGV, "--out", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| int")]
    assert [r.split(" | ")[0] for r in rows] == ["| int4", "| int3"]
    args = optimizer.parse_args([*ARGV, "--out", str(tmp_path)])
    arrays = read_store(optimizer.store_path(args)).arrays
    lm = load_model("ref-tiny")
    calib = calibration_set(lm.tokenizer, 8, 32, 0, context_length=lm.info.context_length)
    for row, fmt in zip(rows, optimizer.FORMATS):
        def mean(task):
            return float(np.sum(arrays[f"{task}/segment_nll_sum"]) / np.sum(arrays[f"{task}/segment_tokens"]))

        shown = float(row.split(" | ")[4].split(" [")[0])
        assert shown == pytest.approx(mean(f"sgd-{fmt}") - mean(f"adamw-{fmt}"), abs=1e-4), row
        # auto: lr_sgd = lr * (1 - momentum) / rms(gradient at the RTN start), recomputed here
        rms = optimizer.gradient_rms(lm, calib, rtn(lm.base, fmt).weights, 4)
        assert math.isfinite(rms) and rms > 0
        assert float(arrays[f"sgd-{fmt}/lr"]) == pytest.approx(3e-4 * 0.1 / rms, rel=1e-9)
        assert float(arrays[f"adamw-{fmt}/lr"]) == 3e-4

    def no_tasks(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(optimizer, "run_tasks", no_tasks)
    monkeypatch.setattr(optimizer, "load_model_of", no_tasks)
    assert optimizer.main([*ARGV, "--out", str(tmp_path)]) == 0


def test_the_gradient_rms_is_that_of_a_plain_autograd_gradient():
    """gradient_rms against autograd on the model's own parameters, w0 swapped for nothing (start = w0)."""
    import torch

    from landscape.quant.training import token_losses
    from landscape.weights import layer_weights

    lm = load_model("ref-tiny")
    calib = calibration_set(lm.tokenizer, 4, 32, 0, context_length=lm.info.context_length)
    w0 = layer_weights(lm.model)
    params = [lm.model.get_submodule(n).weight for n in w0]
    logits = lm.model(input_ids=calib.tokens).logits
    loss, _ = token_losses(logits, calib.tokens, calib.score_mask)
    grads = torch.autograd.grad(loss, params)
    expected = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) / sum(g.numel() for g in grads))
    assert optimizer.gradient_rms(lm, calib, w0, 4) == pytest.approx(expected, rel=1e-9)


def test_a_bad_sgd_learning_rate_is_refused_before_anything_loads():
    for bad in ("fast", "0", "-1"):
        with pytest.raises(SystemExit):
            optimizer.parse_args([*ARGV, "--sgd-lr", bad])
