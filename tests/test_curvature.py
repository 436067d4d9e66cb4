"""Curvature against dense float64 linear algebra on tiny models.

Every spectral quantity is checked against an independent computation: the dense Hessian built row by row
with double backward (``torch.autograd.grad`` of each gradient entry), ``torch.linalg.eigh``, a dense
J^T H_logits J with the closed-form softmax Hessian, and central finite differences of the NLL.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens, tiny_model

from landscape import curvature
from landscape.curvature import (
    ConvergenceWarning,
    Curvature,
    CurvatureError,
    Density,
    DirectionalCurvature,
    DirectionMismatchError,
    PathCurvature,
    Spectrum,
    TraceEstimate,
    direction_space,
    directional,
    operators,
    read_curvature,
    weight_space,
)
from landscape.objectives import NLLConvention, nll, segment_nll_sums
from landscape.store import StoreRecord, read_store, run_tasks
from landscape.weights import LayerSelectionError, layer_weights, quantizable_layers, swapped_weights

# Tiny problems are dominated by per-op overhead; extra threads only contend on the shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------- dense references
def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def jacobian_rows(output: torch.Tensor, params: list[torch.Tensor], chunk: int = 128) -> torch.Tensor:
    """d output / d params as a dense (output.numel(), n_params) matrix, one reverse-mode pass per row
    (rows batched with ``is_grads_batched``; parameters in stored layout, concatenated)."""
    flat = output.reshape(-1)
    basis = torch.eye(flat.numel(), dtype=flat.dtype)
    rows = []
    for start in range(0, flat.numel(), chunk):
        grads = torch.autograd.grad(flat, params, grad_outputs=basis[start : start + chunk],
                                    is_grads_batched=True, retain_graph=True)
        rows.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1))
    return torch.cat(rows).detach()


def dense_hessian(model, data, layers: list[str]) -> torch.Tensor:
    """d2 NLL / dw2 over the named layers' weight parameters (stored layout, concatenated in ``layers``
    order): the Jacobian of the gradient, by double backward."""
    modules = quantizable_layers(model)
    params = [modules[name].weight for name in layers]
    loss = segment_nll_sums(model, data.tokens, data.score_mask).sum() / data.n_scored_tokens
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    return jacobian_rows(grad, params)


def dense_ggn(model, data, layers: list[str]) -> torch.Tensor:
    """sum over scored positions of J^T (diag(p) - p p^T) J / N: the closed-form softmax cross-entropy Hessian
    between dense logit Jacobians."""
    modules = quantizable_layers(model)
    params = [modules[name].weight for name in layers]
    logits = model(input_ids=data.tokens).logits[:, :-1]  # (b, t-1, vocab): predicts tokens[:, 1:]
    positions = data.score_mask[:, 1:].nonzero().tolist()
    jac = jacobian_rows(torch.stack([logits[b, t] for b, t in positions]), params)  # (positions * vocab, n)
    jac = jac.reshape(len(positions), logits.shape[-1], -1)
    ggn = torch.zeros(jac.shape[-1], jac.shape[-1], dtype=torch.float64)
    for (b, t), jac_position in zip(positions, jac):
        p = F.softmax(logits[b, t], dim=-1).detach()
        ggn += jac_position.T @ (torch.diag(p) - torch.outer(p, p)) @ jac_position
    return ggn / data.n_scored_tokens


def to_stored_layout(model, direction: dict[str, torch.Tensor], layers: list[str]) -> torch.Tensor:
    """(out, in) direction -> flat vector in the parameters' stored layout (Conv1D is (in, out))."""
    modules = quantizable_layers(model)
    return torch.cat([(direction[n].T if _is_conv1d(modules[n]) else direction[n]).reshape(-1)
                      for n in layers])


def nll_at(model, data, weights) -> float:
    with swapped_weights(model, weights):
        return nll(model, data).value


def fd_second_derivative(model, data, direction, h: float = 1e-2) -> float:
    """Second derivative of the token-mean NLL (objectives.nll) along the unit direction: central differences
    at steps h and 2h, Richardson-extrapolated to remove the O(h^2) error (float64 roundoff ~ 1e-10 here)."""
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
    w0 = layer_weights(model, list(direction))
    f = {s: nll_at(model, data, {n: w0[n] + s * h * direction[n] / norm for n in direction})
         for s in (-2, -1, 0, 1, 2)}
    central_h = (f[1] - 2 * f[0] + f[-1]) / h**2
    central_2h = (f[2] - 2 * f[0] + f[-2]) / (2 * h) ** 2
    return (4 * central_h - central_2h) / 3


def fd_first_derivative(model, data, direction, h: float = 1e-3) -> float:
    """First derivative of the token-mean NLL along the unit direction: central differences at h and 2h,
    Richardson-extrapolated (error O(h^4))."""
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
    w0 = layer_weights(model, list(direction))
    f = {s: nll_at(model, data, {n: w0[n] + s * h * direction[n] / norm for n in direction})
         for s in (-2, -1, 1, 2)}
    return (4 * (f[1] - f[-1]) / (2 * h) - (f[2] - f[-2]) / (4 * h)) / 3


def random_direction(model, layers: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(m.weight.shape[::-1]) if _is_conv1d(m) else tuple(m.weight.shape)
              for n, m in quantizable_layers(model).items()}
    return {n: torch.randn(shapes[n], generator=g, dtype=torch.float64) for n in layers}


@pytest.fixture(scope="module")
def gpt2_problem(one_thread):
    """Tiny GPT-2 (768 quantizable weights, Conv1D layers), float64, 4 x 8 random tokens, and its dense
    Hessian."""
    model = tiny_model("gpt2", torch.float64, hidden=8, layers=1)
    data = random_tokens(4, 8)
    layers = list(quantizable_layers(model))
    return model, data, layers, dense_hessian(model, data, layers)


@pytest.fixture(scope="module")
def gpt2_spectrum(gpt2_problem):
    model, data, _, _ = gpt2_problem
    # batch_size=3 splits the 4 segments 3 + 1: unequal batches, so a wrong per-batch weighting would show.
    return Curvature(model, data, batch_size=3, progress=False).spectrum(k=3, k_bottom=2, lanczos_steps=80)


def _block(layers: list[str], model, chosen: list[str]) -> torch.Tensor:
    """Indices of the chosen layers' weights in the dense matrix of ``layers``."""
    modules = quantizable_layers(model)
    offsets, start = {}, 0
    for n in layers:
        offsets[n] = (start, start + modules[n].weight.numel())
        start += modules[n].weight.numel()
    return torch.cat([torch.arange(*offsets[n]) for n in chosen])


# ------------------------------------------------------------------------------------------ spectra
def test_dense_reference_uses_the_objectives_nll(gpt2_problem):
    model, data, _, _ = gpt2_problem
    with torch.no_grad():
        loss = float(segment_nll_sums(model, data.tokens, data.score_mask).sum() / data.n_scored_tokens)
    assert loss == pytest.approx(nll(model, data).value, rel=1e-14)


