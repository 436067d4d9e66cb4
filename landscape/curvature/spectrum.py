"""The spectrum of the NLL Hessian (or GGN) at w0: extreme eigenpairs, trace and eigenvalue density.

* :func:`lanczos_spectrum`: one reorthogonalised Lanczos run; the Ritz pairs at both ends of its Krylov space
  approximate the largest and smallest *algebraic* eigenvalues, each with its residual and a convergence flag.
* :func:`hutchpp_trace`: Hutch++ (Meyer et al. 2021).
* :func:`slq_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

Eigenvalues, traces and densities are in nats/token per squared weight unit. Each result serialises to a
:class:`~landscape.store.StoreRecord` (``to_record``) and is rebuilt from one (``from_record``), from a
store's contents (``from_data``) or from a store file (``from_store``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from hessian_eigenthings import (
    CurvatureOperator,
    LanczosTridiag,
    lanczos_tridiagonal,
    spectral_density,
)
from tqdm.auto import tqdm

from landscape.curvature.operators import (
    CountedOperator,
    LeanBackend,
    MappedBasisBackend,
    NLLProblem,
    check_krylov_memory,
    krylov_backend,
    matvec_into,
    quadratic_form,
    rademacher,
)
from landscape.curvature.space import ConvergenceWarning, CurvatureError, WeightSpace
from landscape.curvature.stored import StoredTask
from landscape.stats import Interval, normal_interval
from landscape.store import StoreRecord

DEFAULT_LANCZOS_STEPS = 50
DEFAULT_TOL = 1e-4


# ------------------------------------------------------------------------------------------ spectrum
@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs at one end of the spectrum.

    Attributes:
        end: ``"top"`` (largest algebraic eigenvalues, descending) or ``"bottom"`` (smallest, ascending).
        eigenvalues: ``(k,)`` nats/token per squared weight unit.
        residuals: ``(k,)`` Ritz residual norms ``||H v - lambda v||`` (same units);
            ``|lambda_true - lambda|`` is at most this for the nearest true eigenvalue.
        converged: ``(k,)`` whether ``residual <= tol * |eigenvalue|`` (or at rounding level,
            ``10 eps max|eigenvalue|``, which matters for eigenvalues near 0).
        eigenvectors: layer -> ``(k, out, in)``; row ``i`` over all layers is a unit vector (sign arbitrary).
            ``None`` when not requested (or not stored).
    """

    end: Literal["top", "bottom"]
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    eigenvectors: Mapping[str, torch.Tensor] | None

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def direction(self, i: int) -> dict[str, torch.Tensor]:
        """Eigenvector ``i`` as a unit-norm ``layer -> (out, in)`` direction (e.g. for a landscape scan)."""
        if self.eigenvectors is None:
            raise CurvatureError("eigenvectors were not kept (return_eigenvectors=False)")
        if not 0 <= i < len(self):
            raise IndexError(f"eigenpair index {i} out of range: {len(self)} {self.end} pairs")
        return {layer: vectors[i] for layer, vectors in self.eigenvectors.items()}


