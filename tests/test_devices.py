"""Devices and dtypes: argument checks before any work, and the numerics of low-precision models.

A bfloat16 model computes its forward passes in bfloat16, but landscape forms perturbed points, grids,
NLL sums, layer-MSE errors, QAFT's master weights and the Lanczos / Hutchinson vectors in float32 and
rounds once. Each test here compares the bf16 path with an independent float32 computation of the same
quantity.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens, tiny_model

import landscape.models
from landscape import cli
from landscape.curvature import Curvature
from landscape.engine.directions import random_direction
from landscape.engine.perturb import FunctionObjective, Perturbation, scan
from landscape.engine.sweep import Execution
from landscape.models import DeviceError, parse_dtype, resolve_device
from landscape.objectives import layer_mse, nll, nll_sums_from_logits
from landscape.quant.formats import make_grid
from landscape.quant.qaft import FinetuneSettings, qaft
from landscape.store import StoreMismatchError, partial_path, read_store
from landscape.weights import layer_weights, quantizable_layers, working_dtype


def upcast(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of ``model`` holding exactly its (bf16-representable) weights."""
    twin = tiny_model("llama", torch.float32)
    twin.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return twin


@pytest.fixture
def bf16_llama() -> torch.nn.Module:
    return tiny_model("llama", torch.bfloat16)


# ------------------------------------------------------------------------------------ argument checks
def test_dtype_and_device_names_are_checked_and_name_what_is_accepted():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("float32") is torch.float32 and parse_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match=r"'int8'.*float32.*bfloat16.*float16.*float64"):
        parse_dtype("int8")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match=r"'tpu'.*auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"'cuda'.*CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize("command", ["eval", "quantize", "scan", "radius", "compare", "spectrum"])
@pytest.mark.parametrize("flag, value, message", [
    ("--dtype", "int8", "int8"),
    ("--device", "tpu", "tpu"),
    *([("--device", "cuda:0", "CUDA")] if not torch.cuda.is_available() else []),
])
def test_the_cli_refuses_a_bad_device_or_dtype_before_loading_anything(monkeypatch, command, flag, value,
                                                                        message):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(landscape.models, "load_model", no_load)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli.main([command, "ref-tiny", flag, value])
    assert exit_.value.code == 2
    assert message in err.getvalue() and flag in err.getvalue()


# ------------------------------------------------------------------------------------ numerics
def test_low_precision_computes_in_float32_and_other_dtypes_in_their_own():
    assert working_dtype(torch.bfloat16) is torch.float32 and working_dtype(torch.float16) is torch.float32
    assert working_dtype(torch.float32) is torch.float32 and working_dtype(torch.float64) is torch.float64


def test_a_bf16_grid_is_the_float32_grid_of_the_same_weights_rounded_once():
    w = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    for spec in ("int4", "int3-g32-sym", "int4-g32-fz", "int4-tensor", "mxint8-32"):
        grid, grid32 = make_grid(w, spec), make_grid(w.float(), spec)
        assert torch.equal(grid.scale, grid32.scale) and torch.equal(grid.zero, grid32.zero)
        rounded = grid.round(w)
        assert rounded.dtype is torch.bfloat16
        assert torch.equal(rounded, grid32.round(w.float()).bfloat16())
        assert torch.equal(grid.quantize(w), grid32.quantize(w.float()).bfloat16())  # codes are exact in bf16
        assert grid.contains(rounded) and not grid.contains(w)


def test_a_bf16_perturbation_equals_the_float32_one_rounded_once(bf16_llama):
    u, v = random_direction(bf16_llama, 0), random_direction(bf16_llama, 1)
    w0 = {n: t.clone() for n, t in layer_weights(bf16_llama, u.names).items()}
    a, b = 0.37, -1.9
    expected = {n: (w0[n].float() + a * u[n].float() + b * v[n].float()).bfloat16() for n in u.names}
    naive = {n: w0[n] + a * u[n] + b * v[n] for n in u.names}  # bf16 arithmetic: rounds after each operation
    with Perturbation(bf16_llama, [u, v]) as moved:
        moved.move_to([a, b])
        now = layer_weights(bf16_llama, u.names)
        for n in u.names:
            assert now[n].dtype is torch.bfloat16
            assert torch.equal(now[n], expected[n]), n
        assert any(not torch.equal(now[n], naive[n]) for n in u.names)  # the test can tell them apart
    for n, t in layer_weights(bf16_llama, u.names).items():
        assert torch.equal(t, w0[n])


def test_bf16_nll_sums_are_the_float32_log_softmax_of_the_same_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 9, 50, generator=g) * 4).bfloat16()
    tokens = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    sums = nll_sums_from_logits(logits, tokens, mask)
    assert sums.dtype is torch.float32
    reference = F.cross_entropy(logits.double()[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1),
                                reduction="none").reshape(3, 8).sum(1)
    torch.testing.assert_close(sums.double(), reference, rtol=1e-6, atol=1e-5)


