"""QAFT, its full-precision control and learning-rate selection, on tiny random models.

Every expectation is computed independently of the training loop: RTN from the grid, NLL and KL from
logits, data order from seeded permutations, schedules from their closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens, tiny_model

from landscape.objectives import nll
from landscape.quant.formats import Grid, make_grid, parse_format
from landscape.quant.lr_selection import LearningRateSweepSettings, select_learning_rate
from landscape.quant.qaft import (
    FinetuneSettings,
    LearningRateSweep,
    QAFTError,
    fp_finetune,
    paired_control,
    qaft,
)
from landscape.quant.result import QuantResult
from landscape.quant.training import learning_rate_at, lsq_fake_quant, weights_made_when_used
from landscape.weights import (
    get_layer,
    layer_weights,
    parameter_layout,
    quantizable_layers,
    swapped_weights,
    weight_is_transposed,
    weight_matrix,
    weights_fingerprint,
)

FAST = dict(steps=3, batch_size=4)
ONE_STEP = dict(steps=1, batch_size=4)


def rtn_weights(model, fmt) -> dict[str, torch.Tensor]:
    return {n: make_grid(w, fmt, n).round(w) for n, w in layer_weights(model).items()}


def quant_result(model, weights, fmt, method="rtn") -> QuantResult:
    return QuantResult(weights=weights, format=parse_format(fmt), method=method,
                       base_fingerprint=weights_fingerprint(model, list(weights)))


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, state) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(p.grad is None for p in model.parameters())


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


# --------------------------------------------------------------------------------------- quantizers
def test_fake_quant_is_grid_round_forward_and_identity_backward():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 8, generator=g, dtype=torch.float64)
    grid = make_grid(w0, "int3")
    w = (w0 + 0.3 * torch.randn(3, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.equal(grid.fake_quant(w), grid.round(w.detach()))
    jacobian = torch.autograd.functional.jacobian(grid.fake_quant, w.detach())  # (3, 8, 3, 8)
    assert torch.equal(jacobian.reshape(24, 24), torch.eye(24, dtype=torch.float64))


def test_lsq_fake_quant_forward_and_closed_form_gradients():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(2, 8, generator=g, dtype=torch.float64)
    grid = make_grid(w0, "int3-g4")
    w = w0 * 1.3  # some entries now lie beyond the grid's range (clipped)
    log_scale = torch.zeros_like(grid.scale, requires_grad=True)
    w = w.requires_grad_(True)
    y = lsq_fake_quant(w, grid, log_scale)
    assert torch.equal(y.detach(), grid.round(w.detach()))
    upstream = torch.randn(w.shape, generator=g, dtype=torch.float64)
    grad_w, grad_log_scale = torch.autograd.grad((y * upstream).sum(), (w, log_scale))
    s = grid.scale.repeat_interleave(4, dim=1)
    z = grid.zero.repeat_interleave(4, dim=1)
    codes = torch.round(w.detach() / s + z)
    inside = (codes >= 0) & (codes <= 7)
    assert (~inside).any() and inside.any()
    assert torch.allclose(grad_w, torch.where(inside, upstream, torch.zeros_like(upstream)), rtol=1e-15,
                          atol=0)
    # d/d log s of s * (q - z) with q = clamp(round_ste(w / s + z)): s * (q - z - w / s) inside, s * (q - z)
    # clipped
    d_output = torch.where(inside, s * (codes - z) - w.detach(), s * (codes.clamp(0, 7) - z))
    expected = (d_output * upstream).reshape(2, 2, 4).sum(-1)
    assert torch.allclose(grad_log_scale, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear layers
def test_weights_made_when_used_give_the_same_outputs_and_gradients_and_are_not_kept(arch):
    """Each layer's fake-quantized weight, made as the layer runs (and again in the backward pass), gives
    bit for bit the outputs and latent gradients of weights made up front and substituted; the graph keeps
    none of them, and the layers' forwards are restored on exit."""
    import weakref

    model = tiny_model(arch, hidden=16, layers=1)
    tokens = random_tokens(2, 8).tokens
    layers = quantizable_layers(model)
    latent = {n: weight_matrix(m).detach().clone().requires_grad_(True) for n, m in layers.items()}
    grids = {n: make_grid(latent[n].detach(), "int3") for n in layers}
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    made, alive = [], []

    def make(name: str) -> torch.Tensor:
        made.append(name)
        weight = grids[name].fake_quant(latent[name])
        alive.append(weakref.ref(weight))
        return weight

    substituted = {**frozen, **{f"{n}.weight": parameter_layout(m, grids[n].fake_quant(latent[n]))
                                for n, m in layers.items()}}
    expected_logits = torch.func.functional_call(model, substituted, kwargs={"input_ids": tokens}).logits
    expected = torch.autograd.grad(expected_logits.pow(2).mean(), list(latent.values()))
    with weights_made_when_used(layers, make):
        logits = torch.func.functional_call(model, frozen, kwargs={"input_ids": tokens}).logits
    assert made == list(layers) and all(ref() is None for ref in alive)  # one at a time, none kept
    assert torch.equal(logits, expected_logits)
    got = torch.autograd.grad(logits.pow(2).mean(), list(latent.values()))
    # made once more for its input's gradient, where the input needs one (not the frozen embedding's readers)
    again = made[len(layers):]
    assert len(again) == len(set(again)) and list(layers)[-1] in again and set(again) < set(layers)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all("forward" not in m.__dict__ for m in layers.values())
    stray = torch.nn.Linear(16, 16)  # a layer the model never calls: its made weight cannot reach the output
    with pytest.raises(RuntimeError, match=r"1 trained layers were not called .*\['stray'\]"):
        with weights_made_when_used({**layers, "stray": stray}, make):
            torch.func.functional_call(model, frozen, kwargs={"input_ids": tokens})
    assert "forward" not in stray.__dict__


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_recomputed_blocks_give_the_same_training_bit_for_bit_holding_fewer_activations(arch):
    """QAFT (and its control) with each decoder block recomputed in the backward pass: the same weights and
    loss curve, bit for bit, the blocks run again in each backward pass (so their activations were not
    kept), the blocks' forwards and the parameters' gradient flags are restored and no model parameter gets
    a .grad."""
    from landscape.weights import decoder_blocks

    model = tiny_model(arch, hidden=32, layers=3)
    calib = random_tokens(8, 16)
    for control in (False, True):
        runs = [(fp_finetune if control else qaft)(
            model, calib, "int3", FinetuneSettings(lr=1e-2, **FAST, micro_batch_size=2, recompute_blocks=r),
            progress=False) for r in (False, True)]
        plain, recomputed = runs
        assert all(torch.equal(plain.weights[n], recomputed.weights[n]) for n in plain.weights)
        assert plain.extra["loss_curve"] == recomputed.extra["loss_curve"]
        assert plain.settings == recomputed.settings  # memory only: not part of what was computed
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all("forward" not in b.__dict__ for b in decoder_blocks(model))

    # 6 passes (3 steps of 2 micro-batches), then one forward pass for the result's layer MSE; recomputed, a
    # block's layers run again in each backward pass up to the last one whose outputs the backward pass needs
    # (non-reentrant checkpointing stops there: a block's last layer runs once)
    calls = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in quantizable_layers(model).items()]
    try:
        for r, expected in ((False, {6 + 1}), (True, {6 + 1, 12 + 1})):
            calls.clear()
            settings = FinetuneSettings(lr=1e-2, **FAST, micro_batch_size=2, recompute_blocks=r)
            qaft(model, calib, "int3", settings, progress=False)
            assert set(calls.values()) == expected
            if r:
                assert sum(v == 13 for v in calls.values()) > len(calls) / 2
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="recompute_blocks must be True or False"):
        FinetuneSettings(recompute_blocks="yes")