@dataclass(frozen=True)
class Spectrum(StoredTask):
    """Extreme eigenpairs of the NLL Hessian (or GGN) from one Lanczos run.

    Attributes:
        top, bottom: :class:`Eigenpairs` at each end (``bottom`` is empty when ``k_bottom=0``).
        operator: ``hessian`` or ``ggn``.
        layers: the layers whose weights span the space; ``n_params`` its dimension.
        lanczos_steps: Krylov dimension reached (= HVPs spent).
        seconds: wall time of the Lanczos run; ``seconds_per_matvec``: mean time of one product.
        settings: tolerance, seed, batch size, model and data provenance (JSON-able).
    """

    KIND = "spectrum"
    TASK = "spectrum"

    top: Eigenpairs
    bottom: Eigenpairs
    operator: str
    layers: tuple[str, ...]
    n_params: int
    lanczos_steps: int
    seconds: float
    seconds_per_matvec: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def eigenvalues(self) -> np.ndarray:
        """The top eigenvalues, descending."""
        return self.top.eigenvalues

    @property
    def converged(self) -> bool:
        """True only if every returned Ritz pair, top and bottom, converged."""
        return bool(self.top.converged.all() and self.bottom.converged.all())

    def to_record(self, include_eigenvectors: bool = True) -> StoreRecord:
        """The arrays and JSON-able attributes (its provenance) of a task of a curvature store.

        Array names: ``top/eigenvalues``, ``top/residuals``, ``top/converged``, ``top/eigenvectors/<layer>``
        (``(k, out, in)``), and the same under ``bottom/``.
        """
        arrays: dict[str, np.ndarray] = {}
        for pairs in (self.top, self.bottom):
            arrays[f"{pairs.end}/eigenvalues"] = pairs.eigenvalues
            arrays[f"{pairs.end}/residuals"] = pairs.residuals
            arrays[f"{pairs.end}/converged"] = pairs.converged
            if include_eigenvectors and pairs.eigenvectors is not None:
                for layer, vectors in pairs.eigenvectors.items():
                    arrays[f"{pairs.end}/eigenvectors/{layer}"] = vectors.detach().cpu().numpy()
        attrs = {"kind": "spectrum", "operator": self.operator, "layers": list(self.layers),
                 "n_params": self.n_params, "lanczos_steps": self.lanczos_steps, "seconds": self.seconds,
                 "seconds_per_matvec": self.seconds_per_matvec, "converged": self.converged, **self.settings}
        return StoreRecord(attrs, arrays=arrays)

    @classmethod
    def from_record(cls, record: StoreRecord) -> Spectrum:
        """The spectrum :meth:`to_record` wrote (eigenvectors as CPU tensors where they were stored)."""
        attrs, arrays = record.provenance, record.arrays
        layers = tuple(attrs["layers"])

        def pairs(end: Literal["top", "bottom"]) -> Eigenpairs:
            stored = {layer: f"{end}/eigenvectors/{layer}" for layer in layers}
            vectors = {layer: torch.from_numpy(np.asarray(arrays[name]))  # layer -> (k, out, in)
                       for layer, name in stored.items() if name in arrays}
            return Eigenpairs(end, arrays[f"{end}/eigenvalues"], arrays[f"{end}/residuals"],
                              arrays[f"{end}/converged"], vectors or None)

        fields = ("kind", "operator", "layers", "n_params", "lanczos_steps", "seconds", "seconds_per_matvec",
                  "converged")
        return cls(pairs("top"), pairs("bottom"), attrs["operator"], layers, int(attrs["n_params"]),
                   int(attrs["lanczos_steps"]), float(attrs["seconds"]), float(attrs["seconds_per_matvec"]),
                   {k: v for k, v in attrs.items() if k not in fields})


    def __str__(self) -> str:
        flag = "" if self.converged else " (NOT all converged)"
        return (f"{self.operator} spectrum over {self.n_params:,} weights ({len(self.layers)} layers), "
                f"{self.lanczos_steps} Lanczos steps{flag}: "
                f"top {np.array2string(self.top.eigenvalues, precision=4)}, "
                f"bottom {np.array2string(self.bottom.eigenvalues, precision=4)}")


def check_spectrum_settings(problem: NLLProblem, k: int, k_bottom: int, lanczos_steps: int | None,
                            tol: float = DEFAULT_TOL, return_eigenvectors: bool = True,
                            krylov_dir: str | os.PathLike | None = None) -> int:
    """Check a spectrum's settings and memory before any work; returns its number of Lanczos steps.

    Raises :class:`CurvatureError` naming the bad value and the accepted range."""
    problem.check_model()
    space = problem.space
    if not isinstance(k, int) or k < 1:
        raise CurvatureError(f"k (top eigenpairs) must be an integer >= 1, got {k!r}")
    if not isinstance(k_bottom, int) or k_bottom < 0:
        raise CurvatureError(f"k_bottom must be an integer >= 0, got {k_bottom!r}")
    if k + k_bottom > space.size:
        raise CurvatureError(f"k + k_bottom = {k} + {k_bottom} eigenpairs asked of a Hessian of dimension "
                             f"{space.size} (the selected weights): ask for at most {space.size} in all")
    steps = (min(max(DEFAULT_LANCZOS_STEPS, 2 * (k + k_bottom)), space.size) if lanczos_steps is None
             else lanczos_steps)
    if not isinstance(steps, int) or not k + k_bottom <= steps <= space.size:
        raise CurvatureError(f"lanczos_steps must be an integer from k + k_bottom = {k + k_bottom} to the "
                             f"Hessian's dimension {space.size}, got {steps!r}")
    if not tol > 0:
        raise CurvatureError(f"tol must be > 0, got {tol!r}")
    # Lanczos keeps its basis (a vector per step; on disk with krylov_dir), and the Ritz vectors if asked.
    returned = k + k_bottom if return_eigenvectors else 0
    check_krylov_memory(problem.model, space, steps + 1, returned, f"lanczos_steps={steps}", "lanczos_steps",
                        krylov_dir)
    return steps


