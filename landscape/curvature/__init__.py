"""Curvature of the NLL around w0: Hessian (or Gauss-Newton) spectra, trace, density, directional curvature.

A thin layer over ``hessian-eigenthings`` 1.0.0a5 (its operators, Lanczos kernel, Hutch++ and SLQ), fixed to
the conventions of this toolkit. One object per set-up, as PyHessian prepares its state once::

    curvature = Curvature(model, data, layers="transformer.h.0.*", batch_size=4)  # checks, batches, weights
    spectrum = curvature.spectrum(k=10, k_bottom=3)  # also .trace(), .density(), .operator()
    # along a direction: also .rayleigh_quotient(), .slope(), .second_derivative()
    path = curvature.along(direction, t=(0.0, 0.5, 1.0), level=0.95, slope=True)
    record = read_curvature("spectrum.h5")  # a whole curvature store: .spectrum, .trace, .density, .paths

Every result (:class:`Spectrum`, :class:`TraceEstimate`, :class:`Density`, :class:`DirectionalCurvature`,
:class:`PathCurvature`) serialises with ``to_record()`` and reads back with ``from_record``, ``from_data(data,
task)`` or ``from_store(path, task)``.

Modules: :mod:`~landscape.curvature.space` (errors, weight spaces, directions, the checks),
:mod:`~landscape.curvature.operators` (the NLL as a hessian-eigenthings operator, Krylov memory and the
mapped basis), :mod:`~landscape.curvature.spectrum` (Lanczos, Hutch++, SLQ),
:mod:`~landscape.curvature.directional` (Rayleigh quotient, slope, finite differences, paths),
:mod:`~landscape.curvature.measure` (:class:`Curvature`), :mod:`~landscape.curvature.stored` and
:mod:`~landscape.curvature.records` (reading curvature stores).

* **Objective.** The token-mean NLL of :func:`landscape.objectives.nll`, ``L(w) = sum_s S_s(w) / N``
  (``S_s``: summed NLL of the scored tokens of segment ``s``, :func:`~landscape.objectives.segment_nll_sums`;
  ``N``: all scored tokens of the :class:`~landscape.data.TokenSet`). Every operator is exactly the Hessian
  ``H = d2L/dw2`` (``operator="hessian"``) or the generalized Gauss-Newton ``G = J^T H_logits J``
  (``operator="ggn"``, positive semi-definite) of that L; ``batch_size`` only bounds memory.
* **Coordinates.** The weights of the quantizable layers (:func:`landscape.models.quantizable_layers`), all
  of them, a glob subset (``"transformer.h.0.*"``) or one layer; the spectrum of a subset is that of the
  diagonal block of the full Hessian. Vectors come in and go out as ``layer name -> (out, in) tensor`` maps
  (:func:`landscape.models.weight_matrix` orientation; GPT-2's ``Conv1D`` stores ``(in, out)`` and is
  transposed for you), so eigenvectors are ready to use as scan directions.
* **Units.** Eigenvalues, traces and directional curvatures are in nats/token per squared weight unit:
  ``v^T H v`` for a unit vector ``v`` (Euclidean norm over all selected weights). A direction ``d`` is
  normalised first, so its curvature is the Rayleigh quotient ``d^T H d / d^T d``.
* **Measured pitfalls handled here** (FIELD_NOTES "Hessians"): Lanczos always reorthogonalises (ghost
  eigenvalues otherwise), runs about 50 steps, and reports both ends of the spectrum from one Krylov space
  (the top by largest *algebraic* value; the bottom is often negative away from a minimum); a Ritz pair
  whose residual is above tolerance is reported as not converged, with a :class:`ConvergenceWarning`.
  Double backward needs eager attention and eval mode; both are checked before any work.

* **Memory.** Reorthogonalised Lanczos keeps one full-length vector per step (SmolLM2-135M: 106M weights,
  0.42 GB per fp32 vector, 25 GB for 60 steps). A run whose vectors cannot fit in the memory available is
  refused before its first product, saying how many fit; ``krylov_dir`` keeps the basis in memory-mapped
  files instead (bit-identical results; the operating system pages it out).
* **First order too.** :meth:`Curvature.slope` gives ``g^T u`` along a direction (one backward per batch), so
  a displacement's cost can be split into its first- and second-order parts
  (:meth:`Curvature.along` with ``slope=True``).

Cost: one Hessian-vector product (HVP) is a forward and a double backward over ``data``, measured at 3.0x a
forward+backward on ref-tiny (95 ms for 4 x 128 tokens, 1 CPU thread); a GGN product (a JVP plus a VJP) was
1.7x an HVP there. Lanczos adds full reorthogonalisation, negligible next to the products at 50 steps on a
small model. On SmolLM2 (2 x 128 tokens, 2 cores) a product took 8 s; 60 steps with the basis in mapped files
took 25 min, 8 of them products: once the basis outgrew the page cache, each step read it back from disk
(a step grew from 10 s to 67 s).
"""

from landscape.curvature.directional import DEFAULT_FD_STEP, DirectionalCurvature, PathCurvature
from landscape.curvature.measure import Curvature
from landscape.curvature.operators import KRYLOV_MEMORY_SHARE, available_memory_bytes
from landscape.curvature.records import CurvatureRecord, read_curvature
from landscape.curvature.space import (
    OPERATORS,
    ConvergenceWarning,
    CurvatureError,
    Direction,
    DirectionMismatchError,
    OperatorKind,
    WeightSpace,
    check_curvature_model,
    direction_space,
    weight_space,
)
from landscape.curvature.spectrum import (
    DEFAULT_LANCZOS_STEPS,
    DEFAULT_TOL,
    Density,
    Eigenpairs,
    Spectrum,
    TraceEstimate,
)

__all__ = [
    "DEFAULT_FD_STEP",
    "DEFAULT_LANCZOS_STEPS",
    "DEFAULT_TOL",
    "KRYLOV_MEMORY_SHARE",
    "OPERATORS",
    "ConvergenceWarning",
    "Curvature",
    "CurvatureError",
    "CurvatureRecord",
    "Density",
    "Direction",
    "DirectionMismatchError",
    "DirectionalCurvature",
    "Eigenpairs",
    "OperatorKind",
    "PathCurvature",
    "Spectrum",
    "TraceEstimate",
    "WeightSpace",
    "available_memory_bytes",
    "check_curvature_model",
    "direction_space",
    "read_curvature",
    "weight_space",
]