def test_learning_rate_schedule_closed_form():
    assert learning_rate_at(0, 1.0, 10, 2) == 0.5 and learning_rate_at(1, 1.0, 10, 2) == 1.0
    assert learning_rate_at(2, 1.0, 10, 2) == 1.0
    assert math.isclose(learning_rate_at(6, 1.0, 10, 2), 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert learning_rate_at(0, 3e-4, 5, 0) == 3e-4


# ------------------------------------------------------------------------------------------- QAFT
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qaft_lowers_calibration_nll_from_rtn_and_lands_on_the_grid_of_w0(arch):
    model = tiny_model(arch)
    calib = random_tokens(8, 16)
    w0 = layer_weights(model)
    with swapped_weights(model, rtn_weights(model, "int3")):
        rtn_nll = nll(model, calib).value
    result = qaft(model, calib, "int3", FinetuneSettings(lr=1e-2, steps=8, batch_size=4), progress=False)
    with swapped_weights(model, result.weights):
        qaft_nll = nll(model, calib).value
    assert qaft_nll < rtn_nll - 0.01
    assert result.method == "qaft" and result.format.name == "int3"
    assert result.base_fingerprint == weights_fingerprint(model)
    changed = 0
    for name, w in result.weights.items():
        grid = make_grid(w0[name], "int3")
        assert grid.contains(w) and torch.equal(grid.round(w), w)
        changed += int((w != grid.round(w0[name])).sum())
    assert changed > 0
    assert result.extra["changed_vs_rtn"] == changed / sum(w.numel() for w in w0.values())
    assert len(result.extra["loss_curve"]) == 8 and set(result.layer_mse) == set(w0)


def test_model_is_left_at_w0_bit_exactly_after_training_and_on_exception():
    model = tiny_model("gpt2")
    calib = random_tokens(8, 16)
    state = model_state(model)
    flags = [p.requires_grad for p in model.parameters()]
    settings = FinetuneSettings(lr=1e-2, distill_weight=0.5, learned_scales=True, activations=8, kv=4, **FAST)
    qaft(model, calib, "int4", settings, progress=False)
    assert_same_state(model, state)
    assert [p.requires_grad for p in model.parameters()] == flags

    calls = [0]

    def explode(module, args, output):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("interrupted")

    handle = model.transformer.h[1].mlp.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="interrupted"):
        qaft(model, calib, "int4", FinetuneSettings(lr=1e-2, activations=8, kv=4, **FAST), progress=False)
    handle.remove()
    assert_same_state(model, state)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_training_is_deterministic():
    model = tiny_model("opt")
    calib = random_tokens(8, 16)
    settings = FinetuneSettings(lr=5e-3, learned_scales=True, seed=3, **FAST)
    runs = [qaft(model, calib, "int3-g16", settings, progress=False) for _ in range(2)]
    assert runs[0].extra["loss_curve"] == runs[1].extra["loss_curve"]
    assert all(torch.equal(runs[0].weights[n], runs[1].weights[n]) for n in runs[0].weights)