def test_operator_products_equal_the_dense_hessian(gpt2_problem):
    model, data, layers, hessian = gpt2_problem
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for batch_size in (1, 3):  # the token-mean NLL of the whole set, whatever the batching
        operator = Curvature(model, data, batch_size=batch_size).operator()
        with torch.no_grad():  # products enable autograd themselves
            torch.testing.assert_close(operator.matvec(v), hessian @ v, rtol=1e-10, atol=1e-12)
            # v^T H v folded layer by layer, without the product vector
            assert operator.quadratic_form(v) == pytest.approx(float(v @ hessian @ v), rel=1e-10)
            out = torch.full_like(v, 5.0)  # whatever it held is overwritten
            assert operator.matvec_into(v, out) is out
            torch.testing.assert_close(out, hessian @ v, rtol=1e-10, atol=1e-12)
        assert operator.n_matvecs == 3
    assert weight_space(model).parameter_names == tuple(f"{n}.weight" for n in layers)


def test_a_mapped_product_hands_the_heap_back_after_each_batch(gpt2_problem, monkeypatch):
    """A product large enough to map its blocks (SmolLM2's) releases the heap's freed memory after each
    batch's backward pass, the same product to the last bit; a small one (a toy's) never pays for one."""
    from landscape.curvature import operators

    model, data, _, hessian = gpt2_problem
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls: list[int] = []
    monkeypatch.setattr(operators, "release_freed_memory", lambda: calls.append(1) or True)
    small = Curvature(model, data, batch_size=3).operator()  # batches of 3 + 1 segments
    expected = small.matvec(v)
    assert calls == []
    monkeypatch.setattr(operators, "MAPPED_PRODUCT_BYTES", 0)
    mapped = Curvature(model, data, batch_size=3).operator()
    assert torch.equal(mapped.matvec(v), expected)
    assert len(calls) == 2


def test_flat_vectors_and_their_layer_views_follow_the_stored_layout(gpt2_problem):
    """A flat vector is each weight parameter flattened as stored (GPT-2's Conv1D: (in, out)); ``views`` gives
    each layer's (out, in) matrix without a copy, and ``flatten`` of those views is the vector again."""
    model, _, layers, _ = gpt2_problem
    space = weight_space(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    tensors = {n: torch.randn(params[f"{n}.weight"].shape[::-1], generator=g, dtype=torch.float64)
               for n in space.layers}  # (out, in) of each (in, out) parameter
    flat = space.flatten(tensors, torch.empty(0, dtype=torch.float64))
    expected = torch.cat([tensors[n].T.reshape(-1) for n in space.layers])  # stored layout, in order
    assert torch.equal(flat, expected)
    views = space.views(flat)
    assert all(torch.equal(views[n], tensors[n]) for n in space.layers)
    assert all(views[n].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for n in views)
    views[space.layers[-1]][0, 1] = 7.0  # a write through a view is a write to the flat vector
    assert torch.equal(space.flatten(views, flat), flat) and (flat == 7.0).sum() == 1
    assert space.unflatten(flat).keys() == views.keys()


def test_operator_equals_hessian_eigenthings_and_leaves_grads_alone(gpt2_problem):
    """The lean operator (products accumulated into views of one output) computes what the library's
    HessianOperator computes, and any .grad a parameter had before a product is there after it."""
    from hessian_eigenthings import HessianOperator

    model, data, layers, hessian = gpt2_problem
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problem = Curvature(model, data, batch_size=3)
    names = set(weight_space(model).parameter_names)
    batches = list(data.batches(3))

    def scaled(m, batch):
        return segment_nll_sums(m, *batch).sum() * len(batches) / data.n_scored_tokens

    library = HessianOperator(model, batches, scaled, param_filter=lambda name, _p: name in names)
    before = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters() if name in names}
    for name, p in model.named_parameters():
        p.grad = before.get(name)
    try:
        ours = problem.operator().matvec(v)
        torch.testing.assert_close(ours, library.matvec(v), rtol=1e-12, atol=1e-14)
        assert problem.operator().quadratic_form(v) == pytest.approx(float(v @ ours), rel=1e-12)
        for name, p in model.named_parameters():
            if name in names:
                assert p.grad is before[name] and bool((p.grad == 7.0).all())
    finally:
        for p in model.parameters():
            p.grad = None