def test_bf16_nll_and_layer_mse_track_the_same_weights_in_float32(bf16_llama):
    data = random_tokens(6, 16)
    twin = upcast(bf16_llama)
    nll16, nll32 = nll(bf16_llama, data), nll(twin, data)
    assert nll16.convention == nll32.convention
    assert abs(nll16.value - nll32.value) < 0.01 * nll32.value  # only the forward pass's rounding differs
    name = next(iter(quantizable_layers(bf16_llama)))
    w = layer_weights(bf16_llama, [name])[name]
    w_q = make_grid(w, "int3").round(w)
    mse16 = layer_mse(bf16_llama, data, {name: w_q})[name]
    mse32 = layer_mse(twin, data, {name: w_q.float()})[name]
    assert mse16 > 0 and abs(mse16 - mse32) < 0.02 * mse32


def test_float64_results_equal_float32_within_float32_rounding():
    model64, model32 = tiny_model("gpt2", torch.float64), tiny_model("gpt2", torch.float32)
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    data = random_tokens(4, 16)
    a, b = nll(model64, data).value, nll(model32, data).value
    assert a != b and abs(a - b) < 1e-5 * abs(a)


def test_bf16_qaft_trains_float32_master_weights_and_returns_bf16_lattice_points(bf16_llama, tmp_path):
    calib = random_tokens(8, 16, seed=3)
    # 6 AdamW steps of 2e-5 move a latent weight by at most 1.2e-4: below half a bf16 ulp of most weights, so
    # bf16 latent weights would never move and QAFT would return RTN; float32 master weights do move
    settings = FinetuneSettings(lr=2e-5, steps=6, batch_size=4, warmup_steps=0)
    low = qaft(bf16_llama, calib, "int4", settings=settings, progress=False)
    high = qaft(upcast(bf16_llama), calib, "int4", settings=settings, progress=False)
    assert low.extra["changed_vs_rtn"] > 0
    changed, changed32 = low.extra["changed_vs_rtn"], high.extra["changed_vs_rtn"]
    assert abs(changed - changed32) < 0.5 * changed32
    agree = []
    for name, w in low.weights.items():
        assert w.dtype is torch.bfloat16
        grid = make_grid(layer_weights(bf16_llama, [name])[name], "int4")
        assert grid.contains(w)
        agree.append(float((w.float() == high.weights[name].bfloat16().float()).float().mean()))
    assert np.mean(agree) > 0.99  # the same steps from the same weights; only the forward pass's rounding
    saved = json.loads(low.save(tmp_path / "q").with_suffix(".json").read_text())
    assert (saved["dtype"], saved["device"]) == ("bfloat16", "cpu")


def test_bf16_curvature_runs_its_krylov_algebra_in_float32(bf16_llama):
    data = random_tokens(4, 16)
    curvature = Curvature(bf16_llama, data, layers="model.layers.0.*", progress=False)
    assert curvature.operator().dtype is torch.float32
    top16 = curvature.spectrum(k=1, k_bottom=0, lanczos_steps=30, return_eigenvectors=False).top
    twin = upcast(bf16_llama)
    top32 = Curvature(twin, data, layers="model.layers.0.*", progress=False).spectrum(
        k=1, k_bottom=0, lanczos_steps=30, return_eigenvectors=False).top
    assert abs(top16.eigenvalues[0] - top32.eigenvalues[0]) < 0.05 * abs(top32.eigenvalues[0])


def test_a_store_made_in_bf16_is_refused_for_a_float32_resume(bf16_llama, tmp_path):
    def fails_after_one_point(model):
        if calls:
            raise RuntimeError("stop after one point")
        calls.append(1)
        return 0.0

    calls: list[int] = []
    path = tmp_path / "scan.h5"
    u = random_direction(bf16_llama, 0)
    with pytest.raises(RuntimeError, match="stop after one point"):
        scan(bf16_llama, u, [0.0, 1.0], [FunctionObjective("f", fails_after_one_point)],
             execution=Execution(store=path, progress=False))
    stored = read_store(partial_path(path))
    assert stored.done.sum() == 1 and stored.provenance["dtype"] == "bfloat16"
    twin = upcast(bf16_llama)
    with pytest.raises(StoreMismatchError, match="dtype"):
        scan(twin, random_direction(twin, 0), [0.0, 1.0], [FunctionObjective("f", lambda m: 0.0)],
             execution=Execution(store=path, resume=True, progress=False))


def test_eval_in_bf16_names_its_dtype_and_stays_near_float32(capsys):
    values = {}
    for dtype, label in (("float32", "fp32"), ("bfloat16", "bf16")):
        assert cli.main(["eval", "ref-tiny", "--dtype", dtype, "--segments", "2", "--seq-len", "32",
                         "--corpus", "wiki", "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [r["variant"] for r in rows] == [label]
        values[dtype] = rows[0]["nll"]
    assert values["bfloat16"] != values["float32"]
    assert abs(values["bfloat16"] - values["float32"]) < 0.02 * values["float32"]