def lanczos_spectrum(problem: NLLProblem, k: int, k_bottom: int, lanczos_steps: int | None, tol: float,
                     seed: int, return_eigenvectors: bool, krylov_dir: str | os.PathLike | None) -> Spectrum:
    """Top-``k`` and bottom-``k_bottom`` eigenpairs by one reorthogonalised Lanczos run of ``lanczos_steps``
    products from a seeded Gaussian start vector (the body of :meth:`landscape.curvature.Curvature.spectrum`,
    which documents the arguments). Every setting and the memory are checked before the first product."""
    steps = check_spectrum_settings(problem, k, k_bottom, lanczos_steps, tol, return_eigenvectors, krylov_dir)
    space = problem.space
    op = problem.operator()

    generator = torch.Generator().manual_seed(seed)
    start_vector = torch.randn(space.size, generator=generator, dtype=op.dtype).to(op.device)  # (n,)
    started = time.perf_counter()
    with (krylov_backend(krylov_dir) as backend,  # a disk basis lives until the Ritz vectors are formed
          tqdm(total=steps, desc=f"Lanczos ({problem.kind})", disable=not problem.progress,
               leave=False) as bar):
        if isinstance(backend, MappedBasisBackend):  # the start vector on disk too, not in memory for the run
            start_vector = backend.keep(start_vector)
        counted = CountedOperator(op, bar)
        krylov = lanczos_tridiagonal(backend.products(counted), start_vector, steps, reorthogonalize=True,
                                     backend=backend)
        backend.release_spare()
        seconds = time.perf_counter() - started
        top, bottom = _ritz_pairs(krylov, space, op, k, k_bottom, tol, return_eigenvectors,
                                  getattr(backend, "release", None))
        spectrum = Spectrum(top, bottom, problem.kind, space.layers, space.size, krylov.iterations, seconds,
                            counted.seconds / max(counted.n_matvecs, 1),
                            {"tol": tol, "seed": seed, "k": k, "k_bottom": k_bottom, "reorthogonalize": True,
                             "krylov_storage": "disk" if krylov_dir else "memory", **problem.provenance()})
    if not spectrum.converged:
        bad = [f"{p.end} {v:.4g} (residual {r:.2g})" for p in (top, bottom)
               for v, r, ok in zip(p.eigenvalues, p.residuals, p.converged) if not ok]
        warnings.warn(f"{len(bad)} of {len(top) + len(bottom)} Ritz pairs not converged after "
                      f"{krylov.iterations} Lanczos steps at tol={tol:g}: {', '.join(bad[:4])}"
                      f"{' ...' if len(bad) > 4 else ''}; raise lanczos_steps", ConvergenceWarning,
                      stacklevel=3)
    return spectrum