def test_top_and_bottom_eigenvalues_match_dense_eigh(gpt2_problem, gpt2_spectrum):
    _, _, _, hessian = gpt2_problem
    exact = torch.linalg.eigvalsh(hessian).numpy()  # ascending
    assert gpt2_spectrum.converged and gpt2_spectrum.top.converged.all()
    np.testing.assert_allclose(gpt2_spectrum.top.eigenvalues, exact[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(gpt2_spectrum.bottom.eigenvalues, exact[:2], rtol=1e-6)
    assert gpt2_spectrum.n_params == hessian.shape[0] == 768
    assert gpt2_spectrum.lanczos_steps == 80


def test_eigenvectors_are_out_in_directions_of_the_dense_hessian(gpt2_problem, gpt2_spectrum):
    model, _, layers, hessian = gpt2_problem
    for pairs in (gpt2_spectrum.top, gpt2_spectrum.bottom):
        for i, value in enumerate(pairs.eigenvalues):
            direction = pairs.direction(i)
            for name, tensor in direction.items():  # (out, in): GPT-2 Conv1D weights are stored (in, out)
                assert tuple(tensor.shape) == tuple(quantizable_layers(model)[name].weight.shape[::-1])
            v = to_stored_layout(model, direction, layers)
            assert float(v.norm()) == pytest.approx(1.0, abs=1e-10)
            residual = float((hessian @ v - value * v).norm())
            assert residual <= 1e-6 * abs(value)


def test_reported_residuals_are_the_true_residuals(gpt2_problem):
    model, data, layers, hessian = gpt2_problem
    # 30 steps leave some pairs unconverged: their residuals matter most
    with pytest.warns(ConvergenceWarning):
        spectrum = Curvature(model, data, progress=False).spectrum(k=3, k_bottom=1, lanczos_steps=30)
    for pairs in (spectrum.top, spectrum.bottom):
        for i, (value, reported) in enumerate(zip(pairs.eigenvalues, pairs.residuals)):
            v = to_stored_layout(model, pairs.direction(i), layers)
            true = float((hessian @ v - value * v).norm())
            assert reported == pytest.approx(true, rel=1e-4, abs=1e-12)


def test_non_converged_lanczos_is_flagged(gpt2_problem):
    model, data, layers, hessian = gpt2_problem
    with pytest.warns(ConvergenceWarning, match="not converged"):
        spectrum = Curvature(model, data, progress=False).spectrum(k=3, k_bottom=1, lanczos_steps=5)
    assert not spectrum.converged
    top = torch.linalg.eigvalsh(hessian).numpy()[::-1][:3]
    for ok, value, exact_value in zip(spectrum.top.converged, spectrum.top.eigenvalues, top):
        if abs(value - exact_value) > 1e-4 * abs(exact_value):  # every wrong eigenvalue must be flagged
            assert not ok
    assert not spectrum.top.converged.all()
    assert spectrum.to_record().provenance["converged"] is False


def test_a_closed_krylov_space_returns_exact_eigenvalues_with_a_warning(gpt2_problem):
    model, data, layers, hessian = gpt2_problem
    chosen = ["transformer.h.0.attn.c_proj"]  # 64 weights but fewer distinct eigenvalues
    block = hessian[_block(layers, model, chosen)][:, _block(layers, model, chosen)]
    exact = torch.linalg.eigvalsh(block).numpy()
    distinct = exact[np.concatenate([[True], np.diff(exact) > 1e-9 * np.abs(exact).max()])]
    with pytest.warns(ConvergenceWarning, match="Krylov space closed"):
        spectrum = Curvature(model, data, layers=chosen, progress=False).spectrum(k=40, k_bottom=24,
                                                                                  lanczos_steps=64)
    assert spectrum.lanczos_steps == len(distinct) < 64
    assert len(spectrum.top) == 40 and len(spectrum.bottom) == len(distinct) - 40
    found = np.sort(np.concatenate([spectrum.top.eigenvalues, spectrum.bottom.eigenvalues]))
    np.testing.assert_allclose(found, distinct, atol=1e-8)
    assert spectrum.converged


class _SharedLayers(torch.nn.Module):
    """A model that is not a transformers one: a linear layer called twice, and a head tied to the embedding
    (one parameter held by two modules), the cases where a layer's output gradient alone does not give its
    weight's gradient."""

    def __init__(self, vocab: int, hidden: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.twice = torch.nn.Linear(hidden, hidden)
        self.mix = torch.nn.Linear(hidden, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, vocab)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor):
        from types import SimpleNamespace

        x = torch.tanh(self.twice(torch.tanh(self.twice(self.embed(input_ids)))))
        return SimpleNamespace(logits=self.head(torch.tanh(self.mix(x)) + x))


def test_products_are_exact_for_a_layer_called_twice_and_a_tied_weight():
    from conftest import VOCAB

    torch.manual_seed(0)
    model = _SharedLayers(VOCAB).double().eval()
    data = random_tokens(3, 8)
    space = weight_space(model)
    modules = dict(model.named_modules())
    params = [modules[layer].weight for layer in space.layers]
    assert "head" in space.layers and params[space.layers.index("head")] is model.embed.weight
    loss = segment_nll_sums(model, data.tokens, data.score_mask).sum() / data.n_scored_tokens
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    hessian = jacobian_rows(grad, params)
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    operator = Curvature(model, data, batch_size=2, progress=False).operator()
    torch.testing.assert_close(operator.matvec(v), hessian @ v, rtol=1e-10, atol=1e-12)
    assert operator.quadratic_form(v) == pytest.approx(float(v @ hessian @ v), rel=1e-10)


@pytest.mark.parametrize("arch, selection", [
    ("gpt2", "transformer.h.0.attn.c_attn"),  # one layer (Conv1D)
    ("gpt2", "transformer.h.0.mlp.*"),  # a glob subset
    ("llama", ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]),  # nn.Linear layers
])
def test_layer_subset_spectrum_is_the_diagonal_block(arch, selection, gpt2_problem):
    if arch == "gpt2":
        model, data, layers, hessian = gpt2_problem
        chosen = weight_space(model, selection).layers
        block = hessian[_block(layers, model, list(chosen))][:, _block(layers, model, list(chosen))]
    else:
        model, data = tiny_model("llama", torch.float64, hidden=8, layers=1), random_tokens(3, 8)
        chosen = weight_space(model, selection).layers
        block = dense_hessian(model, data, list(chosen))
    spectrum = Curvature(model, data, layers=selection, progress=False).spectrum(
        k=2, k_bottom=2, lanczos_steps=min(block.shape[0], 150))
    exact = torch.linalg.eigvalsh(block).numpy()
    assert spectrum.layers == chosen
    np.testing.assert_allclose(spectrum.top.eigenvalues, exact[::-1][:2], rtol=1e-6)
    np.testing.assert_allclose(spectrum.bottom.eigenvalues, exact[:2], rtol=1e-6)
    v = to_stored_layout(model, spectrum.top.direction(0), list(chosen))
    assert float((block @ v - exact[-1] * v).norm()) <= 1e-6 * abs(exact[-1])


def test_ggn_eigenvalues_match_dense_jt_h_j(gpt2_problem):
    model, _, _, _ = gpt2_problem
    data = random_tokens(2, 6, seed=1)
    chosen = ["transformer.h.0.mlp.c_proj"]
    ggn = dense_ggn(model, data, chosen)
    exact = torch.linalg.eigvalsh(ggn).numpy()
    assert exact.min() > -1e-12  # the GGN of softmax cross-entropy is positive semi-definite
    spectrum = Curvature(model, data, layers=chosen, operator="ggn", progress=False).spectrum(
        k=3, k_bottom=0, lanczos_steps=60)
    np.testing.assert_allclose(spectrum.top.eigenvalues, exact[::-1][:3], rtol=1e-6)
    assert spectrum.operator == "ggn"
    direction = random_direction(model, chosen, seed=3)
    u = to_stored_layout(model, direction, chosen)
    rq = Curvature(model, data, operator="ggn", progress=False).rayleigh_quotient(direction)
    assert rq.value == pytest.approx(float(u @ ggn @ u / (u @ u)), rel=1e-9)


# --------------------------------------------------------------------------------- trace and density
@pytest.mark.parametrize("n_matvecs", [6, 30])
def test_lean_hutch_plus_plus_equals_hessian_eigenthings(gpt2_problem, n_matvecs):
    """The in-place Hutch++ draws the library's probes from the same seed and gives its estimate and standard
    error (to rounding: Gram-Schmidt rows instead of a Householder QR span the same sketch); its chunked
    random signs are the library's."""
    from hessian_eigenthings import trace as library_trace
    from hessian_eigenthings.linalg import SingleDeviceBackend

    from landscape.curvature.operators import rademacher
    from landscape.curvature.spectrum import lean_hutch_plus_plus

    model, data, _, hessian = gpt2_problem
    operator = Curvature(model, data, progress=False).operator()
    ours = lean_hutch_plus_plus(operator, n_matvecs, seed=5)
    theirs = library_trace(operator, num_matvecs=n_matvecs, method="hutch++", seed=5)
    assert ours == pytest.approx((theirs.estimate, theirs.stderr), rel=1e-9)
    probe = torch.empty(3_000_001)
    expected = SingleDeviceBackend().rademacher_like(probe, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rademacher(probe.numel(), probe.dtype, probe.device, torch.Generator().manual_seed(2),
                                  chunk=65_536), expected)
    # a sketch wider than the space: the vanishing rows are dropped and the low-rank part is the exact trace
    from hessian_eigenthings import LambdaOperator

    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = a + a.T
    small = LambdaOperator(lambda v: a @ v, 5, dtype=torch.float64)
    value, _ = lean_hutch_plus_plus(small, 60, seed=0)  # 20 sketch rows in 5 dimensions
    assert value == pytest.approx(float(a.trace()), rel=1e-10)


def test_a_hutchpp_sketch_on_disk_gives_the_same_trace_and_leaves_no_files(gpt2_problem, tmp_path,
                                                                            monkeypatch):
    """With krylov_dir the sketch's rows are mapped files (one per row, each let go after each use): the
    estimate and its error are those of the sketch in memory, bit for bit, and the folder is emptied."""
    model, data, _, _ = gpt2_problem
    made, released, original_release = [], [], operators.MappedBasisBackend.release

    def release_spy(self, *vectors):
        made[:] = list(self.maps)
        released.extend(v.data_ptr() for v in vectors if v.data_ptr() in self.maps)
        original_release(self, *vectors)

    monkeypatch.setattr(operators.MappedBasisBackend, "release", release_spy)
    memory = Curvature(model, data, progress=False).trace(n_matvecs=12, seed=4)
    disk = Curvature(model, data, progress=False).trace(n_matvecs=12, seed=4, krylov_dir=tmp_path)
    assert (disk.value, disk.stderr) == (memory.value, memory.stderr)
    assert len(made) == 4 and set(released) == set(made)  # 12 / 3 sketch rows, each released
    assert list(tmp_path.iterdir()) == []
    assert disk.settings["sketch_storage"] == "disk" and memory.settings["sketch_storage"] == "memory"


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the process's mappings from /proc")
def test_a_hutchpp_product_on_disk_holds_at_most_its_own_sketch_row(gpt2_problem, tmp_path, monkeypatch):
    """While each product or quadratic form runs, the sketch rows' resident pages (the process's own, read
    from /proc/self/smaps) are at most one row's: the row it writes or reads. Orthogonalising a vector against
    the kept rows reads each row twice (a dot product, then the subtraction); each goes after both."""
    from landscape.curvature import spectrum

    model, data, _, _ = gpt2_problem
    resident: list[int] = []  # bytes of sketch-file pages in the process as each product starts

    def sketch_bytes() -> int:
        total, in_sketch = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                in_sketch = len(head) >= 6 and head[5].startswith(str(tmp_path))
            elif in_sketch and head[0] == "Rss:":
                total += int(head[1]) * 1024
        return total

    def watched(function):
        def call(op, v, *rest):
            resident.append(sketch_bytes())
            return function(op, v, *rest)
        return call

    monkeypatch.setattr(spectrum, "matvec_into", watched(spectrum.matvec_into))
    monkeypatch.setattr(spectrum, "quadratic_form", watched(spectrum.quadratic_form))
    result = Curvature(model, data, progress=False).trace(n_matvecs=12, seed=4, krylov_dir=tmp_path)
    row = result.n_params * 4  # float32
    assert len(resident) == 12 and max(resident) <= row + 4096, [r / row for r in resident]
    assert resident[-4:] == [0, 0, 0, 0]  # the residual probes are in memory: no row stays resident


def test_trace_is_within_its_stated_error_of_the_exact_trace(gpt2_problem):
    model, data, _, hessian = gpt2_problem
    exact = float(hessian.trace())
    estimate = Curvature(model, data, progress=False).trace(n_matvecs=30, seed=1)
    assert estimate.n_matvecs == 30 and estimate.stderr > 0
    assert abs(estimate.value - exact) <= 3 * estimate.stderr
    assert estimate.interval(0.997).contains(exact)
    ggn = dense_ggn(model, random_tokens(2, 6, seed=1), ["transformer.h.0.mlp.c_proj"])
    ggn_estimate = Curvature(model, random_tokens(2, 6, seed=1), layers="transformer.h.0.mlp.c_proj",
                             operator="ggn", progress=False).trace(n_matvecs=30)
    assert abs(ggn_estimate.value - float(ggn.trace())) <= 3 * ggn_estimate.stderr


def test_density_nodes_and_moments_match_the_dense_block(gpt2_problem):
    model, data, layers, hessian = gpt2_problem
    chosen = ["transformer.h.0.attn.c_proj"]  # 64 weights: a full Krylov space recovers every eigenvalue
    block = hessian[_block(layers, model, chosen)][:, _block(layers, model, chosen)]
    exact = torch.linalg.eigvalsh(block).numpy()
    density = Curvature(model, data, layers=chosen, progress=False).density(n_runs=3, lanczos_steps=64,
                                                                            n_grid=4000)
    tol = 1e-9 * np.abs(exact).max()
    distinct = exact[np.concatenate([[True], np.diff(exact) > tol])]  # the block has repeated eigenvalues
    for nodes in density.nodes:
        # runs stop when the Krylov space closes (one node per distinct value)
        nodes = nodes[np.isfinite(nodes)]
        assert len(nodes) == len(distinct)
        np.testing.assert_allclose(np.sort(nodes), distinct, atol=tol)
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, atol=1e-12)
    step = density.grid[1] - density.grid[0]
    assert float(density.density.sum() * step) == pytest.approx(1.0, abs=1e-3)
    # First moment of each run = u^T H u / n for a Rademacher u: an unbiased estimate of tr(H) / n.
    moments = (density.nodes * density.weights).sum(axis=1)
    stderr = moments.std(ddof=1) / np.sqrt(len(moments))
    assert abs(moments.mean() - exact.mean()) <= 4 * stderr