def test_learned_scales_land_on_the_learned_lattice():
    model = tiny_model("gpt2")
    calib = random_tokens(8, 16)
    w0 = layer_weights(model)
    fmt = parse_format("int3")
    result = qaft(model, calib, fmt, FinetuneSettings(lr=1e-2, learned_scales=True, **FAST), progress=False)
    moved = 0
    for name, w in result.weights.items():
        grid0 = make_grid(w0[name], fmt)
        scale = torch.tensor(result.extra["learned_scales"][name], dtype=w.dtype)
        assert torch.all(scale > 0)
        moved += int((scale != grid0.scale).sum())
        assert Grid(fmt, scale, grid0.zero, grid0.group_size).contains(w)
    assert moved > 0
    at_zero_lr = qaft(model, calib, fmt, FinetuneSettings(lr=0.0, learned_scales=True, **ONE_STEP),
                      progress=False)
    assert all(torch.equal(at_zero_lr.weights[n], rtn_weights(model, fmt)[n]) for n in w0)


def test_first_step_losses_equal_independent_nll_and_kl_of_rtn():
    model = tiny_model("llama", torch.float64)
    calib = random_tokens(8, 16)
    result = qaft(model, calib, "int3", FinetuneSettings(lr=0.0, distill_weight=0.25, **FAST), progress=False)
    batch = calib.tokens[result.extra["batch_order"][0]]
    with torch.no_grad():
        teacher = F.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)
        with swapped_weights(model, rtn_weights(model, "int3")):
            student = F.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)
    nll_rtn = -student.gather(-1, batch[:, 1:, None]).mean().item()
    kl_rtn = (F.kl_div(student, teacher, log_target=True, reduction="sum")
              / teacher.shape[0] / teacher.shape[1]).item()
    assert math.isclose(result.extra["nll_curve"][0], float(nll_rtn), rel_tol=1e-10)
    assert math.isclose(result.extra["kl_curve"][0], float(kl_rtn), rel_tol=1e-8)
    assert math.isclose(result.extra["loss_curve"][0], 0.75 * float(nll_rtn) + 0.25 * float(kl_rtn),
                        rel_tol=1e-8)
    assert result.extra["lr_curve"] == [0.0] * 3