def _ritz_pairs(krylov: LanczosTridiag, space: WeightSpace, op: CurvatureOperator, k: int, k_bottom: int,
                tol: float, return_eigenvectors: bool,
                release: Callable[[torch.Tensor], None] | None = None) -> tuple[Eigenpairs, Eigenpairs]:
    """The top-``k`` and bottom-``k_bottom`` Ritz pairs of a Lanczos run, with residuals and convergence
    flags (``release``: the disk basis's, called on each basis vector once it is read)."""
    # (m,) ascending Ritz values; (m, m) their coordinates in the Krylov basis, one column per value
    ritz_values, ritz_coords = torch.linalg.eigh(_tridiagonal(krylov))
    residuals = ritz_coords[-1].abs() * krylov.last_beta  # (m,) ||H y - theta y|| of each Ritz pair
    # A residual at rounding level of the spectrum's scale is converged even for an eigenvalue near 0.
    roundoff = 10 * torch.finfo(ritz_values.dtype).eps * float(ritz_values.abs().max())
    m = len(ritz_values)
    top_index = list(range(m - 1, max(m - 1 - k, -1), -1))
    bottom_index = [i for i in range(min(k_bottom, m)) if i not in top_index]
    if len(top_index) < k or len(bottom_index) < k_bottom:
        warnings.warn(f"the Krylov space closed after {m} steps (an invariant subspace): only {m} Ritz pairs "
                      f"exist, fewer than k + k_bottom = {k + k_bottom}; returning {len(top_index)} top and "
                      f"{len(bottom_index)} bottom pairs", ConvergenceWarning, stacklevel=4)

    def pairs(end: Literal["top", "bottom"], index: list[int]) -> Eigenpairs:
        idx = torch.tensor(index, dtype=torch.long, device=ritz_values.device)
        values, res = ritz_values[idx], residuals[idx]  # (k,), (k,)
        vectors = None
        if return_eigenvectors:
            stacked = torch.zeros(len(index), space.size, dtype=op.dtype, device=op.device)  # (k, n)
            for j, basis_vector in enumerate(krylov.basis):  # Ritz vector = Krylov basis @ Ritz coordinates
                stacked.addr_(ritz_coords[j, idx], basis_vector)
                if release is not None:
                    release(basis_vector)
            vectors = space.unflatten(stacked)
        converged = (res <= tol * values.abs()) | (res <= roundoff)
        return Eigenpairs(end, _numpy(values), _numpy(res), _numpy(converged), vectors)

    return pairs("top", top_index), pairs("bottom", bottom_index)


def _tridiagonal(krylov: LanczosTridiag) -> torch.Tensor:
    """The Lanczos tridiagonal matrix ``T = Q^T H Q`` ``(m, m)`` from its diagonal and off-diagonal."""
    m = krylov.alphas.shape[0]
    off = krylov.betas[: m - 1]
    return torch.diag(krylov.alphas) + torch.diag(off, 1) + torch.diag(off, -1)


# --------------------------------------------------------------------------------------------- trace
@dataclass(frozen=True)
class TraceEstimate(StoredTask):
    """Hutch++ estimate of ``tr(H)`` (nats/token per squared weight unit).

    ``stderr`` is the standard error of the stochastic (residual Hutchinson) part; the sketched part is
    exact. ``n_matvecs`` products were spent; ``value / n_params`` is the mean eigenvalue.
    """

    KIND = "trace"
    TASK = "trace"

    value: float
    stderr: float
    n_matvecs: int
    operator: str
    layers: tuple[str, ...]
    n_params: int
    seconds: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean_eigenvalue(self) -> float:
        return self.value / self.n_params

    def interval(self, level: float = 0.95) -> Interval:
        """Normal interval ``value +- z * stderr`` over the residual probe vectors."""
        return normal_interval(self.value, self.stderr, level=level, n_units=self.n_matvecs // 3,
                               unit="probe vectors")

    def to_record(self) -> StoreRecord:
        """The JSON-able attributes of a task of a curvature store (all fields are scalars)."""
        return StoreRecord({"kind": "trace", "value": self.value, "stderr": self.stderr,
                            "n_matvecs": self.n_matvecs, "operator": self.operator,
                            "layers": list(self.layers), "n_params": self.n_params, "seconds": self.seconds,
                            **self.settings})

    @classmethod
    def from_record(cls, record: StoreRecord) -> TraceEstimate:
        """The estimate :meth:`to_record` wrote."""
        attrs = record.provenance
        fields = ("kind", "value", "stderr", "n_matvecs", "operator", "layers", "n_params", "seconds")
        return cls(float(attrs["value"]), float(attrs["stderr"]), int(attrs["n_matvecs"]), attrs["operator"],
                   tuple(attrs["layers"]), int(attrs["n_params"]), float(attrs["seconds"]),
                   {k: v for k, v in attrs.items() if k not in fields})


    def __str__(self) -> str:
        return (f"tr({self.operator}) = {self.value:.5g} +- {self.stderr:.2g} (Hutch++, {self.n_matvecs} "
                f"products, {self.n_params:,} weights)")