# ------------------------------------------------------------------------------ directional curvature
def test_rayleigh_quotient_equals_dense_and_finite_difference(gpt2_problem):
    model, data, layers, hessian = gpt2_problem
    direction = random_direction(model, layers, seed=0)
    u = to_stored_layout(model, direction, layers)
    dense = float(u @ hessian @ u / (u @ u))
    rq = Curvature(model, data, progress=False).rayleigh_quotient(direction)
    assert rq.value == pytest.approx(dense, rel=1e-9)
    assert rq.direction_norm == pytest.approx(float(u.norm()), rel=1e-12)
    assert rq.value == pytest.approx(fd_second_derivative(model, data, direction), rel=1e-6)
    fd = Curvature(model, data, progress=False).second_derivative(direction)
    assert fd.value == pytest.approx(dense, rel=1e-5)
    assert fd.method == "finite-difference" and fd.step == 1e-3 and fd.settings["extrapolate"]
    # At a coarse step the plain central difference shows its O(h^2) error; Richardson removes it.
    plain = Curvature(model, data, progress=False).second_derivative(direction, step=2e-2, extrapolate=False)
    richardson = Curvature(model, data, progress=False).second_derivative(direction, step=2e-2)
    assert abs(plain.value - dense) > 30 * abs(richardson.value - dense)
    assert richardson.value == pytest.approx(dense, rel=1e-6)


