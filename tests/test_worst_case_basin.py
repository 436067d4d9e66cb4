"""The worst-case basin (issue #22): R(w0) along Hessian eigenvectors and normalised displacements beside the
random ("most-case") directions. On a quadratic objective ``f(w0 + r v) = f0 + lambda r^2 / 2`` the radius
along an eigenvector is ``sqrt(2 t / lambda)`` for a threshold ``t``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import saved_tiny_llama, tiny_model

from landscape.cli import main as cli_main
from landscape.curvature.spectrum import Eigenpairs
from landscape.engine.basin import (
    BasinStatistics,
    RadiusSearch,
    basin_radius,
    basin_statistics,
    eigenvector_directions,
)
from landscape.engine.directions import DirectionSpec
from landscape.weights import Base, quantizable_layers, weight_matrix

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
SMALL = ["--segments", "2", "--seq-len", "16", "--no-progress"]


class Quadratic:
    """``f = 1 + (w - w0)^T H (w - w0) / 2`` over one layer's weights (flattened row-major)."""

    forward_only = False

    def __init__(self, layer: str, hessian: torch.Tensor):
        self.layer, self.hessian = layer, hessian

    def output_names(self, layers):
        return ("nll",)

    def __call__(self, model, w0):
        delta = (weight_matrix(quantizable_layers(model)[self.layer]).detach() - w0[self.layer]).double()
        d = delta.flatten()
        return {"nll": float(1.0 + d @ self.hessian @ d / 2)}

    def provenance(self):
        return {"kind": "quadratic"}


@pytest.fixture(scope="module")
def quadratic():
    model = tiny_model("llama", hidden=8, layers=1)
    layer = next(n for n in quantizable_layers(model) if n.endswith("q_proj"))
    n = weight_matrix(quantizable_layers(model)[layer]).numel()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    hessian = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(hessian)  # ascending; dense, independent of Lanczos
    shape = weight_matrix(quantizable_layers(model)[layer]).shape
    top = Eigenpairs("top", values.flip(0)[:2].numpy(), np.zeros(2), np.ones(2, bool),
                     {layer: vectors.flip(1)[:, :2].T.reshape(2, *shape).float()})
    return Base(model, "tiny"), layer, hessian, top


def test_radius_along_an_eigenvector_of_a_quadratic_is_sqrt_2t_over_lambda(quadratic):
    base, layer, hessian, top = quadratic
    t = 0.05
    search = RadiusSearch(threshold=t, tolerance=1e-4)
    directions = eigenvector_directions(base, top)
    assert [d.spec.source[:3] for d in directions] == ["+v1", "-v1", "+v2", "-v2"]
    for d, value in zip(directions, np.repeat(top.eigenvalues, 2)):
        found = basin_radius(base, d, Quadratic(layer, hessian), search=search)
        assert found.radius == pytest.approx(math.sqrt(2 * t / value), rel=2e-4)


def test_worst_to_most_case_is_the_sharpest_eigenvector_over_the_random_median(quadratic, tmp_path):
    base, layer, hessian, top = quadratic
    random = [DirectionSpec("random", (layer,), seed=s, normalization="filter") for s in range(3)]
    stats = basin_statistics(base, [*random, *eigenvector_directions(base, top)], Quadratic(layer, hessian),
                             search=RadiusSearch(threshold=0.05, tolerance=1e-4))
    kinds = [b.direction.kind for b in stats.per_direction]
    random_r = np.array([b.radius for b, k in zip(stats.per_direction, kinds) if k == "random"])
    assert stats.radii.tolist() == random_r.tolist() and stats.median == np.median(random_r)
    along = stats.along()
    assert len(along) == 4 and all(label.startswith(("+v", "-v")) for label in along)
    sharpest = math.sqrt(2 * 0.05 / top.eigenvalues[0])
    assert min(along.values()) == pytest.approx(sharpest, rel=2e-4)
    assert stats.worst_to_most_case() == pytest.approx(min(along.values()) / np.median(random_r))
    assert stats.worst_to_most_case() < 1  # no random direction is as sharp as the top eigenvector


def test_cli_radius_along_eigenvectors_and_displacements(tmp_path, capsys):
    model = saved_tiny_llama(tmp_path / "llama")
    q = tmp_path / "q" / "rtn.int4"
    assert cli_main(["quantize", str(model), "--method", "rtn", "--format", "int4", "--calib-sequences", "2",
                     "--calib-seq-len", "16", "--no-progress", "--out", str(q)]) == 0
    out = tmp_path / "r.h5"
    capsys.readouterr()
    assert cli_main(["radius", str(model), "--directions", "2", "--eigenvectors", "1", "--lanczos-steps", "6",
                     "--quantized", str(q), "--along-quantized", "--threshold", "0.01", *SMALL,
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stats = BasinStatistics.from_store(out)
    kinds = [b.direction.kind for b in stats.per_direction]
    assert kinds == ["random", "random", "displacement", "eigenvector", "eigenvector"]
    along = stats.along()
    assert list(along)[0] == "displacement to rtn.int4" and len(along) == 3
    assert "worst case" in printed and "displacement to rtn.int4" in printed
    assert "over 2 random directions" in printed
    assert stats.median == np.median([b.radius for b in stats.per_direction[:2]])


@pytest.mark.parametrize("extra, message", [
    (["--along-quantized"], "--along-quantized searches R along each --quantized"),
    (["--eigenvectors", "-1"], "--eigenvectors must be >= 0"),
    (["--eigenvectors", "2", "--lanczos-steps", "1"], "--lanczos-steps must be >= --eigenvectors"),
    (["--eigenvectors", "1", "--executor", "debug"], "--eigenvectors runs the Lanczos search in this"),
])
def test_bad_worst_case_settings_are_one_error_before_any_file(tmp_path, capsys, extra, message):
    out = tmp_path / "r.h5"
    assert cli_main(["radius", "ref-tiny", "--directions", "2", *SMALL, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