def test_training_with_quantized_activations_sees_them_in_the_student_only():
    from landscape.quant.activations import quantized_activations

    model = tiny_model("gpt2", torch.float64)
    calib = random_tokens(8, 16)
    settings = FinetuneSettings(lr=0.0, distill_weight=0.5, activations=4, kv=3, **ONE_STEP)
    result = qaft(model, calib, "int4", settings, progress=False)
    batch = calib.tokens[result.extra["batch_order"][0]]
    with torch.no_grad():
        teacher = F.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)
        with swapped_weights(model, rtn_weights(model, "int4")), quantized_activations(model, 4, kv=3):
            student = F.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)
    assert math.isclose(result.extra["nll_curve"][0], -student.gather(-1, batch[:, 1:, None]).mean().item(),
                        rel_tol=1e-10)
    assert math.isclose(result.extra["kl_curve"][0],
                        (teacher.exp() * (teacher - student)).sum(-1).mean().item(), rel_tol=1e-8)


def test_start_result_is_the_starting_point():
    model = tiny_model("gpt2")
    calib = random_tokens(8, 16)
    w0 = layer_weights(model)
    start = {}
    for name, w in w0.items():  # another lattice point: one code step up wherever that stays in range
        grid = make_grid(w, "int4")
        codes = grid.quantize(w)
        start[name] = grid.dequantize(torch.where(codes < 15, codes + 1, codes))
    result = qaft(model, calib, "int4", FinetuneSettings(lr=0.0, **ONE_STEP),
                  start=quant_result(model, start, "int4", "gptq"), progress=False)
    assert all(torch.equal(result.weights[n], start[n]) for n in w0)
    assert result.settings["start"] == "gptq int4"


def test_qaft_starts_from_gptq_and_refuses_an_off_grid_lorc_result():
    from landscape.quant import gptq, lorc

    model = tiny_model("opt")
    calib = random_tokens(8, 16)
    start = gptq(model, calib, "int3", progress=False)
    result = qaft(model, calib, "int3", FinetuneSettings(lr=0.0, **ONE_STEP), start=start, progress=False)
    assert all(torch.equal(result.weights[n], start.weights[n]) for n in start.weights)
    with pytest.raises(QAFTError, match="not on the int3 grid"):
        qaft(model, calib, "int3", FinetuneSettings(**ONE_STEP),
             start=lorc(model, start, rank=2, progress=False), progress=False)