def test_slope_equals_the_dense_gradient_and_a_finite_difference_and_rides_along_the_path(gpt2_problem):
    model, data, layers, _ = gpt2_problem
    direction = random_direction(model, layers, seed=3)
    u = to_stored_layout(model, direction, layers)
    params = dict(model.named_parameters())
    weights = [params[f"{n}.weight"] for n in layers]
    with torch.enable_grad():
        loss = segment_nll_sums(model, data.tokens, data.score_mask).sum() / data.n_scored_tokens
        grads = torch.autograd.grad(loss, weights)
    dense = float(torch.cat([g.reshape(-1) for g in grads]) @ u / u.norm())
    slope = Curvature(model, data, batch_size=1, progress=False).slope(direction, level=0.9, n_resamples=200)
    assert slope.value == pytest.approx(dense, rel=1e-9) and slope.method == "gradient"
    assert slope.value == pytest.approx(fd_first_derivative(model, data, direction), rel=1e-6)
    assert (len(slope.unit_sums) == data.n_segments
            and slope.interval.low <= slope.value <= slope.interval.high)
    chosen = layers[:2]
    sub = {n: direction[n] for n in chosen}
    path = Curvature(model, data, progress=False).along(sub, t=(0.0, 1.0), slope=True)
    w0 = layer_weights(model, chosen)
    for t, value in zip(path.t, path.slope):
        with swapped_weights(model, {n: w0[n] + t * sub[n] for n in chosen}):
            assert value == pytest.approx(fd_first_derivative(model, data, sub), rel=1e-6)
    assert "slope" in path.to_record().arrays and np.isnan(path.slope_low).all()
    assert Curvature(model, data, progress=False).along(sub, t=(0.0,)).slope is None


def test_rayleigh_quotient_over_batches_and_its_interval(gpt2_problem):
    model, data, layers, _ = gpt2_problem
    direction = random_direction(model, ["transformer.h.0.mlp.c_fc"], seed=5)
    whole = Curvature(model, data, batch_size=4, progress=False).rayleigh_quotient(direction)
    per_segment = Curvature(model, data, batch_size=1, progress=False).rayleigh_quotient(direction, level=0.9,
                                                                                         n_resamples=500)
    assert per_segment.value == pytest.approx(whole.value, rel=1e-12)  # batches are memory only
    assert len(per_segment.unit_sums) == 4 and per_segment.unit_tokens.sum() == data.n_scored_tokens
    separate = [Curvature(model, data.subset([i]), progress=False).rayleigh_quotient(direction).value
                for i in range(4)]
    np.testing.assert_allclose(per_segment.unit_sums / per_segment.unit_tokens, separate, rtol=1e-10)
    assert per_segment.interval.low <= per_segment.value <= per_segment.interval.high
    assert per_segment.interval.low < per_segment.interval.high and per_segment.interval.unit == "batches"
    fd = Curvature(model, data, progress=False).second_derivative(direction, level=0.9, n_resamples=500)
    np.testing.assert_allclose(fd.unit_sums / fd.unit_tokens, separate, rtol=1e-4, atol=1e-8)
    with pytest.raises(CurvatureError, match="needs >= 2 batches"):
        Curvature(model, data, batch_size=4, progress=False).rayleigh_quotient(direction, level=0.95)


