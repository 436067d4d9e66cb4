""":class:`Curvature`: one curvature problem (a model, held-out data, weights, an operator), validated and
prepared once, and every measurement of it as a method."""

from __future__ import annotations

import os
from collections.abc import Sequence

from hessian_eigenthings import CurvatureOperator
from torch import nn

from landscape.curvature.directional import (
    DirectionalCurvature,
    PathCurvature,
    finite_difference_curvature,
    gradient_slope,
    hvp_rayleigh_quotient,
    path_curvature,
)
from landscape.curvature.operators import CountedOperator, NLLProblem, token_batches
from landscape.curvature.space import Direction, OperatorKind, WeightSpace, check_problem, weight_space
from landscape.curvature.spectrum import (
    DEFAULT_TOL,
    Density,
    Spectrum,
    TraceEstimate,
    check_density_settings,
    check_spectrum_settings,
    hutchpp_trace,
    lanczos_spectrum,
    slq_density,
)
from landscape.data import TokenSet
from landscape.stats import DEFAULT_RESAMPLES
from landscape.weights import LayerSelection


class Curvature:
    """The curvature of the token-mean NLL of ``model`` over ``data``, prepared once (as PyHessian prepares
    its state): the checks, the batches and the weight space are made here, before any forward pass, and
    shared by every measurement.

    Spectra, traces and densities (:meth:`spectrum`, :meth:`trace`, :meth:`density`, :meth:`operator`) are
    taken over the weights of ``layers``; directional quantities (:meth:`rayleigh_quotient`, :meth:`slope`,
    :meth:`second_derivative`, :meth:`along`) over the direction's own layers, whatever ``layers`` is.

    Args:
        model: the model at the weights the curvature is taken at (w0); in eval mode. Products (everything
            but :meth:`slope` and :meth:`second_derivative`) need eager attention for their double backward,
            checked by each of them before any work.
        data: held-out segments (a :class:`landscape.data.TokenSet` with scored tokens in the model's
            vocabulary).
        layers: ``None`` for every quantizable layer; a layer name or glob (``"transformer.h.0.*"``); or a
            sequence of them (:func:`landscape.weights.select_layers`). The spectrum of a subset is that of
            the diagonal block of the full Hessian.
        operator: ``"hessian"`` or ``"ggn"`` (generalized Gauss-Newton, positive semi-definite).
        batch_size: segments per forward pass (memory only: every operator is that of the whole set).
        progress: progress bars.

    Raises:
        CurvatureError: bad data, operator or batch size, a model in train mode, token ids outside the
            vocabulary, or selected weights that are frozen or non-finite.
        LayerSelectionError: a glob of ``layers`` that matches no quantizable layer.
    """

    def __init__(self, model: nn.Module, data: TokenSet, *, layers: LayerSelection = None,
                 operator: OperatorKind = "hessian", batch_size: int = 8, progress: bool = True) -> None:
        check_problem(model, data, operator, batch_size)
        space = weight_space(model, layers)
        self._problem = NLLProblem(model, data, token_batches(data, batch_size), space, operator, batch_size,
                                   progress)

    @property
    def model(self) -> nn.Module:
        return self._problem.model

    @property
    def data(self) -> TokenSet:
        return self._problem.data

    @property
    def space(self) -> WeightSpace:
        """The weights spectra, traces and densities are taken over (``layers``)."""
        return self._problem.space

    @property
    def kind(self) -> OperatorKind:
        """``"hessian"`` or ``"ggn"``."""
        return self._problem.kind

    @property
    def batch_size(self) -> int:
        return self._problem.batch_size

    def __repr__(self) -> str:
        return (f"Curvature({self.kind} over {self.space.size:,} weights of {len(self.space.layers)} layers, "
                f"{self.data.n_segments} segments in batches of {self.batch_size})")

    # ------------------------------------------------------------------------------- at w0: spectra
    def operator(self) -> CurvatureOperator:
        """The matrix-free Hessian (or GGN) of the token-mean NLL over ``data`` w.r.t. the weights of
        ``layers``.

        The returned ``hessian_eigenthings`` operator acts on flat ``(n,)`` vectors of :attr:`space`; use it
        with the library's algorithms directly. Its products work under ``torch.no_grad`` too, come back
        detached, and are counted in ``.n_matvecs`` (``.seconds`` spent).
        """
        self._problem.check_model()
        return CountedOperator(self._problem.operator())

    def spectrum(self, k: int = 10, k_bottom: int = 3, *, lanczos_steps: int | None = None,
                 tol: float = DEFAULT_TOL, seed: int = 0, return_eigenvectors: bool = True,
                 krylov_dir: str | os.PathLike | None = None) -> Spectrum:
        """Top-``k`` and bottom-``k_bottom`` eigenpairs by reorthogonalised Lanczos.

        One Lanczos run (``lanczos_steps`` HVPs from a seeded Gaussian start vector) builds a Krylov space;
        the Ritz pairs at its upper end approximate the largest *algebraic* eigenvalues (``which="LA"``),
        those at its lower end the smallest (``"SA"``), which near a pretrained w0 are often negative.

        Args:
            k, k_bottom: eigenpairs wanted at the top and at the bottom (``k_bottom=0`` for none).
            lanczos_steps: Krylov dimension; default ``max(50, 2 * (k + k_bottom))`` capped at the dimension.
            tol: a pair is converged when its residual is at most ``tol * |eigenvalue|`` (or at rounding
                level).
            seed: seed of the start vector.
            return_eigenvectors: keep the eigenvectors (``k + k_bottom`` vectors of every selected weight).
            krylov_dir: ``None`` keeps the Krylov basis (one full-length vector per step) in memory; a
                directory keeps it in memory-mapped files there instead (CPU only; removed when the run ends),
                so the operating system can page it out: 60 steps on a 135M-parameter model need 25 GiB, more
                than a 24 GiB machine has. The numbers are bit-identical either way.

        Returns:
            A :class:`Spectrum`; a :class:`ConvergenceWarning` is issued if any pair did not converge.

        Raises:
            CurvatureError: bad settings, or vectors that cannot fit in memory (or in ``krylov_dir``), before
                any product.
        """
        return lanczos_spectrum(self._problem, k, k_bottom, lanczos_steps, tol, seed, return_eigenvectors,
                                krylov_dir)

    def check_density(self, n_runs: int = 5, lanczos_steps: int = 50, *,
                      krylov_dir: str | os.PathLike | None = None) -> None:
        """Check :meth:`density`'s settings and memory without computing anything (``CurvatureError``)."""
        check_density_settings(self._problem, n_runs, lanczos_steps, krylov_dir=krylov_dir)

    def check_spectrum(self, k: int = 10, k_bottom: int = 3, *, lanczos_steps: int | None = None,
                       return_eigenvectors: bool = True, krylov_dir: str | os.PathLike | None = None) -> int:
        """Check :meth:`spectrum`'s settings and memory without computing anything (an entry point calls it
        before it creates its store); returns the Lanczos steps it would take. Raises ``CurvatureError``."""
        return check_spectrum_settings(self._problem, k, k_bottom, lanczos_steps,
                                       return_eigenvectors=return_eigenvectors, krylov_dir=krylov_dir)

    def trace(self, n_matvecs: int = 30, *, seed: int = 0,
              krylov_dir: str | os.PathLike | None = None) -> TraceEstimate:
        """Trace by Hutch++ (Meyer et al. 2021): a third of the products sketch the top subspace (its trace is
        exact), the rest estimate the remainder with Rademacher probes.

        Args:
            n_matvecs: product budget, >= 6 (rounded down to a multiple of 3; Hutch++ needs two residual
                probes to state an error).
            seed: seed of the sketch and probe vectors.
            krylov_dir: keep the ``n_matvecs / 3`` sketch vectors in files under this folder (as
                :meth:`spectrum` keeps its basis; the same numbers) instead of in memory.
        """
        return hutchpp_trace(self._problem, n_matvecs, seed, krylov_dir)

    def density(self, n_runs: int = 5, lanczos_steps: int = 50, *, n_grid: int = 2000,
                sigma: float | None = None, seed: int = 0,
                krylov_dir: str | os.PathLike | None = None) -> Density:
        """Smoothed eigenvalue density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

        ``n_runs`` reorthogonalised Lanczos runs of ``lanczos_steps`` products from Rademacher start vectors
        (seeds ``seed``, ``seed + 1``...), evaluated on ``n_grid`` points; ``sigma`` (the Gaussian kernel's
        width) defaults to the node range / ``lanczos_steps``; ``krylov_dir`` as in :meth:`spectrum`.
        """
        return slq_density(self._problem, n_runs, lanczos_steps, n_grid, sigma, seed, krylov_dir)

    # ----------------------------------------------------------------------------- along a direction
    def rayleigh_quotient(self, direction: Direction, *, level: float | None = None,
                          n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> DirectionalCurvature:
        """Rayleigh quotient ``d^T H d / d^T d`` of the NLL Hessian (or GGN) along ``direction`` at the
        current weights (nats/token per squared weight unit).

        One product per batch of ``batch_size`` segments. With ``level`` (e.g. 0.95) the per-batch values give
        a bootstrap interval over batches (needs >= 2 batches): on a single small batch the curvature ranking
        of two directions can flip, so compare with intervals.

        Args:
            direction: a :class:`landscape.engine.directions.Direction` or a mapping layer name ->
                ``(out, in)`` tensor, over any subset of the quantizable layers (the curvature is then that of
                that block of H).
            level, n_resamples, seed: the bootstrap interval (``level=None``: none).

        Raises:
            DirectionMismatchError: a direction that does not belong to this model (before any work).
        """
        return hvp_rayleigh_quotient(self._problem, direction, level, n_resamples, seed)

    def slope(self, direction: Direction, *, level: float | None = None, n_resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0) -> DirectionalCurvature:
        """Slope ``g^T u`` of the token-mean NLL along ``u = d / ||d||`` at the current weights (nats/token
        per weight unit): the first-order term of ``NLL(w + h u) = NLL(w) + h g^T u + h^2 u^T H u / 2 + ...``.

        One backward pass per batch of ``batch_size`` segments (no double backward: any attention); with
        ``level`` a bootstrap interval over batches. Returned as a :class:`DirectionalCurvature` with
        ``method="gradient"`` (``unit_sums[i]``: the slope of batch ``i``'s summed NLL). Arguments as in
        :meth:`rayleigh_quotient`.
        """
        return gradient_slope(self._problem, direction, level, n_resamples, seed)

    def second_derivative(self, direction: Direction, *, step: float | None = None, extrapolate: bool = True,
                          level: float | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                          seed: int = 0) -> DirectionalCurvature:
        """``d2/dh2 NLL(w + h u)`` at ``h = 0`` (``u = d / ||d||``) from central finite differences of the
        NLL (nats/token per squared weight unit).

        The central difference ``D(h) = (L(w + h u) - 2 L(w) + L(w - h u)) / h^2`` has an ``O(h^2)`` error;
        with ``extrapolate`` (default) Richardson's ``(4 D(h) - D(2h)) / 3`` removes it, leaving ``O(h^4)``
        plus a roundoff of about ``6 eps L / h^2`` (eps: machine epsilon, L ~ 5 nats/token). Along the
        sharpest direction of ref-tiny (lambda = 100) plain ``D`` was 9 % off at h = 1e-2: the NLL is far
        from quadratic there. It needs only forward passes (no double backward; any attention), 5 NLL
        evaluations (3 without ``extrapolate``). The model is moved in place and restored bit-exactly. With
        ``level``, a bootstrap interval over segments.

        Args:
            step: ``h`` in weight-norm units; default :data:`DEFAULT_FD_STEP` (``1e-3`` in float64: roundoff
                about 1e-8; ``1e-2`` in float32: roundoff about 2e-2 nats/token per unit^2, so compute small
                curvatures in float64).
        """
        return finite_difference_curvature(self._problem, direction, step, extrapolate, level, n_resamples,
                                           seed)

    def along(self, direction: Direction, t: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), *,
              level: float | None = None, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              slope: bool = False) -> PathCurvature:
        """Curvature along ``direction`` at several points ``w0 + t * direction`` of the path from w0 (and,
        with ``slope``, the slope :meth:`slope` there too: one backward pass more per batch and point).

        At w0 itself a quantization displacement looks as flat as a random direction; differences in steepness
        between methods show along the path. The model is moved in place (only the direction's layers; no
        copy of the model) and restored to w0 bit-exactly after each point, also when an error interrupts.
        Other arguments as in :meth:`rayleigh_quotient`.
        """
        return path_curvature(self._problem, direction, t, level, n_resamples, seed, slope)
