"""Displacement comparison: norms and cosines against numpy on flattened vectors, eigen-projections and
curvature against a dense fp64 Hessian and its eigh, NLL along paths against swapped-in weights, layer MSE
against hooks, bad inputs refused before any work, store round trip, determinism and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.curvature import Curvature
from landscape.engine.directions import eigenvector_direction
from landscape.objectives import nll, nll_sums_from_logits
from landscape.quant import FinetuneSettings, gptq, qaft, rtn
from landscape.quant.result import QuantResult
from landscape.store import StoreError
from landscape.studies import compare as compare_module
from landscape.studies.compare import ComparisonSettings, compare_displacements
from landscape.studies.comparison import Comparison, ComparisonError
from landscape.weights import (
    get_layer,
    layer_weights,
    quantizable_layers,
    swapped_weights,
    weight_is_transposed,
    weight_matrix,
    weights_fingerprint,
)

SMALL_LAYER = "transformer.h.0.attn.c_proj"  # 8 x 8 weights in the hidden=8 GPT-2


def flat_displacement(model, result: QuantResult, layers: list[str]) -> np.ndarray:
    """w_q - w0 over ``layers`` (zeros where the result has no weight), flattened (numpy float64)."""
    w0 = layer_weights(model, layers)
    parts = [(result.weights[n] - w0[n]).double().numpy().ravel() if n in result.weights
             else np.zeros(w0[n].numel()) for n in layers]
    return np.concatenate(parts)


def hand_layer_mse(model, data, layer: str, w_q: torch.Tensor) -> float:
    """mean over tokens and outputs of (x (w_q - w0)^T)^2, with x captured by a hook on the fp model."""
    module = get_layer(model, layer)
    inputs = []
    handle = module.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=data.tokens)
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()
    error = x @ (w_q.double() - weight_matrix(module).detach().double()).T
    return float(error.pow(2).mean())


def dense_hessian(model, data, layer: str) -> torch.Tensor:
    """d2 NLL / dW2 of the token-mean NLL over ``data`` w.r.t. one layer's (out, in) weight, row-major
    (fp64)."""
    module = get_layer(model, layer)
    w0 = weight_matrix(module).detach().clone()
    name = f"{layer}.weight"

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w = flat.reshape(w0.shape)
        param = w.T if weight_is_transposed(module) else w
        logits = torch.func.functional_call(model, {name: param}, (), {"input_ids": data.tokens}).logits
        return nll_sums_from_logits(logits, data.tokens, data.score_mask).sum() / data.n_scored_tokens

    return torch.autograd.functional.hessian(loss, w0.reshape(-1))


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = tiny_model("gpt2", torch.float64)
    calib = random_tokens(8, 16, seed=1)
    results = {"rtn int4": rtn(model, "int4"), "rtn int3": rtn(model, "int3"),
               "gptq int4": gptq(model, calib, "int4", progress=False),
               "qaft int4": qaft(model, calib, "int4", FinetuneSettings(lr=1e-2, steps=2), progress=False)}
    first_layers = [n for n in quantizable_layers(model) if ".h.0." in n]
    results["rtn int2 h0"] = rtn(model, "int2", layers=first_layers)  # covers a subset of the layers
    return model, results, random_tokens(4, 16, seed=2)


def test_norms_and_cosines_equal_numpy_on_flattened_vectors(setting):
    model, results, data = setting
    c = compare_displacements(model, results, data, progress=False,
                              settings=ComparisonSettings(path_t=(0.0, 1.0), curvature_t=(), between=()))
    layers = list(quantizable_layers(model))
    assert list(c.layers) == layers
    w0 = np.concatenate([w.numpy().ravel() for w in layer_weights(model, layers).values()])
    vectors = {label: flat_displacement(model, r, layers) for label, r in results.items()}
    for label, d in vectors.items():
        row = c.row(label)
        assert row.norm == pytest.approx(np.linalg.norm(d), rel=1e-12)
        assert row.relative_norm == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w0), rel=1e-12)
        for n in layers:
            quantized = n in results[label].weights
            d_layer = ((results[label].weights[n] - layer_weights(model, [n])[n]).numpy() if quantized
                       else np.zeros(1))
            assert row.layer_norms[n] == pytest.approx(np.linalg.norm(d_layer), rel=1e-12, abs=1e-300)
            w_layer = layer_weights(model, [n])[n].numpy()
            assert row.layer_relative_norms[n] == pytest.approx(
                np.linalg.norm(d_layer) / np.linalg.norm(w_layer), rel=1e-12, abs=1e-300)
        for other, e in vectors.items():
            assert c.cosine(label, other) == pytest.approx(d @ e / (np.linalg.norm(d) * np.linalg.norm(e)),
                                                           rel=1e-10, abs=1e-14)
    assert c.row("rtn int2 h0").layer_norms["transformer.h.1.mlp.c_fc"] == 0.0
    assert c.row("rtn int4").format == "int4" and c.formats == ["int4", "int3", "int2"]


def test_projections_and_curvature_equal_dense_eigh_on_a_tiny_model():
    model = tiny_model("gpt2", torch.float64, hidden=8, layers=1)
    data = random_tokens(4, 12, seed=3)
    results = {f"rtn {fmt}": rtn(model, fmt, layers=[SMALL_LAYER]) for fmt in ("int3", "int2")}
    curvature = Curvature(model, data, layers=SMALL_LAYER, progress=False)
    spectrum = curvature.spectrum(k=4, k_bottom=0, lanczos_steps=64)
    c = compare_displacements(model, results, data, eigenvectors=spectrum, progress=False,
                              settings=ComparisonSettings(path_t=(0.0, 1.0), curvature_t=(0.0,)))

    hessian = dense_hessian(model, data, SMALL_LAYER).numpy()
    values, vectors = np.linalg.eigh(hessian)
    top_values, top_vectors = values[::-1][:4], vectors[:, ::-1][:, :4]
    # distinct: vectors defined up to sign
    assert np.min(np.abs(np.diff(top_values))) > 1e-6 * np.abs(top_values).max()
    np.testing.assert_allclose(c.eigenvalues, top_values, rtol=1e-8, atol=1e-12)
    for label, result in results.items():
        d = flat_displacement(model, result, [SMALL_LAYER])
        row = c.row(label)
        np.testing.assert_allclose(np.abs(row.projections), np.abs(d @ top_vectors), rtol=1e-7, atol=1e-12)
        assert row.captured_fraction == pytest.approx(np.sum((d @ top_vectors) ** 2) / (d @ d), rel=1e-7)
        assert row.curvature[0] == pytest.approx(d @ hessian @ d / (d @ d), rel=1e-9)

    # the same eigenvectors given as directions of this model project identically
    directions = [eigenvector_direction(model, spectrum.top.direction(i), "dense test") for i in range(4)]
    again = compare_displacements(model, results, data, eigenvectors=directions, progress=False,
                                  settings=ComparisonSettings(path_t=(0.0,), curvature_t=()))
    np.testing.assert_allclose(again.row("rtn int3").projections, c.row("rtn int3").projections, rtol=1e-12)
    assert np.isnan(again.eigenvalues).all()


def test_nll_along_paths_and_between_endpoints_equal_swapped_in_weights(setting):
    model, results, data = setting
    chosen = {k: results[k] for k in ("rtn int4", "gptq int4", "qaft int4")}
    c = compare_displacements(model, chosen, data, progress=False,
                              settings=ComparisonSettings(path_t=(0.0, 0.5, 1.0), curvature_t=()))
    at_w0 = nll(model, data).value
    assert c.center_nll.value == at_w0
    for label, result in chosen.items():
        row = c.row(label)
        w0 = layer_weights(model, list(result.weights))
        for n, w in result.weights.items():  # lerp is exact at the ends, so t = 1 *is* the quantized model
            assert torch.equal(torch.lerp(w0[n], w, 1.0), w) and torch.equal(torch.lerp(w0[n], w, 0.0), w0[n])
        with swapped_weights(model, result.weights):
            at_endpoint = nll(model, data).value
        with swapped_weights(model, {n: w0[n] + 0.5 * (w - w0[n]) for n, w in result.weights.items()}):
            at_middle = nll(model, data).value
        assert row.path_nll[0] == at_w0 and row.path_nll[2] == at_endpoint and row.nll.value == at_endpoint
        assert row.path_nll[1] == pytest.approx(at_middle, rel=1e-12)
        assert row.nll.low <= at_endpoint <= row.nll.high
    (segment,) = c.between  # the default joins the GPTQ and QAFT endpoints of the same format
    assert (segment.start, segment.end) == ("gptq int4", "qaft int4")
    g, q = chosen["gptq int4"].weights, chosen["qaft int4"].weights
    with swapped_weights(model, {n: (g[n] + q[n]) / 2 for n in g}):
        assert segment.nll[1] == pytest.approx(nll(model, data).value, rel=1e-12)
    assert segment.nll[0] == c.row("gptq int4").nll.value and segment.nll[2] == c.row("qaft int4").nll.value
    layers = list(g)
    diff = (flat_displacement(model, chosen["qaft int4"], layers)
            - flat_displacement(model, chosen["gptq int4"], layers))
    assert segment.distance == pytest.approx(np.linalg.norm(diff), rel=1e-9)
    # still w0
    assert torch.equal(layer_weights(model)[SMALL_LAYER], weight_matrix(get_layer(model, SMALL_LAYER)))


def test_layer_mse_equals_hooked_inputs_and_curvature_runs_along_the_path(setting):
    model, results, data = setting
    # 2 batches of 2 segments: an interval over batches
    c = compare_displacements(model, {"rtn int3": results["rtn int3"]}, data, progress=False,
                              settings=ComparisonSettings(path_t=(1.0,), curvature_t=(0.0, 1.0),
                                                          batch_size=2))
    row = c.row("rtn int3")
    for n, w in results["rtn int3"].weights.items():
        assert row.layer_mse[n] == pytest.approx(hand_layer_mse(model, data, n, w), rel=1e-10)
    assert row.layer_mse_sum == pytest.approx(sum(row.layer_mse.values()), rel=1e-15)
    # curvature at t=1 is the Rayleigh quotient at the quantized point: a finite difference of the NLL there
    d = {n: w - layer_weights(model, [n])[n] for n, w in results["rtn int3"].weights.items()}
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in d.values()))
    h = 1e-3

    def nll_at(offset: float) -> float:
        with swapped_weights(model,
                             {n: w + offset * d[n] / norm for n, w in results["rtn int3"].weights.items()}):
            return nll(model, data).value

    second = (nll_at(h) - 2 * nll_at(0.0) + nll_at(-h)) / h**2
    assert row.curvature[1] == pytest.approx(second, rel=1e-3, abs=1e-6)
    assert row.curvature_low[1] <= row.curvature[1] <= row.curvature_high[1]
    # the slope at t=1 is the first derivative of the NLL there (central difference, O(h^2) error)
    first = (nll_at(h) - nll_at(-h)) / (2 * h)
    assert row.slope[1] == pytest.approx(first, rel=1e-4, abs=1e-7)
    assert row.slope_low[1] <= row.slope[1] <= row.slope_high[1] and "gᵀu t=1" in c.markdown()


def test_bad_inputs_are_refused_before_any_work(setting, monkeypatch):
    model, results, data = setting

    def no_work(*args, **kwargs):
        raise AssertionError("evaluation started before the inputs were checked")

    monkeypatch.setattr(compare_module, "nll", no_work)
    monkeypatch.setattr(compare_module, "layer_mse", no_work)
    other = tiny_model("gpt2", torch.float64, seed=1)
    foreign = rtn(other, "int4")
    with pytest.raises(ComparisonError, match="fingerprint"):
        compare_displacements(model, {"ok": results["rtn int4"], "foreign": foreign}, data, progress=False)
    with pytest.raises(ComparisonError, match="share the labels"):
        compare_displacements(model, [results["rtn int4"], rtn(model, "int4")], data, progress=False)
    with pytest.raises(ComparisonError, match="path_t"):
        compare_displacements(model, results, data, progress=False,
                              settings=ComparisonSettings(path_t=(0.0, float("nan"))))
    with pytest.raises(ComparisonError, match="between pair"):
        compare_displacements(model, results, data, progress=False,
                              settings=ComparisonSettings(between=[("rtn int4", "nope")]))
    with pytest.raises(ComparisonError, match="level"):
        compare_displacements(model, results, data, progress=False, settings=ComparisonSettings(level=1.5))
    # a direction made on another model's weights (same shapes) is refused by its fingerprint
    stranger = eigenvector_direction(other, {SMALL_LAYER: torch.randn(32, 32, dtype=torch.float64)})
    with pytest.raises(ComparisonError, match="eigenvector 0.*fingerprint"):
        compare_displacements(model, results, data, eigenvectors=[stranger], progress=False)
    # and a direction of another architecture by its layer names and shapes
    with pytest.raises(ComparisonError, match="eigenvector 0.*shape"):
        compare_displacements(model, results, data, eigenvectors=[{SMALL_LAYER: torch.ones(8, 8)}],
                              progress=False)


def test_store_round_trip_per_format_tables_and_determinism(setting, tmp_path):
    model, results, data = setting
    chosen = {k: results[k] for k in ("rtn int4", "gptq int4", "qaft int4", "rtn int3")}
    first = compare_displacements(model, chosen, data, progress=False,
                                  settings=ComparisonSettings(path_t=(0.0, 0.5, 1.0), curvature_t=(0.5,)))
    second = compare_displacements(model, chosen, data, progress=False,
                                   settings=ComparisonSettings(path_t=(0.0, 0.5, 1.0), curvature_t=(0.5,)))
    for a, b in zip(first.rows, second.rows):  # bit-identical
        assert a.norm == b.norm and a.nll == b.nll and np.array_equal(a.path_nll, b.path_nll)
        assert np.array_equal(a.curvature, b.curvature)
    path = first.to_store(tmp_path / "compare.h5")
    read = Comparison.from_store(path)
    assert read.markdown(per_layer=True) == first.markdown(per_layer=True)
    np.testing.assert_array_equal(read.cosines, first.cosines)
    from landscape.store import read_store

    stored = read_store(path)
    assert list(stored.table("tables/int4")["label"]) == ["rtn int4", "gptq int4", "qaft int4"]
    np.testing.assert_array_equal(stored.table("tables/int3")["norm"], [first.row("rtn int3").norm])
    assert stored.provenance["model_fingerprint"] == weights_fingerprint(model, list(first.layers))
    with pytest.raises(StoreError, match="already exists"):
        first.to_store(path)
    report = first.markdown()
    assert "## int4" in report and "## int3" in report and "gptq int4 → qaft int4" in report


def test_cli_compare_on_ref_tiny(tmp_path, capsys):
    import landscape.cli.compare  # noqa: F401  (registers the command)
    from landscape.cli import main
    from landscape.data import calibration_set
    from landscape.models import load_model

    # before loading a model
    assert main(["compare", "ref-tiny", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "no saved quantized model" in capsys.readouterr().err
    lm = load_model("ref-tiny")
    calib = calibration_set(lm.tokenizer, 8, 32, context_length=lm.info.context_length)
    paths = [rtn(lm.model, "int3").save(tmp_path / "rtn.int3"),
             gptq(lm.model, calib, "int3", progress=False).save(tmp_path / "gptq.int3")]
    out = tmp_path / "c.h5"
    code = main(["compare", "ref-tiny", *map(str, paths), "--seq-len", "32", "--segments", "2", "--path",
                 "0:1:3", "--curvature-t", "0:0:1", "--curvature-segments", "2", "--eigenvectors", "2",
                 "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "## int3" in printed and "| rtn int3 |" in printed and "| gptq int3 |" in printed
    stored = Comparison.from_store(out)
    loaded = QuantResult.load(paths[0])
    layers = list(stored.layers)
    d = flat_displacement(lm.model, loaded, layers)
    assert stored.row("rtn int3").norm == pytest.approx(np.linalg.norm(d), rel=1e-9)
    assert stored.eigenvalues.shape == (2,) and stored.eigenvalues[0] >= stored.eigenvalues[1]
    assert "of 2 converged after" in printed and sum(stored.provenance["eigenvectors"]["converged"]) <= 2
    assert main(["compare", "ref-tiny", *map(str, paths), "--eigenvectors", "4", "--lanczos-steps", "2",
                 "--no-progress"]) == 2
    assert "--lanczos-steps must be >= --eigenvectors" in capsys.readouterr().err


def test_qaft_advantage_after_the_control_is_stated_from_endpoint_nlls_and_survives_the_store(setting,
                                                                                              tmp_path):
    from landscape.quant.qaft import paired_control
    from landscape.stats import control_adjusted_gap

    model, results, data = setting
    calib = random_tokens(8, 16, seed=1)
    chosen = {k: results[k] for k in ("gptq int4", "qaft int4")}
    chosen["control"] = paired_control(model, calib, results["qaft int4"])
    comparison = compare_displacements(model, chosen, data, progress=False,
                                       settings=ComparisonSettings(curvature_t=[], path_t=[0.0, 1.0]))
    [gap] = comparison.provenance["control_adjusted"]
    nlls = {}
    for label, weights in (("w0", {}), *((k, r.weights) for k, r in chosen.items())):
        with swapped_weights(model, weights):
            nlls[label] = nll(model, data)
    expected = control_adjusted_gap("int4", data.corpus, nlls["gptq int4"].segment_nll_sum,
                                    [nlls["qaft int4"].segment_nll_sum], nlls["w0"].segment_nll_sum,
                                    [nlls["control"].segment_nll_sum], nlls["w0"].segment_tokens)
    assert gap["format"] == "int4" and gap["remaining"] == pytest.approx(
        [expected.remaining.value, expected.remaining.low, expected.remaining.high], rel=1e-9)
    assert gap["remaining"][0] == pytest.approx(
        (nlls["gptq int4"].value - nlls["qaft int4"].value) - (nlls["w0"].value - nlls["control"].value),
        rel=1e-9)
    assert gap["sentence"] in comparison.markdown()
    assert gap["sentence"] in Comparison.from_store(comparison.to_store(tmp_path / "c.h5")).markdown()