# ------------------------------------------------------------------------------ full-precision control
def test_control_with_zero_lr_returns_w0_bit_exactly():
    model = tiny_model("gpt2")
    calib = random_tokens(8, 16)
    w0 = layer_weights(model)
    control = fp_finetune(model, calib, "int4", FinetuneSettings(lr=0.0, **FAST), progress=False)
    assert control.format is None and control.method == "fp-finetune"
    assert all(torch.equal(control.weights[n], w0[n]) for n in w0)
    assert control.extra["changed_vs_rtn"] == 0.0 and control.extra["displacement_norm"] == 0.0
    paired = qaft(model, calib, "int4", FinetuneSettings(lr=0.0, **FAST), progress=False)
    differing = {k for k in paired.settings if paired.settings[k] != control.settings[k]}
    assert differing == {"quantize", "start"} and control.settings["format"] == "int4"


def test_paired_control_repeats_the_qaft_run_with_the_quantizer_off():
    model = tiny_model("llama")
    calib = random_tokens(8, 16)
    run = qaft(model, calib, "int3", FinetuneSettings(lr=2e-3, warmup_steps=1, seed=5, **FAST),
               layers="*.mlp.*", progress=False)
    control = paired_control(model, calib, run, progress=False)
    assert list(control.weights) == list(run.weights) and all("mlp" in n for n in run.weights)
    assert (control.extra["batch_order"] == run.extra["batch_order"]
            and control.extra["lr_curve"] == run.extra["lr_curve"])
    differing = {k for k in run.settings if run.settings[k] != control.settings[k]}
    assert (differing == {"quantize", "start", "layers"}
            and control.extra["paired_with"]["label"] == "qaft int3")
    with pytest.raises(QAFTError, match="calibration data"):
        paired_control(model, random_tokens(8, 16, seed=9), run, progress=False)
    with pytest.raises(QAFTError, match="qaft result"):
        paired_control(model, calib, control, progress=False)


def test_the_control_does_not_depend_on_the_format_it_is_paired_with():
    # What lets the study train one control per seed for all formats: the quantizer is off, so the
    # paired format must not reach the weights (same data, seed, batches, steps, layers).
    model = tiny_model("llama")
    calib = random_tokens(8, 16)
    settings = FinetuneSettings(lr=2e-3, seed=3, **FAST)
    controls = [paired_control(model, calib, qaft(model, calib, fmt, settings, progress=False),
                               progress=False) for fmt in ("int3", "int4-g8")]
    w0 = layer_weights(model)
    assert all(torch.equal(controls[0].weights[n], controls[1].weights[n]) for n in w0)
    assert any(not torch.equal(controls[0].weights[n], w0[n]) for n in w0)  # it did train


def test_control_and_qaft_see_the_same_batches_in_the_seeded_order():
    model = tiny_model("gpt2")
    calib = random_tokens(6, 16)
    steps, batch_size, seed = 3, 4, 7

    def batches_seen(train, **kw):
        seen = []
        handle = model.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
        train(model, calib, "int4", FinetuneSettings(lr=1e-3, steps=steps, batch_size=batch_size, seed=seed),
              progress=False, **kw)
        handle.remove()
        return seen[:steps]  # later forwards measure the layer MSE

    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(6, generator=generator), torch.randperm(6, generator=generator)])
    expected = [calib.tokens[order[i * batch_size:(i + 1) * batch_size]] for i in range(steps)]
    for seen in (batches_seen(qaft), batches_seen(fp_finetune)):
        assert len(seen) == steps and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_one_control_step_is_an_adamw_step_along_the_autograd_gradient():
    """First AdamW step (bias-corrected): w1 = w0 - lr * g / (|g| + eps), g = d NLL(batch 0) / d w at w0."""
    model = tiny_model("gpt2", torch.float64)
    calib = random_tokens(8, 16)
    w0 = layer_weights(model)
    lr = 1e-3
    control = fp_finetune(model, calib, None, FinetuneSettings(lr=lr, steps=1), progress=False)
    batch = calib.tokens[control.extra["batch_order"][0]]
    model.zero_grad(set_to_none=True)
    logp = F.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)  # float64, on the model's parameters
    (-logp.gather(-1, batch[:, 1:, None]).mean()).backward()
    for name in w0:
        g = model.get_submodule(name).weight.grad.T  # GPT-2's Conv1D stores (in, out)
        expected = w0[name] - lr * g / (g.abs() + 1e-8)
        assert not torch.equal(control.weights[name], w0[name])
        assert torch.allclose(control.weights[name], expected, rtol=0, atol=1e-12)
    model.zero_grad(set_to_none=True)


