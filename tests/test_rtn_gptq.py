"""RTN, GPTQ and the block-by-block driver, each checked against an independent computation on a tiny
problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.data import TokenSet
from landscape.objectives import layer_mse
from landscape.quant import (
    CholeskyError,
    FormatError,
    GPTQSettings,
    QuantResult,
    gptq,
    gptq_layer,
    make_grid,
    rtn,
)
from landscape.quant.capture import (
    capture_block_inputs,
    input_groups,
    per_layer,
    quantize_block_by_block,
    run_block,
)
from landscape.quant.gptq import inverse_cholesky_upper
from landscape.weights import Base, decoder_blocks, layer_weights, quantizable_layers


# --------------------------------------------------------------------------------------- helpers
def layer_problem(out_f: int = 12, in_f: int = 32, n_tokens: int = 96, seed: int = 0,
                  dead: tuple[int, ...] = ()):
    """A weight and correlated calibration inputs X (tokens, in), float64; ``dead`` input columns are always
    0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    mix = torch.eye(in_f, dtype=torch.float64) + 0.6 * torch.randn(in_f, in_f, generator=g,
                                                                   dtype=torch.float64)
    x = (torch.randn(n_tokens, in_f, generator=g, dtype=torch.float64) @ mix
         * (1 + torch.rand(in_f, generator=g)))
    x[:, list(dead)] = 0
    return w, x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def mse_on_inputs(w: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor) -> float:
    """mean over tokens and outputs of ((W - Q) x)^2, computed directly from the inputs."""
    return float(((x @ (w - w_q).T) ** 2).mean())


