"""Basin radius: bracketing and bisection against closed forms, radii on a quadratic equal sqrt(2 t / u^T H
u), statistics over directions, displacement norms in the same units, and the bracket checked on a real NLL.

The quadratic is centred at w0 (``Quadratic(centred=True)``): along a unit direction u its profile is
c + r^2 u^T H u / 2, so the radius for a rise t is sqrt(2 t / u^T H u)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model
from test_perturb import Quadratic
from torch import nn

from landscape.engine.basin import (
    BasinStatistics,
    RadiusSearch,
    basin_radius,
    basin_statistics,
    bracket_crossing,
    displacement_norms,
    quantile,
    radial_profile,
)
from landscape.engine.directions import DirectionError, random_direction, regenerate, user_direction
from landscape.engine.perturb import FunctionObjective
from landscape.engine.sweep import Execution
from landscape.quant.result import QuantResult
from landscape.weights import quantizable_layers, weights_fingerprint


def curvature_along(model: Quadratic, direction) -> float:
    """u^T H u / u^T u for the flattened direction (numpy, independent of the engine)."""
    u = np.concatenate([direction["first"].numpy().ravel(), direction["second"].numpy().ravel()])
    return float(u @ model.hessian.numpy() @ u / (u @ u))


def test_bracket_crossing_matches_closed_forms():
    tol = 1e-9
    lower, upper = bracket_crossing(lambda r: r * r, 2.0, 0.01, 1e-6, 100.0, tol)  # doubling path
    assert lower < math.sqrt(2) <= upper and upper - lower <= tol * upper
    lower, upper = bracket_crossing(lambda r: r * r, 2e-4, 1.0, 1e-6, 100.0, tol)  # halving path
    assert lower < math.sqrt(2e-4) <= upper and upper - lower <= tol * upper
    step = lambda r: float("nan") if r > 0.3 else 0.0  # noqa: E731  (NaN counts as above)
    lower, upper = bracket_crossing(step, 1.0, 0.01, 1e-6, 100.0, tol)
    assert lower <= 0.3 < upper and upper - lower <= tol * upper
    assert bracket_crossing(lambda r: 0.0, 1.0, 0.01, 1e-6, 100.0, tol) == (100.0, math.inf)  # never crosses
    assert bracket_crossing(lambda r: 5.0, 1.0, 0.01, 1e-6, 100.0, tol)[0] == 0.0  # already above


def test_basin_radius_on_a_quadratic_equals_the_closed_form():
    model = Quadratic(centred=True)
    loss = FunctionObjective("loss", lambda m: m.loss())
    direction = random_direction(model, 0, "filter")
    kappa = curvature_along(model, direction)
    search = RadiusSearch(threshold=0.2, tolerance=1e-6, value_name="loss")
    found = basin_radius(model, direction, loss, search=search)
    exact = math.sqrt(2 * 0.2 / kappa)
    assert found.lower < exact <= found.upper and abs(found.radius - exact) <= 1e-6 * exact
    assert found.center_value == 2.0 and found.level == pytest.approx(2.2)
    w0_norm = float(model.flat_weights().norm())
    assert found.relative_radius == pytest.approx(exact / w0_norm, rel=1e-6)
    assert len(found.samples.radii) <= search.max_evaluations and found.samples.radii[0] == 0.0
    expected_profile = 2.0 + 0.5 * kappa * found.samples.radii ** 2
    np.testing.assert_allclose(found.samples.values, expected_profile, rtol=1e-12)

    relative = basin_radius(model, direction, loss,  # a rise of 0.1 x 2.0
                            search=RadiusSearch(0.1, relative=True, tolerance=1e-6, value_name="loss"))
    assert relative.radius == pytest.approx(math.sqrt(2 * 0.2 / kappa), rel=1e-6)


def test_statistics_over_directions_profiles_and_displacements_on_a_quadratic(tmp_path):
    model = Quadratic(centred=True)
    loss = FunctionObjective("loss", lambda m: m.loss())
    specs = [random_direction(model, seed, "layer").spec for seed in range(5)]
    search = RadiusSearch(threshold=0.5, tolerance=1e-7, value_name="loss")
    names = ["first", "second"]
    w_q = {"first": model.first.weight.detach() + 0.25, "second": model.second.weight.detach().clone()}
    result = QuantResult(w_q, None, "shift", base_model="bowl",
                         base_fingerprint=weights_fingerprint(model, names))
    stats = basin_statistics(model, specs, loss, search=search, profile_radii=[0.0, 0.5, 1.0],
                             quant_results={"shift": result},
                             execution=Execution(store=tmp_path / "radius.h5", progress=False))
    kappas = np.array([curvature_along(model, regenerate(model, s)) for s in specs])
    exact = np.sqrt(2 * 0.5 / kappas)
    np.testing.assert_allclose(stats.radii, exact, rtol=1e-6)
    assert stats.median == pytest.approx(np.median(exact), rel=1e-6)
    assert stats.quantiles((0.25, 0.9))[0.9] == pytest.approx(np.quantile(exact, 0.9), rel=1e-6)
    w0_norm = float(model.flat_weights().norm())
    np.testing.assert_allclose(stats.relative_radii, exact / w0_norm, rtol=1e-6)
    np.testing.assert_allclose(stats.profile_values,
                               2.0 + 0.5 * kappas[:, None] * np.array([0.0, 0.5, 1.0]) ** 2, rtol=1e-12)
    # 6 entries moved
    assert stats.displacement_norms["shift"] == pytest.approx(0.25 * math.sqrt(6), rel=1e-12)
    assert stats.displacement_to_radius()["shift"] == pytest.approx(0.25 * math.sqrt(6) / np.median(exact),
                                                                    rel=1e-6)

    in_memory = basin_statistics(model, specs, loss, search=search, profile_radii=[0.0, 0.5, 1.0],
                                 execution=Execution(progress=False))
    assert np.array_equal(in_memory.radii, BasinStatistics.from_store(tmp_path / "radius.h5").radii)
    # that layer did not move
    assert displacement_norms(model, {"shift": result}, ["second"]) == {"shift": 0.0}


def trained_tiny_gpt2(data) -> nn.Module:
    """A tiny GPT-2 fitted to ``data`` (40 Adam steps), so w0 sits in a basin of its NLL: a random one is
    flat."""
    model = tiny_model("gpt2")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=data.tokens, labels=data.tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_radius_bracket_holds_for_the_real_nll_of_a_tiny_gpt2():
    data = random_tokens(4, 16)
    model = trained_tiny_gpt2(data)
    direction = random_direction(model, 0, "filter")
    found = basin_radius(model, direction, data=data, search=RadiusSearch(threshold=0.1, tolerance=0.02))
    assert found.found and found.upper - found.lower <= 0.02 * found.upper

    def naive_nll(radius: float) -> float:  # copy the model, move it by hand, HF's own loss
        moved = copy.deepcopy(model)
        unit = direction.unit()
        with torch.no_grad():
            for name, module in quantizable_layers(moved).items():
                module.weight.add_(radius * unit[name].T)
            return float(moved(input_ids=data.tokens, labels=data.tokens).loss)

    assert naive_nll(0.0) == pytest.approx(found.center_value, rel=1e-6)
    assert naive_nll(found.lower) <= found.level + 1e-5 and naive_nll(found.upper) > found.level - 1e-5
    profile = radial_profile(model, direction, [found.lower, found.upper], data=data)
    assert profile.values[0] <= found.level < profile.values[1]


def test_bad_settings_and_directions_are_refused_before_any_evaluation():
    model = Quadratic(centred=True)
    calls = []
    counting = FunctionObjective("loss", lambda m: calls.append(1) or 0.0)
    with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
        RadiusSearch(threshold=-1)
    with pytest.raises(ValueError, match=r"tolerance must be in \[1e-09, 1\)"):
        RadiusSearch(tolerance=0)
    with pytest.raises(ValueError, match="value_name 'nll' is not an output"):
        basin_radius(model, random_direction(model, 0), counting)
    with pytest.raises(DirectionError, match="norm 0"):
        basin_radius(model, user_direction(model, {"first": torch.zeros(3, 2, dtype=torch.float64)}),
                     counting, search=RadiusSearch(value_name="loss"))
    other = Quadratic(seed=1, centred=True)
    with pytest.raises(DirectionError, match="made on base weights"):
        basin_statistics(model, [random_direction(model, 0).spec, random_direction(other, 1).spec], counting,
                         search=RadiusSearch(value_name="loss"), execution=Execution(progress=False))
    with pytest.raises(DirectionError, match="same layers"):
        basin_statistics(model,
                         [random_direction(model, 0).spec, random_direction(model, 1, layers="first").spec],
                         counting, search=RadiusSearch(value_name="loss"),
                         execution=Execution(progress=False))
    assert not calls
    assert quantile(np.array([1.0, math.inf, math.inf]), 0.75) == math.inf  # not NaN
    assert quantile(np.array([1.0, 2.0, 4.0, 8.0]), 0.3) == pytest.approx(np.quantile([1, 2, 4, 8], 0.3))