def test_one_qaft_step_moves_latent_w0_along_the_ste_gradient_at_the_rtn_point():
    """Latent weights start at w0 (not on the RTN lattice points): after one bias-corrected AdamW step,
    w_q = round(w0 - lr * g / (|g| + eps)) with g = d NLL(batch 0) / d w_q at the RTN model (STE). With lr a
    fraction of a grid step, weights near a rounding boundary flip; from lattice points none could."""
    model = tiny_model("gpt2", torch.float64)
    calib = random_tokens(8, 16)
    w0 = layer_weights(model)
    grids = {n: make_grid(w, "int3", n) for n, w in w0.items()}
    lr = 0.2 * float(min(g.scale.min() for g in grids.values()))  # under half of every grid step
    result = qaft(model, calib, "int3", FinetuneSettings(lr=lr, steps=1, batch_size=4), progress=False)
    batch = calib.tokens[result.extra["batch_order"][0]]
    with swapped_weights(model, {n: g.round(w0[n]) for n, g in grids.items()}):
        model.zero_grad(set_to_none=True)
        logp = F.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)
        (-logp.gather(-1, batch[:, 1:, None]).mean()).backward()
        grads = {n: model.get_submodule(n).weight.grad.T.clone() for n in w0}  # Conv1D stores (in, out)
    model.zero_grad(set_to_none=True)
    changed = 0
    for name, g in grads.items():
        expected = grids[name].round(w0[name] - lr * g / (g.abs() + 1e-8))
        assert torch.equal(result.weights[name], expected), name
        changed += int((expected != grids[name].round(w0[name])).sum())
    assert changed > 0, "no weight left its RTN point: the latent weights did not start at w0"


def test_the_distillation_teacher_is_the_model_at_w0():
    model = tiny_model("opt")
    calib = random_tokens(8, 16)
    control = fp_finetune(model, calib, None, FinetuneSettings(lr=1e-2, distill_weight=1.0, **ONE_STEP),
                          progress=False)  # student == teacher at step 0
    assert control.extra["kl_curve"] == [0.0] and control.extra["loss_curve"] == [0.0]


def test_control_moves_weights_off_w0_and_lowers_nll():
    model = tiny_model("llama")
    calib = random_tokens(8, 16)
    before = nll(model, calib).value
    control = fp_finetune(model, calib, None, FinetuneSettings(lr=1e-2, steps=6, batch_size=4),
                          progress=False)
    with swapped_weights(model, control.weights):
        assert nll(model, calib).value < before - 0.01
    assert control.settings["format"] is None and "changed_vs_rtn" not in control.extra


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, message", [
    (dict(lr=-1e-4), "lr must be"), (dict(lr=float("nan")), "lr must be"), (dict(steps=0), "steps must be"),
    (dict(steps=2.5), "steps must be"), (dict(epochs=0), "epochs must be"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=9), "batch_size=9 exceeds"),
    (dict(warmup_steps=3), "warmup_steps=3"), (dict(distill_weight=1.5), "distill_weight"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(activations=12), "2..8, got 12"),
    (dict(kv=1), "2..8, got 1"), (dict(quantize=False, learned_scales=True), "learned_scales"),
    (dict(layers=["no.such.layer"]), "no.such.layer"),
])
def test_bad_settings_are_refused_before_training(bad, message):
    model = tiny_model("gpt2")
    calib = random_tokens(8, 16)
    forwards = count_forwards(model)
    settings = {**FAST, **bad}
    layers = settings.pop("layers", None)
    with pytest.raises((ValueError, KeyError), match=message):
        qaft(model, calib, "int4", FinetuneSettings(lr=settings.pop("lr", 1e-3), **settings), layers=layers,
             progress=False)
    assert forwards[0] == 0