def obq_reference(w: torch.Tensor, hessian: torch.Tensor, grid, damp: float, act_order: bool) -> torch.Tensor:
    """Column-by-column OBQ-style GPTQ: explicit inverse Hessian with a rank-1 downdate after every column,
    every remaining column updated at once; no Cholesky, no lazy blocks."""
    W, H = w.double().clone(), hessian.double().clone()
    H.diagonal()[H.diagonal() == 0] = 1.0
    order = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(W.shape[1]))
    H += damp * H.diagonal().mean() * torch.eye(W.shape[1], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in order.tolist():
        Q[:, j] = grid.round(W)[:, j]
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W -= err[:, None] * Hinv[j][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


def closed_form_rtn(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-channel asymmetric min-max round-to-nearest, written out for each output row."""
    out = np.empty_like(w)
    for i, row in enumerate(w):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        scale = (hi - lo) / (2**bits - 1)
        zero = np.round(-lo / scale)
        out[i] = scale * (np.clip(np.round(row / scale) + zero, 0, 2**bits - 1) - zero)
    return out


class ForwardCounter:
    """Counts calls of every quantizable linear layer of a model (to prove no work started)."""

    def __init__(self, model):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._count) for m in quantizable_layers(model).values()]

    def _count(self, module, args):
        self.calls += 1


def calib_set(n: int = 4, seq_len: int = 12, seed: int = 0) -> TokenSet:
    return random_tokens(n, seq_len, seed)


# ------------------------------------------------------------------------------------------- RTN
def test_rtn_equals_closed_form_rounding(arch):
    model = tiny_model(arch)
    w0 = layer_weights(model)
    result = rtn(model, "int3")
    assert list(result.weights) == list(quantizable_layers(model)) and result.method == "rtn"
    for name, w in w0.items():
        expected = closed_form_rtn(w.double().numpy(), 3)
        np.testing.assert_allclose(result.weights[name].double().numpy(), expected, rtol=0, atol=1e-6)
    assert all(torch.equal(w0[n], w) for n, w in layer_weights(model).items()), "rtn modified the model"


def test_rtn_layer_mse_matches_direct_computation_on_captured_inputs():
    model, calib = tiny_model("llama", torch.float64), calib_set()
    result = rtn(model, "int4-g16", layers="*.mlp.*", calib=calib)
    assert all(".mlp." in n for n in result.weights) and len(result.weights) == 6
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in result.weights}
    modules = quantizable_layers(model)
    handles = [modules[n].register_forward_pre_hook(
                   lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in inputs]
    with torch.no_grad():
        model(input_ids=calib.tokens)
    for h in handles:
        h.remove()
    for name, w_q in result.weights.items():
        x = torch.cat(inputs[name])
        assert result.layer_mse[name] == pytest.approx(mse_on_inputs(modules[name].weight.detach(), w_q, x),
                                                       rel=1e-10)


# ---------------------------------------------------------------------------- GPTQ, one layer
@pytest.mark.parametrize("spec, act_order, block_size",
                         [("int3", True, 5), ("int3", False, 128), ("int4-g8", True, 7),
                          ("int2-g16-sym", True, 1), ("mxint3-8", False, 3)])
def test_gptq_layer_matches_column_by_column_reference(spec, act_order, block_size):
    w, x = layer_problem(seed=1)
    H, grid = hessian_of(x), make_grid(w, spec)
    q, info = gptq_layer(w, H, grid, GPTQSettings(damp=0.01, block_size=block_size, act_order=act_order))
    expected = obq_reference(w, H, grid, 0.01, act_order)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-10)
    assert grid.contains(q) and info.escalations == 0 and info.damp == 0.01


@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("spec", ["int3", "int4-g8", "int2"])
def test_gptq_layer_mse_is_not_worse_than_rtn(seed, spec):
    w, x = layer_problem(seed=seed)
    grid = make_grid(w, spec)
    q, _ = gptq_layer(w, hessian_of(x), grid)
    assert mse_on_inputs(w, q, x) <= mse_on_inputs(w, grid.round(w), x)


def test_gptq_layer_float32_agrees_with_float64():
    w, x = layer_problem(seed=5)
    w32, H = w.float(), hessian_of(x)
    grid = make_grid(w32, "int4")
    q64, _ = gptq_layer(w32, H, grid, GPTQSettings(compute_dtype=torch.float64))
    q32, _ = gptq_layer(w32, H.float(), grid, GPTQSettings(compute_dtype=torch.float32))
    assert q32.dtype == torch.float32 and grid.contains(q32)
    # float32 error feedback may flip an occasional near-tie; the local objective must agree closely
    assert mse_on_inputs(w, q32.double(), x) == pytest.approx(mse_on_inputs(w, q64.double(), x), rel=1e-3)


def test_gptq_solves_low_precision_weights_in_float32_by_default():
    """bfloat16 / float16 weights: the solver runs in float32 unless told otherwise (half the memory of a
    float64 solve); float32 / float64 weights keep the float64 solver."""
    default = GPTQSettings()
    assert default.solver_dtype(torch.bfloat16) == default.solver_dtype(torch.float16) == torch.float32
    assert default.solver_dtype(torch.float32) == default.solver_dtype(torch.float64) == torch.float64
    assert GPTQSettings(compute_dtype=torch.float64).solver_dtype(torch.bfloat16) == torch.float64
    w, x = layer_problem(seed=7)
    wb, H = w.to(torch.bfloat16), hessian_of(x).float()
    grid = make_grid(wb, "int4-g8")
    q_auto, _ = gptq_layer(wb, H, grid)
    q_32, _ = gptq_layer(wb, H, grid, GPTQSettings(compute_dtype=torch.float32))
    q_64, _ = gptq_layer(wb, H, grid, GPTQSettings(compute_dtype=torch.float64))
    assert q_auto.dtype == torch.bfloat16 and torch.equal(q_auto, q_32)
    assert mse_on_inputs(w, q_auto.double(), x) == pytest.approx(mse_on_inputs(w, q_64.double(), x), rel=1e-3)
    with pytest.raises(ValueError, match="compute_dtype must be torch.float32 or torch.float64"):
        GPTQSettings(compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_identity_or_diagonal_hessian_is_rtn(act_order):
    """With no input correlations the error feedback is zero, so GPTQ rounds every weight to nearest."""
    w, _ = layer_problem(seed=6)
    w = w.float()
    grid = make_grid(w, "int3-g8")
    diagonal = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1)
    for H in (torch.eye(w.shape[1]), diagonal):
        q, _ = gptq_layer(w, H, grid, GPTQSettings(act_order=act_order, block_size=4))
        assert torch.equal(q, grid.round(w))


def test_dead_inputs_are_rounded_not_zeroed():
    w, x = layer_problem(seed=7, dead=(3, 17))
    grid = make_grid(w, "int3")
    q, info = gptq_layer(w, hessian_of(x), grid)
    assert info.dead_inputs == 2
    torch.testing.assert_close(q[:, [3, 17]], grid.round(w)[:, [3, 17]], rtol=0, atol=0)
    assert q[:, [3, 17]].abs().sum() > 0
    torch.testing.assert_close(q, obq_reference(w, hessian_of(x), grid, 0.01, True), rtol=0, atol=1e-10)


def test_layer_that_never_sees_input_is_plain_rounding():
    w, _ = layer_problem(seed=11)
    grid = make_grid(w, "int4")
    q, info = gptq_layer(w, torch.zeros(32, 32, dtype=torch.float64), grid)
    assert info.dead_inputs == 32 and info.escalations == 0
    assert torch.equal(q, grid.round(w))


def test_damping_escalates_until_cholesky_succeeds_and_is_recorded():
    """A rank-deficient H made slightly indefinite (as accumulated roundoff does): at damp 0.01 the damped
    matrix is still indefinite, at 0.1 it is positive definite; the escalation must find exactly that."""
    w, x = layer_problem(in_f=16, n_tokens=6, seed=8)  # 6 tokens, 16 inputs: H has rank 6
    H_psd = hessian_of(x)
    H = H_psd - 0.01 * H_psd.diagonal().mean() * torch.eye(16, dtype=H_psd.dtype)
    mean_diag = float(H.diagonal().mean())
    min_eig = float(torch.linalg.eigvalsh(H)[0])
    tried = [0.01 * 10**k for k in range(5)]
    first_ok = next(d for d in tried if min_eig + d * mean_diag > 0)  # independent: dense eigenvalues
    assert first_ok == pytest.approx(0.1)
    grid = make_grid(w, "int3")
    q, info = gptq_layer(w, H, grid, GPTQSettings(damp=0.01))
    assert info.damp == pytest.approx(first_ok) and info.escalations == 1
    assert info.damp_absolute == pytest.approx(first_ok * mean_diag)
    torch.testing.assert_close(q, obq_reference(w, H, grid, first_ok, True), rtol=0, atol=1e-10)
    assert grid.contains(q)
    with pytest.raises(CholeskyError, match=r"0\.01 x mean diag"):
        gptq_layer(w, H, grid, GPTQSettings(damp=0.01, max_escalations=0))


def test_a_consumed_hessian_gives_the_same_factor_and_is_rebuilt_only_on_a_retry():
    """inverse_cholesky_upper(fresh H, rebuild=...) damps H in place and lets it go: the factor equals the
    one from a kept H bit for bit, with and without an escalation, and H is rebuilt once per retry."""
    w, x = layer_problem(in_f=16, n_tokens=6, seed=8)
    H_psd = hessian_of(x).double()
    indefinite = H_psd - 0.01 * H_psd.diagonal().mean() * torch.eye(16, dtype=H_psd.dtype)
    for H, escalations in ((H_psd, 0), (indefinite, 1)):
        kept = H.clone()
        builds = []

        def rebuild(H=H):
            builds.append(1)
            return H.clone()

        a = inverse_cholesky_upper(kept, 0.01)
        b = inverse_cholesky_upper(rebuild(), 0.01, rebuild=rebuild)
        assert torch.equal(kept, H)  # a kept H is left as it was
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:] and a[3] == escalations
        assert len(builds) == 1 + escalations


def test_hessian_that_no_damping_fixes_raises():
    w, _ = layer_problem(out_f=4, in_f=4, seed=9)
    H = torch.tensor([[1.0, 1e4, 0, 0], [1e4, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]],
                     dtype=torch.float64)
    with pytest.raises(CholeskyError, match="not positive semi-definite"):
        gptq_layer(w, H, make_grid(w, "int4"))


@pytest.mark.parametrize("bad", ["nan_hessian", "inf_weight", "shape", "damp", "block"])
def test_gptq_layer_rejects_bad_input(bad):
    w, x = layer_problem(seed=10)
    H, grid = hessian_of(x), make_grid(w, "int4")
    kwargs = {}
    if bad == "nan_hessian":
        H[2, 5] = float("nan")
        match = "Hessian contains NaN"
    elif bad == "inf_weight":
        w = w.clone()
        w[0, 0] = float("inf")
        match = "weight contains NaN or Inf"
    elif bad == "shape":
        H = H[:-1, :-1]
        match = r"Hessian must be \(32, 32\)"
    elif bad == "damp":
        kwargs, match = {"damp": 0.0}, "damp must be a positive"
    else:
        kwargs, match = {"block_size": 0}, "block_size must be a positive integer"
    with pytest.raises(ValueError, match=match):
        gptq_layer(w, H, grid, GPTQSettings(**kwargs))


# ------------------------------------------------------------------------------------- the driver
def test_captured_block_inputs_replay_the_models_own_hidden_states(arch):
    model, calib = tiny_model(arch), calib_set()
    calls = capture_block_inputs(model, calib, batch_size=3)
    assert [c.hidden.shape[0] for c in calls] == [3, 1]
    hidden = model(input_ids=calib.tokens, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(torch.cat([c.hidden for c in calls]), hidden[0], rtol=0, atol=0)
    outputs, _ = run_block(decoder_blocks(model)[0], calls)
    torch.testing.assert_close(torch.cat([c.hidden for c in outputs]), hidden[1], rtol=1e-6, atol=1e-6)


def test_a_capture_pass_stops_once_its_layers_have_their_inputs_and_gives_the_same_hessians():
    """Without outputs to keep, a replay stops after the last watched layer's input: the Hessians must be
    bit-identical to those of a full replay, and the layers after the group must not run."""
    model, calib = tiny_model("llama"), calib_set()
    calls = capture_block_inputs(model, calib, batch_size=3)
    block = decoder_blocks(model)[0]
    layers = {n: m for n, m in quantizable_layers(model).items()
              if ".layers.0.self_attn." in n and "o_proj" not in n}
    later_calls = []
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda module, args: later_calls.append(1))
    try:
        outputs, full = run_block(block, calls, layers, torch.float64, keep_outputs=True)
        assert len(later_calls) == len(calls) and len(outputs) == len(calls)
        later_calls.clear()
        none, early = run_block(block, calls, layers, torch.float64, keep_outputs=False)
    finally:
        handle.remove()
    assert none == [] and later_calls == [], "the replay ran past the watched layers"
    assert sorted(early) == sorted(full) == sorted(layers)
    for name in layers:
        assert torch.equal(early[name], full[name])


def test_layers_reading_one_input_share_one_hessian_equal_to_x_transpose_x():
    """q/k/v and gate/up read one tensor each: one Hessian per group (the same object), equal to
    2/n sum x x^T over the tokens, brute force from the captured inputs."""
    model, calib = tiny_model("llama"), calib_set()
    calls = capture_block_inputs(model, calib, batch_size=3)
    block = decoder_blocks(model)[0]
    layers = {n: m for n, m in quantizable_layers(model).items() if ".layers.0." in n}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_pre_hook(lambda module, args, n=n: inputs[n].append(args[0].detach()))
               for n, m in layers.items()]
    try:
        _, hessians = run_block(block, calls, layers, torch.float64)
    finally:
        for h in handles:
            h.remove()
    prefix = "model.layers.0."
    q, k, v = (hessians[f"{prefix}self_attn.{p}_proj"] for p in "qkv")
    gate, up = hessians[f"{prefix}mlp.gate_proj"], hessians[f"{prefix}mlp.up_proj"]
    assert q is k is v and gate is up and q is not gate
    assert len({id(h) for h in hessians.values()}) == 4  # qkv, o, gate/up, down
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        torch.testing.assert_close(hessians[name], 2 * x.T @ x / x.shape[0], rtol=1e-10, atol=1e-12)


EXPECTED_GROUPS = {  # layers reading the same tensor, in forward order, per decoder block
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"],
            ["fc2"]],
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
}


def test_input_groups_follow_shared_input_tensors(arch):
    model = tiny_model(arch)
    calls = capture_block_inputs(model, calib_set(2), batch_size=2)
    block = decoder_blocks(model)[1]
    prefix = [n for n in quantizable_layers(model) if ".1." in n][0].split(".1.")[0] + ".1."
    layers = {n: m for n, m in quantizable_layers(model).items() if n.startswith(prefix)}
    groups = input_groups(block, layers, calls[0])
    assert [sorted(n.removeprefix(prefix) for n in g)
            for g in groups] == [sorted(g) for g in EXPECTED_GROUPS[arch]]


def test_sequential_gptq_layer_mse_equals_mse_on_the_quantized_models_inputs(arch):
    """With true-sequential order each layer's inputs are those of the fully quantized model, so the MSE GPTQ
    reports from its Hessians must equal objectives.layer_mse(..., inputs="modified")."""
    model, calib = tiny_model(arch), calib_set()
    w0 = layer_weights(model)
    result = gptq(model, calib, "int3", GPTQSettings(block_size=8), progress=False)
    assert all(torch.equal(w0[n], w) for n, w in layer_weights(model).items()), "model not restored to w0"
    direct = layer_mse(model, calib, result.weights, inputs="modified")
    for name in result.weights:
        assert result.layer_mse[name] == pytest.approx(direct[name], rel=1e-5)
        assert make_grid(w0[name], "int3").contains(result.weights[name])
    assert result.settings["true_sequential"] and result.extra["damp_used"][name] == 0.01


def test_non_sequential_gptq_beats_rtn_on_every_layer_on_the_same_inputs():
    model, calib = tiny_model("opt"), calib_set()
    g = gptq(model, calib, "int3-g16", GPTQSettings(sequential=False), progress=False)
    r = rtn(model, "int3-g16", calib=calib)
    direct = layer_mse(model, calib, g.weights, inputs="reference")
    for name in g.weights:
        assert g.layer_mse[name] == pytest.approx(direct[name], rel=1e-5)
        assert g.layer_mse[name] <= r.layer_mse[name]
    assert g.extra["layer_mse_inputs"] == r.extra["layer_mse_inputs"] == "full-precision model"


@pytest.mark.parametrize("spec", ["int4-sym", "int2-tensor", "mxint4-16", "int3-g8"])
def test_every_method_lands_on_the_grid_of_w0(spec):
    model, calib = tiny_model("llama"), calib_set(3)
    w0 = layer_weights(model)
    first_block = "model.layers.0.*"
    for result in (rtn(model, spec),
                   gptq(model, calib, spec, GPTQSettings(block_size=4), layers=first_block, progress=False)):
        for name, w_q in result.weights.items():
            assert make_grid(w0[name], spec).contains(w_q), f"{result.method} {name} off the grid"


def test_gptq_is_deterministic_and_selects_layers_by_glob():
    model, calib = tiny_model("gpt2"), calib_set()
    a = gptq(model, calib, "int4", layers=["*.h.1.*", "transformer.h.0.attn.c_attn"], progress=False)
    b = gptq(model, calib, "int4", layers=["*.h.1.*", "transformer.h.0.attn.c_attn"], progress=False)
    assert list(a.weights) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                               "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc",
                               "transformer.h.1.mlp.c_proj"]
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert a.layer_mse == b.layer_mse


def test_model_is_restored_when_a_solver_fails_midway():
    model, calib = tiny_model("llama"), calib_set(2)
    w0 = layer_weights(model)
    names = list(quantizable_layers(model))
    solved = []

    def failing_solver(name, w, hessian):
        if len(solved) == 5:
            raise RuntimeError("solver failed")
        solved.append(name)
        return w + 1.0, None

    with pytest.raises(RuntimeError, match="solver failed"):
        quantize_block_by_block(model, calib, names, per_layer(failing_solver), progress=False)
    assert len(solved) == 5
    assert all(torch.equal(w0[n], w) for n, w in layer_weights(model).items())


def test_saved_result_round_trips(tmp_path):
    model, calib = tiny_model("gpt2"), calib_set(2)
    result = gptq(Base(model, "tiny"), calib, "int4-g16", progress=False)
    path = result.save(tmp_path / "q")
    loaded = QuantResult.load(path, base_fingerprint=result.base_fingerprint)
    assert all(torch.equal(loaded.weights[n], w) for n, w in result.weights.items())
    assert loaded.layer_mse == result.layer_mse and loaded.calibration["data_hash"] == calib.content_hash


# ------------------------------------------------------------------------- bad input, before work
def _nan_last_layer(model):
    with torch.no_grad():
        list(quantizable_layers(model).values())[-1].weight[0, 0] = float("nan")


def _nan_embedding(model):
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("nan")


BAD_CALLS = {
    "bits": (None, lambda m, c: gptq(m, c, "int9", progress=False), FormatError, "got 9"),
    "group": (None, lambda m, c: gptq(m, c, "int4-g24", progress=False), FormatError,
              r"group size 24 .*in_features=32"),
    "layer": (None, lambda m, c: gptq(m, c, "int4", layers=["transformer.h.7.attn.c_attn"], progress=False),
              KeyError, r"transformer\.h\.7\.attn\.c_attn"),
    "nan_weight": (_nan_last_layer, lambda m, c: gptq(m, c, "int4", progress=False), ValueError,
                   r"transformer\.h\.1\.mlp\.c_proj.*NaN"),
    "nan_hidden": (_nan_embedding, lambda m, c: gptq(m, c, "int4", progress=False), ValueError,
                   "hidden states .*NaN"),
    "token_range": (None, lambda m, c: gptq(m, random_tokens(2, 8, vocab=500), "int4", progress=False),
                    ValueError, r"0\.\.96"),
    "float_tokens": (None, lambda m, c: gptq(m, TokenSet(torch.full((2, 8), float("nan")),
                                                         torch.ones(2, 8, dtype=bool), "x", "x", 8, 8, "x"),
                                             "int4", progress=False), ValueError,
                     "integer token ids"),
    "damp": (None, lambda m, c: gptq(m, c, "int4", GPTQSettings(damp=-1.0), progress=False), ValueError,
             "damp"),
    "rtn_group": (None, lambda m, c: rtn(m, "int4-g24"), FormatError, "24"),
    "rtn_layer": (None, lambda m, c: rtn(m, "int4", layers="nope*"), KeyError, "nope"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_refused_before_any_work(case):
    prepare, call, error, match = BAD_CALLS[case]
    model = tiny_model("gpt2")
    if prepare:
        prepare(model)
    counter = ForwardCounter(model)
    with pytest.raises(error, match=match):
        call(model, calib_set(2))
    assert counter.calls == 0, "a layer ran before the bad input was detected"


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_on_tiny_model(monkeypatch):
    """`landscape quantize` on a tiny GPT-2 and random calibration tokens (no corpus, no model build)."""
    import landscape.data
    import landscape.models
    from landscape.models import LoadedModel, ModelInfo

    model = tiny_model("gpt2")
    info = ModelInfo("tiny-gpt2", "tests", "gpt2", sum(p.numel() for p in model.parameters()), 64, "float32")
    requests = []

    def fake_calibration_set(tokenizer, n_sequences, seq_len, seed, **kwargs):
        requests.append((n_sequences, seq_len, seed))
        return random_tokens(n_sequences, seq_len, seed)

    monkeypatch.setattr(landscape.models, "load_model", lambda name, *where: LoadedModel(model, None, info))
    monkeypatch.setattr(landscape.data, "calibration_set", fake_calibration_set)
    return model, requests


def test_cli_quantize_saves_what_the_library_computes(cli_on_tiny_model, tmp_path, capsys):
    from landscape.cli import main
    from landscape.quant import lorc

    model, requests = cli_on_tiny_model
    out = tmp_path / "tiny-gptq"
    rc = main(["quantize", "tiny-gpt2", "--method", "gptq+lorc", "--format", "int4-g16", "--out", str(out),
               "--calib-sequences", "3", "--calib-seq-len", "10", "--calib-seed", "7", "--rank", "2",
               "--damp", "0.05", "--block-size", "8", "--no-act-order", "--layers", "*.mlp.*",
               "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and requests == [(3, 10, 7)]
    saved = QuantResult.load(out)
    calib = random_tokens(3, 10, 7)
    settings = GPTQSettings(damp=0.05, block_size=8, act_order=False)
    expected = lorc(model, gptq(model, calib, "int4-g16", settings, layers=["*.mlp.*"], progress=False),
                    rank=2, calib=calib)
    assert saved.method == "gptq+lorc" and list(saved.weights) == list(expected.weights)
    assert all(torch.equal(saved.weights[n], w) for n, w in expected.weights.items())
    assert saved.settings["damp"] == 0.05 and saved.settings["act_order"] is False
    assert f"{saved.total_layer_mse:.6g}" in printed and str(out) + ".safetensors" in printed


@pytest.mark.parametrize("argv, match", [
    (["--method", "gptq", "--format", "int9"], "got 9"),
    (["--method", "awq", "--format", "int4"], "invalid choice: 'awq'"),
    (["--method", "gptq", "--format", "int4", "--damp", "0"], "positive finite"),
])
def test_cli_rejects_bad_arguments_before_loading(cli_on_tiny_model, tmp_path, capsys, argv, match):
    from landscape.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "tiny-gpt2", "--out", str(tmp_path / "x"), *argv])
    assert match in capsys.readouterr().err and cli_on_tiny_model[1] == []


def test_cli_unknown_layer_glob_is_an_error(cli_on_tiny_model, tmp_path, capsys):
    from landscape.cli import main

    rc = main(["quantize", "tiny-gpt2", "--method", "rtn", "--format", "int4", "--out", str(tmp_path / "x"),
               "--layers", "*.attention.*", "--calib-sequences", "2"])
    assert rc == 2 and "*.attention.*" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("sequential", [True, False])
def test_earlier_blocks_are_back_at_w0_while_a_later_block_is_solved(sequential):
    """Only the block being solved is held aside (its w0 copied): every earlier block reads w0 again. (That
    the next block's inputs were still taken from the quantized blocks is
    test_sequential_gptq_layer_mse_equals_mse_on_the_quantized_models_inputs.)"""
    model, calib = tiny_model("llama"), calib_set(2)
    w0 = layer_weights(model)
    names = list(quantizable_layers(model))
    prefix = "model.layers."
    block_of = {n: int(n[len(prefix):].split(".")[0]) for n in names}
    checked = []

    def solver(name, w, hessian):
        now = layer_weights(model)
        earlier = [n for n in names if block_of[n] < block_of[name]]
        checked.append(all(torch.equal(now[n], w0[n]) for n in earlier))
        return torch.round(w * 4) / 4, None

    solved = quantize_block_by_block(model, calib, names, per_layer(solver), sequential=sequential,
                                     progress=False)
    assert len(checked) == len(names) and all(checked) and max(block_of.values()) >= 1
    assert all(torch.equal(solved[n].weight, torch.round(w0[n] * 4) / 4) for n in names)
    assert all(torch.equal(w0[n], w) for n, w in layer_weights(model).items())