def hutchpp_trace(problem: NLLProblem, n_matvecs: int, seed: int,
                  krylov_dir: str | os.PathLike | None = None) -> TraceEstimate:
    """Hutch++ trace with a budget of ``n_matvecs`` products (the body of
    :meth:`landscape.curvature.Curvature.trace`, which documents the arguments)."""
    problem.check_model()
    space = problem.space
    if not isinstance(n_matvecs, int) or n_matvecs < 6:
        raise CurvatureError(f"n_matvecs must be an integer >= 6 (Hutch++ spends a third on residual probes, "
                             f"and needs >= 2 of them for an error estimate), got {n_matvecs!r}")
    budget = 3 * (n_matvecs // 3)
    # the sketch's budget/3 rows (orthonormalised in place; in files under krylov_dir) and a probe and its
    # product beside them
    check_krylov_memory(problem.model, space, budget // 3, 2, f"n_matvecs={n_matvecs}", "n_matvecs",
                        krylov_dir)
    op = problem.operator()
    started = time.perf_counter()
    with (krylov_backend(krylov_dir) as backend,
          tqdm(total=budget, desc=f"Hutch++ ({problem.kind})", disable=not problem.progress,
               leave=False) as bar):
        counted = CountedOperator(op, bar)
        value, stderr = lean_hutch_plus_plus(counted, budget, seed, backend)
    return TraceEstimate(value, stderr, counted.n_matvecs, problem.kind, space.layers,
                         space.size, time.perf_counter() - started,
                         {"method": "hutch++", "seed": seed,
                          "sketch_storage": "disk" if krylov_dir else "memory", **problem.provenance()})


def lean_hutch_plus_plus(op: CurvatureOperator, budget: int, seed: int,
                         backend: LeanBackend | None = None) -> tuple[float, float]:
    """Hutch++ (Meyer et al. 2021) with ``budget`` products, as hessian-eigenthings' ``hutch_plus_plus``
    computes it (the same probes from the same seed; the tests compare them), in less memory: the sketch
    ``A S`` is kept as ``budget/3`` rows and orthonormalised in place by Gram-Schmidt (twice, for rounding)
    instead of a column matrix, a Householder QR factor beside it and LAPACK's copy of both. With a
    :class:`~landscape.curvature.operators.MappedBasisBackend` each row is a mapped file whose pages leave the
    process after each use: a product then has only its own vector (and its probe) in memory.

    Returns ``(estimate, stderr)``: the exact trace of ``Q^T A Q`` plus the mean of the residual probes
    ``g^T A g`` with ``g = (I - Q Q^T) z``, whose standard error is ``stderr``.
    """
    backend = backend if backend is not None else LeanBackend()
    m = budget // 3
    generator = torch.Generator().manual_seed(seed)

    def probe() -> torch.Tensor:
        return rademacher(op.size, op.dtype, op.device, generator)

    def subtract_projections(x: torch.Tensor) -> None:  # x -= (q . x) q for every kept q, in place
        for q in kept:
            x.sub_(q, alpha=float(torch.dot(q, x)))
            backend.release(q, x)  # q's pages leave after their last read (a dot, then the subtraction)

    rows = backend.vectors(m, torch.empty(op.size, dtype=op.dtype, device=op.device))  # rows A s_i, then Q
    scale = 0.0
    for row in rows:
        matvec_into(op, probe(), row)  # the product straight into its row
        scale = max(scale, float(row.norm()))
        backend.release(row)
    kept: list[torch.Tensor] = []  # an orthonormal basis of the sketch's span (vanishing rows dropped)
    for row in rows:
        for _ in range(2):
            subtract_projections(row)
        norm = float(row.norm())
        if norm > 1e3 * torch.finfo(op.dtype).eps * scale:
            row.div_(norm)
            kept.append(row)
        backend.release(row)
    del rows
    trace_low = 0.0
    for q in kept:
        trace_low += quadratic_form(op, q)
        backend.release(q)
    samples = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        g = probe()
        subtract_projections(g)
        samples[i] = quadratic_form(op, g)
    stderr = float(samples.std() / m**0.5) if m > 1 else float("nan")
    return trace_low + float(samples.mean()), stderr


# ------------------------------------------------------------------------------------------- density
@dataclass(frozen=True)
class Density(StoredTask):
    """Eigenvalue density of the NLL Hessian (or GGN) by stochastic Lanczos quadrature.

    Attributes:
        grid: ``(G,)`` eigenvalues (nats/token per squared weight unit).
        density: ``(G,)`` probability density of an eigenvalue drawn uniformly from the ``n_params``
            eigenvalues; it integrates to 1 (multiply by ``n_params`` for eigenvalues per unit).
        sigma: width of the Gaussian kernel that smooths the quadrature nodes.
        nodes, weights: ``(n_runs, m)`` quadrature nodes (Ritz values) and weights of each run (rows sum
            to 1).
        settings: ``n_runs``, ``lanczos_steps``, seed, batch size, model and data provenance (JSON-able).
    """

    KIND = "density"
    TASK = "density"

    grid: np.ndarray
    density: np.ndarray
    sigma: float
    nodes: np.ndarray
    weights: np.ndarray
    operator: str
    layers: tuple[str, ...]
    n_params: int
    n_matvecs: int
    seconds: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_record(self) -> StoreRecord:
        """Grid, density, nodes and weights with the JSON-able attributes, for a task of a curvature store."""
        return StoreRecord(arrays={"grid": self.grid, "density": self.density, "nodes": self.nodes,
                                   "weights": self.weights},
                           provenance={"kind": "density", "sigma": self.sigma, "operator": self.operator,
                                       "layers": list(self.layers), "n_params": self.n_params,
                                       "n_matvecs": self.n_matvecs, "seconds": self.seconds, **self.settings})

    @classmethod
    def from_record(cls, record: StoreRecord) -> Density:
        """The density :meth:`to_record` wrote."""
        attrs, arrays = record.provenance, record.arrays
        fields = ("kind", "sigma", "operator", "layers", "n_params", "n_matvecs", "seconds")
        return cls(arrays["grid"], arrays["density"], float(attrs["sigma"]), arrays["nodes"],
                   arrays["weights"], attrs["operator"], tuple(attrs["layers"]), int(attrs["n_params"]),
                   int(attrs["n_matvecs"]), float(attrs["seconds"]),
                   {k: v for k, v in attrs.items() if k not in fields})



def check_density_settings(problem: NLLProblem, n_runs: int, lanczos_steps: int, n_grid: int = 2000,
                           sigma: float | None = None, krylov_dir: str | os.PathLike | None = None) -> None:
    """Check a density's settings and memory before any work; raises :class:`CurvatureError`."""
    problem.check_model()
    space = problem.space
    if not isinstance(n_runs, int) or n_runs < 1:
        raise CurvatureError(f"n_runs must be an integer >= 1, got {n_runs!r}")
    if not isinstance(lanczos_steps, int) or not 1 <= lanczos_steps <= space.size:
        raise CurvatureError(f"lanczos_steps (density steps) must be an integer from 1 to the Hessian's "
                             f"dimension {space.size}, got {lanczos_steps!r}")
    if not isinstance(n_grid, int) or n_grid < 2:
        raise CurvatureError(f"n_grid must be an integer >= 2, got {n_grid!r}")
    if sigma is not None and not sigma > 0:
        raise CurvatureError(f"sigma must be > 0 or None (automatic), got {sigma!r}")
    check_krylov_memory(problem.model, space, lanczos_steps + 1, 0, f"lanczos_steps={lanczos_steps}",
                        "lanczos_steps", krylov_dir)


def slq_density(problem: NLLProblem, n_runs: int, lanczos_steps: int, n_grid: int, sigma: float | None,
                seed: int, krylov_dir: str | os.PathLike | None) -> Density:
    """Stochastic Lanczos quadrature density (the body of :meth:`landscape.curvature.Curvature.density`, which
    documents the arguments)."""
    check_density_settings(problem, n_runs, lanczos_steps, n_grid, sigma, krylov_dir)
    space = problem.space
    op = problem.operator()
    started = time.perf_counter()
    with (krylov_backend(krylov_dir) as backend,
          tqdm(total=n_runs * lanczos_steps, desc=f"SLQ ({problem.kind})", disable=not problem.progress,
               leave=False) as bar):
        counted = CountedOperator(op, bar)
        result = spectral_density(backend.products(counted), num_runs=n_runs, lanczos_steps=lanczos_steps,
                                  num_grid_points=n_grid, sigma=sigma, seed=seed, backend=backend)
    return Density(_numpy(result.grid), _numpy(result.density), float(result.sigma),
                   _numpy(result.raw_eigenvalues), _numpy(result.raw_weights), problem.kind, space.layers,
                   space.size, counted.n_matvecs, time.perf_counter() - started,
                   {"n_runs": n_runs, "lanczos_steps": lanczos_steps, "seed": seed, **problem.provenance()})


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; floating point as float64 (bool and integer tensors keep their type)."""
    array = t.detach().cpu().numpy()
    return array.astype(np.float64) if t.is_floating_point() else array
