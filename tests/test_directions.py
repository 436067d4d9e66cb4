"""Directions: seeded regeneration, normalisations against hand computations, Gram-Schmidt, displacements,
and clear errors for directions that do not fit the model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from landscape.engine.directions import (
    Direction,
    DirectionError,
    DirectionSpec,
    LayerwiseTensors,
    check_direction,
    cosine,
    displacement_direction,
    dot,
    normalize,
    orthogonalize,
    plane_coordinates,
    random_direction,
    random_direction_of_length,
    regenerate,
    user_direction,
)
from landscape.quant.result import QuantResult
from landscape.weights import (
    LayerSelectionError,
    quantizable_layers,
    select_layers,
    weights_fingerprint,
    weights_norm,
)


class TwoLinear(nn.Module):
    """A non-transformers model: two bias-free linear layers with weights set by hand."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        super().__init__()
        self.first = nn.Linear(first.shape[1], first.shape[0], bias=False, dtype=first.dtype)
        self.second = nn.Linear(second.shape[1], second.shape[0], bias=False, dtype=second.dtype)
        with torch.no_grad():
            self.first.weight.copy_(first)
            self.second.weight.copy_(second)


def flat(direction: Direction) -> torch.Tensor:
    return torch.cat([direction[n].double().flatten() for n in sorted(direction.names)])


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


def test_same_seed_gives_the_same_direction_and_other_seeds_do_not(gpt2):
    a, b, c = random_direction(gpt2, 7), random_direction(gpt2, 7), random_direction(gpt2, 8)
    assert a.names == list(quantizable_layers(gpt2))
    assert all(torch.equal(a[n], b[n]) for n in a.names)
    assert not any(torch.equal(a[n], c[n]) for n in a.names)
    # A layer's draw depends only on (seed, layer name): the same under a narrower glob and in fp64.
    narrow = random_direction(gpt2, 7, "none", "transformer.h.1.mlp.*")
    assert narrow.names == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    raw = random_direction(gpt2, 7, "none")
    assert all(torch.equal(narrow[n], raw[n]) for n in narrow.names)
    raw64 = random_direction(tiny_model("gpt2", torch.float64), 7, "none")
    assert all(raw64[n].dtype == torch.float64 and torch.equal(raw64[n], raw[n].double()) for n in raw.names)