def test_bad_start_points_are_refused_before_training():
    model = tiny_model("gpt2")
    calib = random_tokens(8, 16)
    forwards = count_forwards(model)
    other_base = tiny_model("gpt2", seed=1)
    cases = {
        "fingerprint": quant_result(other_base, rtn_weights(other_base, "int4"), "int4"),
        "int3": quant_result(model, rtn_weights(model, "int4"), "int4"),  # asked for int3 below
        "not on the int4 grid": quant_result(model, {n: w + 1e-3 for n, w in layer_weights(model).items()},
                                             "int4"),
        "has no weights": quant_result(model, dict(list(rtn_weights(model, "int4").items())[:2]), "int4"),
    }
    for message, start in cases.items():
        fmt = "int3" if message == "int3" else "int4"
        with pytest.raises(QAFTError, match=message):
            qaft(model, calib, fmt, FinetuneSettings(**FAST), start=start, progress=False)
    with pytest.raises(QAFTError, match="w0"):
        qaft(model, calib, "int4", FinetuneSettings(quantize=False, **FAST), start=cases["int3"],
             progress=False)
    with pytest.raises(QAFTError, match="format"):
        qaft(model, calib, None, FinetuneSettings(**FAST), progress=False)
    assert forwards[0] == 0


# -------------------------------------------------------------------------------- lr selection
def test_learning_rate_selection_uses_a_split_of_the_calibration_set_only():
    model = tiny_model("gpt2")
    calib = random_tokens(12, 16)
    search = LearningRateSweepSettings(candidates=[1e-2, 1e-4], n_validation=4)
    sweep = select_learning_rate(model, calib, "int3", FinetuneSettings(steps=2), search, progress=False)
    assert sweep.candidates == (1e-4, 1e-2)
    train, validation = list(sweep.train_sequences), list(sweep.validation_sequences)
    assert len(validation) == 4 and sorted(train + validation) == list(range(12))
    # Recompute one candidate by hand: train on the training part, score the held-back part.
    result = qaft(model, calib.subset(train), "int3", FinetuneSettings(lr=1e-2, steps=2), progress=False)
    with swapped_weights(model, result.weights):
        assert nll(model, calib.subset(validation)).value == sweep.validation_nll[1]
    with swapped_weights(model, rtn_weights(model, "int3")):
        assert nll(model, calib.subset(validation)).value == sweep.start_validation_nll
    assert sweep.best_lr == sweep.candidates[min(range(2), key=lambda i: sweep.validation_nll[i])]
    chosen = qaft(model, calib, "int3", FinetuneSettings(lr=sweep, steps=2), progress=False)
    assert chosen.settings["lr"] == sweep.best_lr and chosen.extra["lr_selection"]["best_lr"] == sweep.best_lr
    with pytest.raises(QAFTError, match="calibration data"):
        qaft(model, random_tokens(12, 16, seed=5), "int3", FinetuneSettings(lr=sweep), progress=False)
    with pytest.raises(QAFTError, match="int4"):
        qaft(model, calib, "int4", FinetuneSettings(lr=sweep), progress=False)
    with pytest.raises(QAFTError, match="n_validation"):
        select_learning_rate(model, calib, "int3", search=LearningRateSweepSettings(n_validation=12),
                             progress=False)
    with pytest.raises(QAFTError, match="unknown settings"):
        select_learning_rate(model, calib, "int3", FinetuneSettings(lr=1e-3),
                             LearningRateSweepSettings(n_validation=4), progress=False)