def test_curvature_along_path_moves_and_restores_the_model(gpt2_problem, monkeypatch):
    model, data, layers, _ = gpt2_problem
    chosen = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    direction = {n: 0.3 * d for n, d in random_direction(model, chosen, seed=7).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = Curvature(model, data, progress=False).along(direction, t=(0.0, 0.5, 1.0))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # bit-exact restore
    w0 = layer_weights(model, chosen)
    for t, value in zip(path.t, path.curvature):
        with swapped_weights(model, {n: w0[n] + t * direction[n] for n in chosen}):
            assert value == pytest.approx(fd_second_derivative(model, data, direction), rel=1e-6)
    assert not np.isclose(path.curvature[0], path.curvature[2], rtol=1e-3)  # it does change along the path
    assert np.isnan(path.low).all()

    calls = []
    rayleigh_quotient = directional.hvp_rayleigh_quotient

    def fail_on_second_point(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return rayleigh_quotient(*args, **kwargs)

    monkeypatch.setattr(directional, "hvp_rayleigh_quotient", fail_on_second_point)
    with pytest.raises(RuntimeError, match="interrupted"):
        Curvature(model, data, progress=False).along(direction, t=(0.5, 1.0))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


# ------------------------------------------------------------------------------- refusals and records
def test_directions_from_another_model_are_refused_before_any_work(gpt2_problem, monkeypatch):
    model, data, layers, _ = gpt2_problem
    good = random_direction(model, layers[:1], seed=0)

    def no_forward(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(operators, "segment_nll_sums", no_forward)
    monkeypatch.setattr(directional, "segment_nll_sums", no_forward)
    other = tiny_model("llama", torch.float64, hidden=8, layers=1)
    foreign = random_direction(other, list(quantizable_layers(other))[:2], seed=0)
    with pytest.raises(DirectionMismatchError, match="does not have"):
        Curvature(model, data, progress=False).rayleigh_quotient(foreign)
    with pytest.raises(DirectionMismatchError, match="without '.weight'"):
        Curvature(model, data, progress=False).rayleigh_quotient({f"{layers[0]}.weight": good[layers[0]]})
    with pytest.raises(DirectionMismatchError, match="looks transposed"):
        Curvature(model, data, progress=False).second_derivative({layers[0]: good[layers[0]].T})
    bigger = tiny_model("gpt2", torch.float64, hidden=16, layers=1)
    with pytest.raises(DirectionMismatchError, match="another model"):
        Curvature(model, data, progress=False).along(random_direction(bigger, layers[:1], seed=0))
    with pytest.raises(DirectionMismatchError, match="zero"):
        Curvature(model, data, progress=False).rayleigh_quotient(
            {layers[0]: torch.zeros_like(good[layers[0]])})
    assert direction_space(model, good).layers == (layers[0],)


def test_bad_requests_are_clear_errors(gpt2_problem):
    model, data, _, _ = gpt2_problem
    with pytest.raises(LayerSelectionError, match="matches no quantizable layer"):
        Curvature(model, data, layers="transformer.h.7.*", progress=False).spectrum()
    with pytest.raises(CurvatureError, match="operator must be one of"):
        Curvature(model, data, operator="fisher", progress=False).trace()
    with pytest.raises(CurvatureError, match="lanczos_steps"):
        Curvature(model, data, progress=False).spectrum(k=3, k_bottom=2, lanczos_steps=4)
    with pytest.raises(CurvatureError, match="n_matvecs"):
        Curvature(model, data, progress=False).trace(n_matvecs=3)
    with pytest.raises(CurvatureError, match="TokenSet"):
        Curvature(model, data.tokens, progress=False).spectrum()
    model.train()
    try:
        with pytest.raises(CurvatureError, match="train mode"):
            Curvature(model, data, progress=False).spectrum()
    finally:
        model.eval()
    sdpa = tiny_model("gpt2", torch.float64, hidden=8, layers=1)
    sdpa.config._attn_implementation = "sdpa"
    with pytest.raises(CurvatureError, match="eager"):
        Curvature(sdpa, data, progress=False).trace()


def test_a_krylov_basis_that_cannot_fit_in_memory_is_refused_before_any_product(gpt2_problem, monkeypatch):
    """Lanczos keeps one full-length vector per step: n_params x itemsize x (steps + 1 + returned pairs)
    bytes."""
    model, data, _, _ = gpt2_problem
    n = weight_space(model).size
    per_vector = n * 8  # float64

    def no_product(*args, **kwargs):
        raise AssertionError("work started before the memory check")

    monkeypatch.setattr(operators, "nll_operator", no_product)
    # 13 vectors (12 steps + 1) fit in 80 % of 16.5 vectors' worth; 20 steps do not, and the error says what
    # fits
    monkeypatch.setattr(operators, "available_memory_bytes", lambda device: int(16.5 * per_vector))
    with pytest.raises(CurvatureError,
                       match=r"lanczos_steps=20 keeps 21 full-length vectors .* 13 vectors fit"):
        Curvature(model, data, progress=False).spectrum(k=2, k_bottom=0, lanczos_steps=20,
                                                        return_eigenvectors=False)
    # 12 steps + 1 + 2 returned pairs
    with pytest.raises(CurvatureError, match=r"keeps 15 full-length vectors"):
        Curvature(model, data, progress=False).spectrum(k=2, k_bottom=0, lanczos_steps=12)
    with pytest.raises(CurvatureError, match=r"lanczos_steps=20 keeps 21"):
        Curvature(model, data, progress=False).density(lanczos_steps=20)
    # Hutch++: its 12 sketch rows and a probe and its product (14 > 13.2); 10 + 2 fit
    with pytest.raises(CurvatureError, match=r"n_matvecs=36 keeps 14 full-length vectors"):
        Curvature(model, data, progress=False).trace(n_matvecs=36)
    with pytest.raises(AssertionError, match="before the memory check"):
        Curvature(model, data, progress=False).trace(n_matvecs=30)
    with pytest.raises(AssertionError, match="before the memory check"):
        Curvature(model, data, progress=False).trace(n_matvecs=12)
    with pytest.raises(AssertionError, match="before the memory check"):  # 13 vectors pass the check
        Curvature(model, data, progress=False).spectrum(k=2, k_bottom=0, lanczos_steps=12,
                                                        return_eigenvectors=False)
    monkeypatch.setattr(operators, "available_memory_bytes", lambda device: None)  # unknown: not checked
    with pytest.raises(AssertionError, match="before the memory check"):
        Curvature(model, data, progress=False).spectrum(k=2, k_bottom=0, lanczos_steps=20)


def test_lean_backend_arithmetic_is_the_librarys_bit_for_bit(monkeypatch):
    """axpy written into b a chunk at a time rounds as the library's ``alpha * a + b``; the broadcast zero
    reads as zeros."""
    from hessian_eigenthings.linalg import SingleDeviceBackend

    monkeypatch.setattr(operators.LeanBackend, "chunk", 7)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    for alpha in (-0.3183, torch.tensor(1.7)):
        expected = SingleDeviceBackend().axpy(alpha, a, b)
        got = operators.LeanBackend().axpy(alpha, a, b.clone())
        assert torch.equal(got, expected)
    zeros = operators.LeanBackend().zeros_like(a)
    assert zeros.shape == a.shape and not zeros.any()


class _DenseOperator:
    """``A v`` of a dense symmetric matrix, a fresh tensor per product; records each product's address."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.addresses = a, []
        self.size, self.device, self.dtype = a.shape[0], a.device, a.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.a @ v
        self.addresses.append(out.data_ptr())
        return out

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.addresses.append(out.data_ptr())
        return torch.mv(self.a, v, out=out)


@pytest.mark.parametrize("on_disk", [False, True])
def test_lanczos_products_are_recycled_and_the_run_is_the_librarys_bit_for_bit(on_disk, tmp_path):
    """Through ``backend.products`` the loop's consumed product becomes its next basis vector (in memory) or
    the next product's buffer (on disk), and the tridiagonal matrix and basis equal those of the library's
    Lanczos with its own backend and a fresh product per step."""
    from hessian_eigenthings import lanczos_tridiagonal
    from hessian_eigenthings.linalg import SingleDeviceBackend

    g = torch.Generator().manual_seed(5)
    m = torch.randn(60, 60, generator=g, dtype=torch.float64)
    a, v0 = m + m.T, torch.randn(60, generator=g, dtype=torch.float64)
    reference = lanczos_tridiagonal(_DenseOperator(a), v0.clone(), 12, reorthogonalize=True,
                                    backend=SingleDeviceBackend())
    with operators.krylov_backend(tmp_path if on_disk else None) as backend:
        op = _DenseOperator(a)
        got = lanczos_tridiagonal(backend.products(op), v0.clone(), 12, reorthogonalize=True, backend=backend)
        assert torch.equal(got.alphas, reference.alphas) and torch.equal(got.betas, reference.betas)
        assert all(torch.equal(x, y) for x, y in zip(got.basis, reference.basis, strict=True))
        if on_disk:  # every product after the first is written into the first one's memory
            assert len(op.addresses) == 12 and set(op.addresses) == {op.addresses[0]}
        else:  # basis vector j + 1 is product j itself, scaled in place
            assert [v.data_ptr() for v in got.basis[1:]] == op.addresses[:-1]
        backend.release_spare()
    # a tensor that is not the loop's last product is never scaled in place
    lean = operators.LeanBackend()
    plain = torch.ones(4, dtype=torch.float64)
    assert lean.scale(0.5, plain).data_ptr() != plain.data_ptr()
    assert torch.equal(plain, torch.ones(4, dtype=torch.float64))


def test_a_krylov_basis_on_disk_gives_bit_identical_spectra_and_leaves_no_files(gpt2_problem, tmp_path,
                                                                                monkeypatch):
    model, data, _, _ = gpt2_problem
    made = []
    original = operators.MappedBasisBackend.scale

    def spy(self, alpha, a):
        out = original(self, alpha, a)
        made.append(sorted(p.name for p in self.directory.iterdir()))
        return out

    monkeypatch.setattr(operators.MappedBasisBackend, "scale", spy)
    released, original_release = set(), operators.MappedBasisBackend.release

    def release_spy(self, *vectors):
        released.update(v.data_ptr() for v in vectors if v.data_ptr() in self.maps)
        original_release(self, *vectors)
        mapped_vectors.update(self.maps)

    mapped_vectors: dict = {}
    monkeypatch.setattr(operators.MappedBasisBackend, "release", release_spy)
    settings = {"k": 3, "k_bottom": 2, "lanczos_steps": 14}
    with pytest.warns(curvature.ConvergenceWarning):  # 14 steps: not converged, and the same either way
        memory = Curvature(model, data, progress=False).spectrum(**settings)
    with pytest.warns(curvature.ConvergenceWarning):
        disk = Curvature(model, data, progress=False).spectrum(krylov_dir=tmp_path, **settings)
    # the start vector and every basis vector went to its own mapped file, each let go after its use
    assert len(made) == 15 and len(made[-1]) == 15
    assert len(mapped_vectors) == 15 and released == set(mapped_vectors)
    assert list(tmp_path.iterdir()) == []  # removed when the run ended
    for end in ("top", "bottom"):
        a, b = getattr(memory, end), getattr(disk, end)
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
        np.testing.assert_array_equal(a.residuals, b.residuals)
        assert a.eigenvectors.keys() == b.eigenvectors.keys()
        assert all(torch.equal(a.eigenvectors[name], b.eigenvectors[name]) for name in a.eigenvectors)
    assert disk.settings["krylov_storage"] == "disk" and memory.settings["krylov_storage"] == "memory"
    made.clear()
    dense = Curvature(model, data, progress=False).density(n_runs=2, lanczos_steps=6)
    mapped = Curvature(model, data, progress=False).density(n_runs=2, lanczos_steps=6, krylov_dir=tmp_path)
    assert len(made) == 14 and list(tmp_path.iterdir()) == []  # 2 runs x (start vector + 6 basis vectors)
    np.testing.assert_array_equal(dense.density, mapped.density)
    # with the basis on disk only the returned Ritz vectors count against memory; the disk must hold the basis
    monkeypatch.setattr(operators, "available_memory_bytes",
                        lambda device: int(16.5 * weight_space(model).size * 8))
    with pytest.warns(curvature.ConvergenceWarning):
        assert Curvature(model, data, progress=False).spectrum(k=2, k_bottom=0, lanczos_steps=20,
                                                               krylov_dir=tmp_path).lanczos_steps == 20
    monkeypatch.setattr(operators.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    with pytest.raises(CurvatureError, match=r"in krylov_dir .* has 0.0 GiB free: 0 vectors fit"):
        Curvature(model, data, progress=False).spectrum(k=2, lanczos_steps=20, krylov_dir=tmp_path)
    with pytest.raises(CurvatureError, match="not an existing directory"):
        Curvature(model, data, progress=False).spectrum(k=2, lanczos_steps=20,
                                                        krylov_dir=tmp_path / "missing")


def shutil_usage(free: int):
    import collections
    return collections.namedtuple("usage", "total used free")(free, 0, free)


def test_same_seed_gives_bit_identical_results_and_records_serialise(gpt2_problem, gpt2_spectrum):
    model, data, _, _ = gpt2_problem
    again = Curvature(model, data, batch_size=3, progress=False).spectrum(k=3, k_bottom=2, lanczos_steps=80)
    for end in ("top", "bottom"):
        a, b = getattr(gpt2_spectrum, end), getattr(again, end)
        assert np.array_equal(a.eigenvalues, b.eigenvalues)
        assert all(torch.equal(a.eigenvectors[n], b.eigenvectors[n]) for n in a.eigenvectors)
    t1 = Curvature(model, data, progress=False).trace(n_matvecs=9, seed=4)
    t2 = Curvature(model, data, progress=False).trace(n_matvecs=9, seed=4)
    assert (t1.value, t1.stderr) == (t2.value, t2.stderr)

    record = gpt2_spectrum.to_record()
    json.dumps(record.provenance)
    assert record.arrays["top/eigenvectors/transformer.h.0.mlp.c_fc"].shape == (3, 32, 8)
    np.testing.assert_array_equal(record.arrays["bottom/eigenvalues"], gpt2_spectrum.bottom.eigenvalues)
    for result in (t1, Curvature(model, data, layers="transformer.h.0.attn.c_proj",
                                 progress=False).density(n_runs=1, lanczos_steps=8)):
        rec = result.to_record()
        json.dumps(rec.provenance)
        assert all(isinstance(v, np.ndarray) for v in rec.arrays.values())


def test_eigenvectors_work_as_toolkit_directions_and_foreign_bases_are_refused(gpt2_problem, gpt2_spectrum):
    directions = pytest.importorskip("landscape.engine.directions")
    model, data, _, _ = gpt2_problem
    top = directions.eigenvector_direction(model, gpt2_spectrum.top.direction(0),
                                           source="test top eigenvector")
    rq = Curvature(model, data, progress=False).rayleigh_quotient(top)
    # v^T H v = lambda for a unit v
    assert rq.value == pytest.approx(gpt2_spectrum.top.eigenvalues[0], rel=1e-9)
    other_w0 = tiny_model("gpt2", torch.float64, hidden=8, layers=1, seed=1)  # same shapes, other weights
    with pytest.raises(DirectionMismatchError, match="fingerprint"):
        Curvature(other_w0, data, progress=False).rayleigh_quotient(top)


def test_cli_spectrum_stores_what_the_library_computes_and_resumes(tmp_path, capsys, monkeypatch):
    import landscape.cli.spectrum  # noqa: F401  (registers the command)
    from landscape import models
    from landscape.cli import main
    from landscape.data import heldout_set
    from landscape.models import load_model

    out = tmp_path / "s.h5"
    base = ["spectrum", "ref-tiny", "--seq-len", "16", "--segments", "2", "--k", "2", "--k-bottom", "1",
            "--lanczos-steps", "10", "--trace-matvecs", "6", "--density-runs", "1", "--density-steps", "5",
            "--layers", "transformer.h.0.*", "--no-progress"]
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the check"))
    for bad, message in ((["--trace-matvecs", "3"], "--trace-matvecs"), (["--k", "0"], "--k must be"),
                         (["--lanczos-steps", "2"], "k_bottom = 3"), (["--krylov-dir", str(tmp_path / "no")],
                                                                      "not an existing directory")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad.h5")]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(models, "load_model", real_load)
    with pytest.warns(ConvergenceWarning):
        assert main([*base, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    store = read_store(out)
    assert store.complete and store.provenance["tasks"] == ["spectrum", "trace", "density"]
    lm = load_model("ref-tiny")
    data = heldout_set(lm.tokenizer, 16, "wiki", 2, context_length=lm.info.context_length)
    layers = ["transformer.h.0.*"]
    with pytest.warns(ConvergenceWarning):
        direct = Curvature(lm.model, data, layers=layers, batch_size=1, progress=False).spectrum(
            k=2, k_bottom=1, lanczos_steps=10)
    np.testing.assert_allclose(store.arrays["spectrum/top/eigenvalues"], direct.top.eigenvalues, rtol=1e-6)
    np.testing.assert_allclose(store.arrays["spectrum/bottom/eigenvalues"], direct.bottom.eigenvalues,
                               rtol=1e-6)
    trace = Curvature(lm.model, data, layers=layers, batch_size=1, progress=False).trace(n_matvecs=6)
    assert json.loads(str(store.arrays["trace/attrs"]))["value"] == pytest.approx(trace.value, rel=1e-6)
    assert float(np.trapezoid(store.arrays["density/density"],
                              store.arrays["density/grid"])) == pytest.approx(1.0, abs=0.02)
    assert "| top |" in printed and "trace (Hutch++, 6 products)" in printed and "density (SLQ" in printed
    before = out.stat().st_mtime_ns
    assert main([*base, "--out", str(out)]) == 0  # finished: read back, nothing recomputed
    assert out.stat().st_mtime_ns == before and capsys.readouterr().out == printed


# ------------------------------------------------------------------------------- one object, one protocol
def test_every_public_function_and_method_takes_at_most_eight_parameters():
    """Result dataclasses' generated constructors (their fields) are not counted: the package builds them."""
    for name in curvature.__all__:
        obj = getattr(curvature, name)
        members = [obj] if callable(obj) and not inspect.isclass(obj) else []
        if inspect.isclass(obj):
            public = {n: m for n, m in vars(obj).items() if not n.startswith("_") or n == "__init__"}
            if dataclasses.is_dataclass(obj):
                public.pop("__init__", None)
            members = [m for m in public.values() if inspect.isfunction(m)]
            members += [m.__func__ for m in public.values() if isinstance(m, classmethod)]
        for member in members:
            params = [p for p in inspect.signature(member).parameters if p not in ("self", "cls")]
            assert len(params) <= 8, (name, member.__name__, params)


def test_directional_quantities_use_the_directions_layers_and_any_attention(gpt2_problem):
    model, data, layers, _ = gpt2_problem
    direction = random_direction(model, ["transformer.h.0.attn.c_attn"], seed=11)
    everything = Curvature(model, data, progress=False)
    mlp_only = Curvature(model, data, layers="transformer.h.0.mlp.*", progress=False)
    assert mlp_only.space.layers == ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    assert mlp_only.rayleigh_quotient(direction).value == everything.rayleigh_quotient(direction).value
    assert mlp_only.slope(direction).value == everything.slope(direction).value
    sdpa = tiny_model("gpt2", torch.float64, hidden=8, layers=1)
    sdpa.config._attn_implementation = "sdpa"
    on_sdpa = Curvature(sdpa, data, progress=False)  # forward-only and first-order measurements need no eager
    finite_difference = everything.second_derivative(direction).value
    assert on_sdpa.second_derivative(direction).value == pytest.approx(finite_difference, rel=1e-9)
    assert on_sdpa.slope(direction).value == pytest.approx(everything.slope(direction).value, rel=1e-9)
    for needs_products in (lambda: on_sdpa.rayleigh_quotient(direction), lambda: on_sdpa.along(direction),
                           lambda: on_sdpa.spectrum(), lambda: on_sdpa.density(), lambda: on_sdpa.operator()):
        with pytest.raises(CurvatureError, match="eager"):
            needs_products()


def test_a_curvature_store_reads_back_into_the_results_it_was_written_from(gpt2_problem, tmp_path):
    model, data, layers, _ = gpt2_problem
    measure = Curvature(model, data, batch_size=1, progress=False)
    direction = {n: 0.3 * d for n, d in random_direction(model, layers[:2], seed=2).items()}
    with pytest.warns(ConvergenceWarning):
        spectrum = measure.spectrum(k=2, k_bottom=1, lanczos_steps=8)
    results = {"spectrum": spectrum, "trace": measure.trace(6), "density": measure.density(1, 5, n_grid=50),
               "path/b": measure.along(direction, t=(0.0, 1.0), level=0.9, n_resamples=200, slope=True),
               "path/a": measure.along(direction, t=(0.0, 0.5))}
    provenance = {"kind": "curvature", "nll_convention": NLLConvention.for_data(data, "tiny").to_dict(),
                  "tasks": list(results)}
    tasks = {k: (lambda r=r: r.to_record()) for k, r in results.items()}
    store, _ = run_tasks(tmp_path / "c.h5", provenance, tasks)
    record = read_curvature(tmp_path / "c.h5")
    assert list(record.paths) == ["b", "a"]  # in run order
    read = {"spectrum": record.spectrum, "trace": record.trace, "density": record.density,
            "path/b": record.paths["b"], "path/a": record.paths["a"]}
    for task, result in results.items():
        written, back = result.to_record(), read[task].to_record()
        assert json.dumps(written.provenance, sort_keys=True) == json.dumps(back.provenance, sort_keys=True)
        assert written.arrays.keys() == back.arrays.keys(), task
        for name in written.arrays:
            np.testing.assert_array_equal(written.arrays[name], back.arrays[name])
    assert all(torch.equal(spectrum.top.eigenvectors[n], record.spectrum.top.eigenvectors[n]) for n in layers)
    assert record.paths["a"].slope is None and record.paths["a"].estimates == ()
    assert Spectrum.from_store(tmp_path / "c.h5").top.eigenvalues.tolist() == list(spectrum.top.eigenvalues)
    assert TraceEstimate.from_data(store).value == results["trace"].value
    assert Density.from_data(store).sigma == results["density"].sigma
    path_b = PathCurvature.from_store(tmp_path / "c.h5", "path/b")
    np.testing.assert_array_equal(path_b.slope, results["path/b"].slope)
    text = record.markdown()
    assert text.startswith(record.markdown(paths=False)) and "| top |" in text
    table = text.split("\n\n")[-1].splitlines()
    assert table[0].startswith("| direction | ‖d‖ | u^T H u at t = 0 [95 % over segments]")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| b", "| a"]
    cells = [row.strip("| ").split(" | ") for row in table[2:]]
    assert len(cells[0]) == 2 + 2 + 2 + 1  # label, norm, 2 curvatures, 2 slopes, quadratic model at t = 0
    assert len(cells[1]) == 2 + 2  # label, norm, 2 curvatures
    rq = measure.rayleigh_quotient(direction, level=0.9, n_resamples=200)
    again = DirectionalCurvature.from_record(StoreRecord(json.loads(json.dumps(rq.to_record().provenance)),
                                                         arrays=rq.to_record().arrays))
    assert again.interval == rq.interval and again.value == rq.value and again.settings == json.loads(
        json.dumps(rq.settings))
    with pytest.raises(CurvatureError, match="holds a 'trace' result"):
        Spectrum.from_data(store, "trace")
    with pytest.raises(CurvatureError, match="no curvature task 'path/c'"):
        PathCurvature.from_data(store, "path/c")
    assert read_store(tmp_path / "c.h5").complete