def test_filter_and_layer_normalisation_match_hand_computation():
    w0 = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # row norms 5, 0, 1
    model = TwoLinear(w0, torch.eye(3, dtype=torch.float64))
    d = user_direction(model,
                       {"first": torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)})
    by_filter = normalize(model, d, "filter")["first"]
    s = 5 / math.sqrt(2)
    assert torch.allclose(by_filter, torch.tensor([[s, s], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
                          atol=1e-15)
    by_layer = normalize(model, d, "layer")["first"]  # ||w0|| = sqrt(26), ||d|| = sqrt(31)
    assert torch.allclose(by_layer, d["first"] * math.sqrt(26 / 31), atol=1e-15)


def test_filter_normalised_rows_have_the_norms_of_w0_rows_in_gpt2_conv1d_orientation(gpt2):
    u = random_direction(gpt2, 0, "filter")
    for name, module in quantizable_layers(gpt2).items():
        w0_row_norms = module.weight.detach().norm(dim=0)  # Conv1D stores (in, out): output rows are columns
        assert torch.allclose(u[name].norm(dim=1), w0_row_norms, rtol=1e-5)
    v = random_direction(gpt2, 0, "layer")
    for name, module in quantizable_layers(gpt2).items():
        assert math.isclose(float(v[name].norm()), float(module.weight.detach().norm()), rel_tol=1e-5)


def test_dot_cosine_and_gram_schmidt_against_flattened_vectors(gpt2):
    u, v = random_direction(gpt2, 1), random_direction(gpt2, 2)
    fu, fv = flat(u), flat(v)
    assert math.isclose(dot(u, v), float(fu @ fv), rel_tol=1e-9)
    assert math.isclose(u.norm(), float(fu.norm()), rel_tol=1e-9)
    assert math.isclose(cosine(u, v), float(fu @ fv / (fu.norm() * fv.norm())), rel_tol=1e-9)
    v_perp = orthogonalize(v, u)
    fp = flat(v_perp)
    assert abs(float(fp @ fu)) < 1e-5 * float(fp.norm() * fu.norm())
    assert torch.allclose(fv - fp, float(fu @ fv / (fu @ fu)) * fu, atol=1e-5)  # the removed part is along u
    assert math.isclose(v_perp.unit().norm(), 1.0, rel_tol=1e-6)  # float32 entries
    point = Direction({n: 2 * u[n] - 3 * v[n] for n in u.names}, u.spec)
    a, b = plane_coordinates(point, u, v)
    assert math.isclose(a, 2, rel_tol=1e-5) and math.isclose(b, -3, rel_tol=1e-5)


def test_regenerated_from_its_json_spec_bit_identical(gpt2):
    u = random_direction(gpt2, 3, "layer", "*.attn.*")
    v = orthogonalize(random_direction(gpt2, 4, "layer", "*.attn.*"), u).unit()
    spec = DirectionSpec.from_dict(json.loads(json.dumps(v.spec.to_dict())))
    assert spec == v.spec
    again = regenerate(gpt2, spec)
    assert again.names == v.names and all(torch.equal(again[n], v[n]) for n in v.names)


def test_displacement_is_wq_minus_w0_and_refuses_another_base(gpt2, tmp_path):
    layers = quantizable_layers(gpt2)
    names = list(layers)[:3]
    w_q = {n: torch.round(layers[n].weight.detach().T * 8) / 8 for n in names}  # a lattice, (out, in)
    result = QuantResult(w_q, None, "rtn-test", base_model="tiny",
                         base_fingerprint=weights_fingerprint(gpt2, names))
    d = displacement_direction(gpt2, result)
    assert d.names == names
    assert all(torch.equal(d[n], w_q[n] - layers[n].weight.detach().T) for n in names)
    path = result.save(tmp_path / "rtn")
    from_path = regenerate(gpt2, displacement_direction(gpt2, path).spec)
    assert all(torch.equal(from_path[n], d[n]) for n in names)
    other = QuantResult(w_q, None, "rtn-test", base_model="other", base_fingerprint="0123456789abcdef")
    with pytest.raises(DirectionError, match="fingerprint 0123456789abcdef"):
        displacement_direction(gpt2, other)
    with pytest.raises(DirectionError, match="made on base weights"):
        check_direction(tiny_model("gpt2", seed=1), d)


def test_bad_directions_give_clear_errors(gpt2):
    name = "transformer.h.0.attn.c_proj"
    with pytest.raises(DirectionError, match=r"shape \(4, 4\).*\(32, 32\)"):
        user_direction(gpt2, {name: torch.ones(4, 4)})
    with pytest.raises(DirectionError, match="unknown layer 'transformer.h.9.nope'"):
        user_direction(gpt2, {"transformer.h.9.nope": torch.ones(32, 32)})
    with pytest.raises(DirectionError, match="norm 0"):
        user_direction(gpt2, {name: torch.zeros(32, 32)})
    with pytest.raises(DirectionError, match="NaN or Inf"):
        user_direction(gpt2, {name: torch.full((32, 32), float("nan"))})
    with pytest.raises(LayerSelectionError, match="'\\*.no_such_layer': it matches no quantizable layer"):
        select_layers(gpt2, "*.no_such_layer")
    with pytest.raises(DirectionError, match="normalization must be one of"):
        random_direction(gpt2, 0, "rows")
    with pytest.raises(DirectionError, match="integer seed"):
        DirectionSpec("random", seed=None)
    with pytest.raises(DirectionError, match="cannot regenerate a user direction"):
        regenerate(gpt2, user_direction(gpt2, {name: torch.ones(32, 32)}).spec)


def test_weights_norm_is_the_euclidean_norm_over_the_layers(gpt2):
    names = select_layers(gpt2, "*.mlp.*")
    expected = math.sqrt(sum(float(quantizable_layers(gpt2)[n].weight.detach().double().pow(2).sum())
                             for n in names))
    assert math.isclose(weights_norm(gpt2, names), expected, rel_tol=1e-12)


def test_streamed_directions_equal_the_eager_ones_bit_for_bit_and_hold_one_layer(gpt2, tmp_path):
    layers = quantizable_layers(gpt2)
    names = list(layers)
    w_q = {n: torch.round(layers[n].weight.detach().T * 8) / 8 for n in names}
    path = QuantResult(w_q, None, "rtn-test", base_model="tiny",
                       base_fingerprint=weights_fingerprint(gpt2, names)).save(tmp_path / "rtn")
    cases = [
        lambda streamed: random_direction(gpt2, 3, "filter", streamed=streamed),
        lambda streamed: random_direction(gpt2, 4, "layer", "*.attn.*", streamed=streamed).unit(),
        lambda streamed: random_direction(gpt2, 5, "none", streamed=streamed),
        lambda streamed: displacement_direction(gpt2, path, streamed=streamed),
        # the figure-5 plane: a displacement made orthogonal to another direction, then unit
        lambda streamed: orthogonalize(displacement_direction(gpt2, path, streamed=streamed),
                                       random_direction(gpt2, 6, streamed=streamed)).unit(),
    ]
    for make in cases:
        eager, streamed = make(False), make(True)
        assert not eager.streamed and streamed.streamed
        assert streamed.names == eager.names
        assert all(torch.equal(streamed[n], eager[n]) for n in eager.names), streamed.spec.describe()
        assert streamed.norm() == eager.norm()
        # whole(): every layer computed once and held, the same bits and spec; a whole direction as it is
        whole = streamed.whole()
        assert not whole.streamed and isinstance(whole.tensors, dict) and whole.spec == streamed.spec
        assert all(torch.equal(whole[n], eager[n]) for n in eager.names)
        assert whole[eager.names[0]] is whole[eager.names[0]] and eager.whole() is eager
    spec = orthogonalize(random_direction(gpt2, 1), random_direction(gpt2, 2)).unit().spec
    assert all(torch.equal(a, b) for a, b in zip(regenerate(gpt2, spec, streamed=True).tensors.values(),
                                                  regenerate(gpt2, spec).tensors.values()))
    # a streamed map shares its last layer while someone holds it, and holds nothing itself
    computed = []
    lazy = LayerwiseTensors(["a", "b"], lambda n: computed.append(n) or torch.zeros(1))
    lazy["a"], lazy["a"], lazy["b"], lazy["a"]
    assert computed == ["a", "b", "a"]
    held = lazy["b"]
    assert lazy["b"] is held and computed == ["a", "b", "a", "b"]
    del held
    lazy["b"]
    assert computed == ["a", "b", "a", "b", "b"]
    with pytest.raises(KeyError):
        lazy["c"]


def test_a_random_direction_of_a_given_length_is_the_rescaled_unit_direction(gpt2):
    eager = random_direction(gpt2, 3, "filter").unit()
    scaled = random_direction_of_length(gpt2, 3, 2.5)
    assert isinstance(scaled, LayerwiseTensors)  # drawn when asked for: a whole copy is the caller's choice
    assert list(scaled) == eager.names and all(torch.equal(scaled[n], 2.5 * eager[n]) for n in eager.names)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in scaled.values()))
    assert math.isclose(norm, 2.5, rel_tol=1e-6)


def test_a_streamed_displacement_refuses_another_base_and_a_wrong_shape(gpt2, tmp_path):
    layers = quantizable_layers(gpt2)
    names = list(layers)[:2]
    w_q = {n: layers[n].weight.detach().T.clone() for n in names}
    path = QuantResult(w_q, None, "rtn-test", base_fingerprint="0123456789abcdef").save(tmp_path / "other")
    with pytest.raises(DirectionError, match="fingerprint 0123456789abcdef"):
        displacement_direction(gpt2, path, streamed=True)
    wrong = {names[0]: torch.zeros(3, 3)}
    path = QuantResult(wrong, None, "rtn-test", base_fingerprint=weights_fingerprint(gpt2, names[:1])
                       ).save(tmp_path / "shape")
    with pytest.raises(DirectionError, match=r"shape \(3, 3\)"):
        displacement_direction(gpt2, path, streamed=True)
