"""LoRC: W_final = Q(W) + U V with U V the rank-r truncated SVD of W - Q(W), checked against numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.objectives import layer_mse
from landscape.quant import QuantResult, ResultMismatchError, gptq, lorc, rtn
from landscape.weights import layer_weights, quantizable_layers


def residual_singular_norm(error: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(error, compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum()))


@pytest.mark.parametrize("base_method", ["rtn", "gptq"])
def test_lorc_error_is_the_norm_of_the_residual_singular_values(base_method):
    model = tiny_model("llama", torch.float64)
    w0 = layer_weights(model)
    base = (rtn(model, "int3") if base_method == "rtn"
            else gptq(model, random_tokens(3, 12), "int3", progress=False))
    result = lorc(model, base, rank=4, factor_dtype=None)
    assert result.method == f"{base_method}+lorc" and result.format == base.format
    for name, w in w0.items():
        error = (w - base.weights[name]).numpy()
        remaining = np.linalg.norm(w.numpy() - result.weights[name].numpy())
        assert remaining == pytest.approx(residual_singular_norm(error, 4), rel=1e-9)
        correction = (result.weights[name] - base.weights[name]).numpy()
        assert np.linalg.matrix_rank(correction, tol=1e-10 * np.abs(correction).max()) == 4
    assert all(torch.equal(w0[n], w) for n, w in layer_weights(model).items()), "lorc modified the model"


def test_full_rank_correction_recovers_w0():
    model = tiny_model("gpt2", torch.float64, hidden=16)
    base = rtn(model, "int2")
    result = lorc(model, base, rank=16, factor_dtype=None)
    for name, w in layer_weights(model).items():
        torch.testing.assert_close(result.weights[name], w, rtol=0, atol=1e-12)


def test_fp16_factors_cost_16_bits_per_extra_parameter_and_stay_close_to_the_exact_correction():
    model = tiny_model("opt", torch.float32)
    w0 = layer_weights(model)
    base = rtn(model, "int3-g16")
    result = lorc(model, base, rank=2)
    expected_params = {n: 2 * (w.shape[0] + w.shape[1]) for n, w in w0.items()}
    assert result.extra["extra_parameters"] == expected_params
    assert result.extra["extra_parameters_total"] == sum(expected_params.values())
    assert result.extra["extra_storage_bits_total"] == 16 * sum(expected_params.values())
    for name, w in w0.items():
        exact = residual_singular_norm((w - base.weights[name]).double().numpy(), 2)
        remaining = float((w.double() - result.weights[name].double()).norm())
        before = float((w.double() - base.weights[name].double()).norm())
        assert exact <= remaining * (1 + 1e-6) and remaining <= exact * 1.001 < before
        assert result.extra["relative_error_after"][name] == pytest.approx(
            remaining / float(w.double().norm()))


def test_lorc_lowers_layer_mse_on_calibration_inputs_consistently_with_objectives():
    model, calib = tiny_model("gpt2"), random_tokens(3, 12)
    base = rtn(model, "int2", calib=calib)
    result = lorc(model, base, rank=8, calib=calib)
    direct = layer_mse(model, calib, result.weights, inputs="reference")
    assert result.layer_mse == pytest.approx(direct, rel=1e-12)
    assert result.total_layer_mse < base.total_layer_mse


def test_saved_lorc_result_round_trips(tmp_path):
    model = tiny_model("gpt2")
    result = lorc(model, rtn(model, "int4"), rank=3)
    loaded = QuantResult.load(result.save(tmp_path / "lorc"))
    assert loaded.method == "rtn+lorc" and loaded.extra["rank"] == 3
    assert all(torch.equal(loaded.weights[n], w) for n, w in result.weights.items())


@pytest.mark.parametrize("rank, match", [(0, "rank must be a positive integer"), (2.5, "got 2.5"),
                                         (33, r"rank 33 exceeds min\(out, in\) = 32")])
def test_bad_rank_is_refused(rank, match):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=match):
        lorc(model, rtn(model, "int4"), rank=rank)


def test_base_from_another_model_is_refused():
    base = rtn(tiny_model("gpt2", seed=0), "int4")
    other = tiny_model("gpt2", seed=1)
    with pytest.raises(ResultMismatchError, match=base.base_fingerprint):
        lorc(other, base)


def test_base_with_unknown_layer_is_refused():
    model = tiny_model("gpt2")
    base = rtn(model, "int4")
    base.weights["transformer.h.9.mlp.c_fc"] = base.weights.pop(next(iter(quantizable_layers(model))))
    with pytest.raises(KeyError, match=r"transformer\.h\.9\.mlp\.c_fc"):
        lorc(model, base)