def test_sweeps_over_disjoint_candidates_combine_into_one_and_others_are_refused():
    def part(rates, values, validation=(0, 1), start=3.0):
        return LearningRateSweep(tuple(rates), tuple(values), start, rates[0], (2, 3), validation, "h",
                                 "int3", "qaft", {"seed": 0}, 1.5)

    whole = LearningRateSweep.combined([part([1e-2], [2.5]), part([1e-4, 1e-3], [2.7, 2.5])])
    assert whole.candidates == (1e-4, 1e-3, 1e-2) and whole.validation_nll == (2.7, 2.5, 2.5)
    assert whole.best_lr == 1e-3 and whole.seconds == 3.0  # a tie goes to the smaller rate, as in one sweep
    with pytest.raises(QAFTError, match="differ from sweep 0 in their split"):
        LearningRateSweep.combined([part([1e-2], [2.5]), part([1e-4], [2.7], validation=(0, 4))])
    with pytest.raises(QAFTError, match="candidates appear in several sweeps"):
        LearningRateSweep.combined([part([1e-2], [2.5]), part([1e-2], [2.5])])


@pytest.mark.parametrize("micro_batch_size", [None, 1, 3])
def test_one_sgd_step_is_w0_minus_lr_times_the_gradient(micro_batch_size):
    """fp-finetune with SGD (no momentum), one step over every sequence: w1 = w0 - lr * dNLL/dw at w0,
    the gradient taken by plain autograd on the model itself over the whole batch; also when the step runs
    as micro-batches of 1 or of 3 + 1 sequences (their gradients summed, each over the batch's tokens)."""
    model = tiny_model("gpt2", torch.float64)
    calib = random_tokens(4, 12, seed=5)
    calib.score_mask[1, :5] = False  # sequences with different numbers of scored tokens
    lr = 0.05
    settings = FinetuneSettings(lr=lr, steps=1, batch_size=4, optimizer="sgd", momentum=0.0,
                                micro_batch_size=micro_batch_size)
    result = fp_finetune(model, calib, settings=settings, progress=False)
    w0 = layer_weights(model)
    params = dict(model.named_parameters())
    logits = model(input_ids=calib.tokens).logits[:, :-1]
    mask = calib.score_mask[:, 1:]
    token_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), calib.tokens[:, 1:].reshape(-1),
                                reduction="none").reshape(mask.shape)
    loss = (token_nll * mask).sum() / mask.sum()
    names = list(result.weights)
    grads = torch.autograd.grad(loss, [params[f"{n}.weight"] for n in names])
    for name, grad in zip(names, grads):
        grad = grad.T if weight_is_transposed(get_layer(model, name)) else grad  # Conv1D stores (in, out)
        torch.testing.assert_close(result.weights[name], w0[name] - lr * grad, rtol=1e-9, atol=1e-12)
    assert result.extra["nll_curve"][0] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert result.settings["optimizer"] == "SGD(momentum=0.0)"
    assert result.settings.get("micro_batch_size") == micro_batch_size
    assert FinetuneSettings.from_recorded(result.settings).optimizer == "sgd"
    assert "optimizer" not in FinetuneSettings().to_dict()  # AdamW runs record what they recorded before
    assert "micro_batch_size" not in FinetuneSettings().to_dict()
    with pytest.raises(QAFTError, match="optimizer must be one of"):
        FinetuneSettings(optimizer="lion")
    for bad in (0, 5, 1.5):
        with pytest.raises(QAFTError, match="micro_batch_size must be an integer in 1..batch_size=4"):
            FinetuneSettings(batch_size=4, micro_batch_size=bad)
