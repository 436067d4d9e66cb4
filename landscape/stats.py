"""Uncertainty for every reported number: bootstrap intervals over evaluation segments, paired differences,
quantiles over directions or seeds, and t-intervals over seeds.

Conventions:

* **Token-mean NLL over segments.** An NLL is a ratio of sums, ``sum_s S_s / sum_s n_s`` (``S_s``: summed NLL
  of segment ``s``'s scored tokens, ``n_s``: its scored-token count; exactly
  :attr:`landscape.objectives.NLLResult.segment_nll_sum` and ``segment_tokens``). The bootstrap resamples
  whole segments *with their token counts* and recomputes the ratio, so long segments weigh more, as they
  do in the point estimate. Segments, not tokens, are the resampling unit because tokens of one segment
  are correlated.
* **Paired differences** (model B minus model A on the *same* segments) resample the same segment indices
  for both models, so the segment-to-segment variation they share cancels: far narrower intervals than
  comparing two separate intervals.
* **Intervals** are two-sided at ``level`` (default 0.95): ``percentile`` (the ``alpha/2`` and
  ``1 - alpha/2`` quantiles of the resampled statistic) or ``bca`` (bias-corrected and accelerated, Efron
  1987; acceleration from the jackknife). Everything is seeded (``numpy.random.default_rng(seed)``): the
  same inputs and seed give bit-identical intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import stats as scipy_stats

if TYPE_CHECKING:
    from landscape.objectives import NLLResult

BootstrapMethod = Literal["percentile", "bca"]
BOOTSTRAP_METHODS = ("percentile", "bca")
DEFAULT_RESAMPLES = 2000
_RESAMPLE_CHUNK_ELEMENTS = 1 << 22  # resample-count matrix entries held at once (memory bound only)


class StatsError(ValueError):
    """Invalid input to an interval: too few units, mismatched shapes, a bad level or method."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval.

    Attributes:
        value: the estimate on the full data (not the mean of the resamples).
        low, high: interval bounds, in the units of ``value``.
        level: coverage the interval aims at (0.95 = 95 %).
        method: how it was made: ``bootstrap`` (percentile), ``BCa bootstrap``, ``paired bootstrap``,
            ``paired BCa bootstrap``, ``unpaired bootstrap``, ``t`` (Student t over independent values)
            or ``normal`` (estimate +- z * standard error).
        n_resamples: bootstrap resamples drawn (0 for closed-form intervals).
        n_units: independent units the interval is over (segments, batches, seeds, directions).
        unit: what those units are, for the printed form.
    """

    value: float
    low: float
    high: float
    level: float
    method: str
    n_resamples: int
    n_units: int
    unit: str = "segments"

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, x: float) -> bool:
        """Whether ``low <= x <= high``."""
        return self.low <= x <= self.high

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (for HDF5 attrs)."""
        return asdict(self)

    def __str__(self) -> str:
        value, low, high = _fmt_alike(self.value, self.low, self.high)
        return (f"{value} [{low}, {high}] ({self.level * 100:g} % {self.method} over {self.n_units} "
                f"{self.unit})")


@dataclass(frozen=True)
class Quantiles:
    """Quantiles of a set of values (e.g. basin radii over directions, NLLs over seeds).

    ``values[i]`` is the ``probs[i]`` quantile (numpy's default linear interpolation between order
    statistics).
    """

    probs: tuple[float, ...]
    values: tuple[float, ...]
    n: int
    mean: float
    minimum: float
    maximum: float
    unit: str = "directions"

    def __getitem__(self, prob: float) -> float:
        try:
            return self.values[self.probs.index(prob)]
        except ValueError:
            raise KeyError(f"quantile {prob!r} was not computed; available: {self.probs}") from None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "probs": list(self.probs), "values": list(self.values)}

    def __str__(self) -> str:
        parts = ", ".join(f"q{p * 100:g} {_fmt(v)}" for p, v in zip(self.probs, self.values))
        return f"{parts} (min {_fmt(self.minimum)}, max {_fmt(self.maximum)}; {self.n} {self.unit})"


# ------------------------------------------------------------------------------------- token means
def token_mean_interval(
    nll_sums: Sequence[float] | np.ndarray,
    token_counts: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    method: BootstrapMethod = "percentile",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    unit: str = "segments",
) -> Interval:
    """Bootstrap interval of a token-mean, ``sum(nll_sums) / sum(token_counts)``, resampling segments.

    Args:
        nll_sums: per-segment summed NLL (nats), e.g. ``NLLResult.segment_nll_sum``; any additive
            per-unit quantity works (e.g. per-batch curvature sums).
        token_counts: per-segment scored-token counts (> 0), e.g. ``NLLResult.segment_tokens``.
        level: two-sided coverage in (0, 1).
        method: ``percentile`` or ``bca``.
        n_resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling.
        unit: name of the resampled units, for the printed form.

    Returns:
        An :class:`Interval` on the token-mean (nats/token for an NLL).
    """
    sums, counts = _segment_arrays(nll_sums, token_counts, "nll_sums", "token_counts")
    _check_settings(level, method, n_resamples)
    columns = np.stack([sums, counts], axis=1)  # (n, 2): additive per segment
    low, high = _bootstrap_of_sums(columns, _ratio, level, method, n_resamples, seed)
    label = "bootstrap" if method == "percentile" else "BCa bootstrap"
    return Interval(float(sums.sum() / counts.sum()), low, high, level, label, n_resamples, len(sums), unit)


def nll_interval(
    result: NLLResult,
    *,
    level: float = 0.95,
    method: BootstrapMethod = "percentile",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of an :class:`~landscape.objectives.NLLResult`'s token-mean NLL over its segments
    (arguments as in :func:`token_mean_interval`)."""
    return token_mean_interval(result.segment_nll_sum, result.segment_tokens, level=level, method=method,
                               n_resamples=n_resamples, seed=seed)


# ---------------------------------------------------------------------------------------- differences
def difference_interval(
    nll_sums_a: Sequence[float] | np.ndarray,
    token_counts_a: Sequence[float] | np.ndarray,
    nll_sums_b: Sequence[float] | np.ndarray,
    token_counts_b: Sequence[float] | np.ndarray,
    *,
    paired: bool = True,
    level: float = 0.95,
    method: BootstrapMethod = "percentile",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    unit: str = "segments",
) -> Interval:
    """Interval of ``token_mean(B) - token_mean(A)`` (e.g. quantized minus full-precision NLL).

    Why so many parameters: two sets of per-segment data (sums and token counts of A and of B) and the
    bootstrap's usual keywords (level, method, resamples, seed), as in ``scipy.stats.bootstrap``.

    Args:
        paired: ``True`` when A and B were evaluated on the same segments (same order, same token counts):
            one set of resampled segment indices is used for both, so shared segment difficulty cancels.
            ``False`` resamples A and B independently (different evaluation sets; percentile only).
        Other arguments as in :func:`token_mean_interval`.
    """
    sums_a, counts_a = _segment_arrays(nll_sums_a, token_counts_a, "nll_sums_a", "token_counts_a")
    sums_b, counts_b = _segment_arrays(nll_sums_b, token_counts_b, "nll_sums_b", "token_counts_b")
    _check_settings(level, method, n_resamples)
    if paired and not np.array_equal(counts_a, counts_b):
        what = ("different token counts" if len(counts_a) == len(counts_b)
                else f"{len(counts_a)} and {len(counts_b)} segments")
        raise StatsError(f"paired=True needs A and B on the same segments (same token counts in the same "
                         f"order), got {what}; use paired=False for different evaluation sets")
    if not paired and method != "percentile":
        raise StatsError(f"paired=False supports method='percentile' only, got method={method!r}")
    value = sums_b.sum() / counts_b.sum() - sums_a.sum() / counts_a.sum()
    if paired:
        columns = np.stack([sums_a, sums_b, counts_a], axis=1)  # (n, 3)
        low, high = _bootstrap_of_sums(columns, _paired_difference, level, method, n_resamples, seed)
        label = "paired bootstrap" if method == "percentile" else "paired BCa bootstrap"
        return Interval(float(value), low, high, level, label, n_resamples, len(sums_a), unit)
    rng = np.random.default_rng(seed)
    boot_a = _ratio(_resampled_sums(np.stack([sums_a, counts_a], 1), n_resamples, rng))
    boot_b = _ratio(_resampled_sums(np.stack([sums_b, counts_b], 1), n_resamples, rng))
    low, high = _percentile_bounds(boot_b - boot_a, level)
    n_units = min(len(sums_a), len(sums_b))
    return Interval(float(value), low, high, level, "unpaired bootstrap", n_resamples, n_units, unit)


def nll_difference_interval(
    a: NLLResult,
    b: NLLResult,
    *,
    paired: bool = True,
    level: float = 0.95,
    method: BootstrapMethod = "percentile",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Interval of ``b.value - a.value`` for two :class:`~landscape.objectives.NLLResult` (e.g. a = fp32,
    b = quantized). With ``paired=True`` both must be on the same data (conventions equal but for the
    model). Other arguments as in :func:`difference_interval`.
    """
    if paired and not a.convention.same_data(b.convention):
        raise StatsError(f"paired difference needs both NLLs on the same data; got "
                         f"A: {a.convention.describe()} and B: {b.convention.describe()}")
    return difference_interval(a.segment_nll_sum, a.segment_tokens, b.segment_nll_sum, b.segment_tokens,
                               paired=paired, level=level, method=method, n_resamples=n_resamples, seed=seed)


def contrast_interval(
    nll_sums: Sequence[Sequence[float] | np.ndarray],
    token_counts: Sequence[float] | np.ndarray,
    coefficients: Sequence[float],
    *,
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    unit: str = "segments",
) -> Interval:
    """Paired bootstrap interval of ``sum_k c_k * token_mean(model k)`` over models evaluated on the same
    segments.

    E.g. QAFT's advantage over GPTQ left after the full-precision control,
    ``[NLL(GPTQ) - NLL(QAFT)] - [NLL(w0) - NLL(control)]``: sums of (GPTQ, QAFT, w0, control) with
    coefficients (1, -1, -1, 1); several seeds of a method enter with coefficients ``1/n_seeds`` each. Every
    resample draws one set of segment indices for all models, so shared segment difficulty cancels.

    Args:
        nll_sums: per model, the summed NLL of each segment (nats), all in the same segment order.
        token_counts: scored tokens per segment (the same for every model: same segments).
        coefficients: one per model.
    """
    _check_settings(level, "percentile", n_resamples)
    if len(nll_sums) != len(coefficients) or not nll_sums:
        raise StatsError(f"one coefficient per model: got {len(nll_sums)} models and {len(coefficients)} "
                         f"coefficients")
    coef = _finite_1d(coefficients, "coefficients", minimum=1)
    counts = _finite_1d(token_counts, "token_counts", minimum=2)
    sums = [_segment_arrays(x, counts, f"nll_sums[{k}]", "token_counts")[0] for k, x in enumerate(nll_sums)]
    columns = np.stack([*sums, counts], axis=1)  # (n_segments, n_models + 1)

    def statistic(totals: np.ndarray) -> np.ndarray:
        return (totals[..., :-1] / totals[..., -1:]) @ coef

    value = float(statistic(columns.sum(axis=0)[None])[0])
    low, high = _bootstrap_of_sums(columns, statistic, level, "percentile", n_resamples, seed)
    return Interval(value, low, high, level, "paired bootstrap", n_resamples, len(counts), unit)


@dataclass(frozen=True)
class ControlAdjustedGap:
    """How much of QAFT's advantage over GPTQ is left once the full-precision fine-tuning control is accounted
    for.

    All NLLs on the same segments of one corpus (nats/token); QAFT and control NLLs averaged over their seeds.

    Attributes:
        advantage: ``NLL(GPTQ) - NLL(QAFT)``.
        adaptation: ``NLL(w0) - NLL(control)``: what fine-tuning on the calibration text gains without
            quantization.
        remaining: ``advantage - adaptation``: QAFT's advantage not explained by adaptation to that text.
        n_qaft_seeds, n_control_seeds: seeds averaged.
    """

    format: str
    corpus: str
    advantage: Interval
    adaptation: Interval
    remaining: Interval
    n_qaft_seeds: int
    n_control_seeds: int

    def sentence(self) -> str:
        """One sentence with the three numbers and their paired intervals."""
        def cell(i: Interval) -> str:
            return f"{i.value:+.3f} [{i.low:+.3f}, {i.high:+.3f}]"

        seeds = (f"{self.n_qaft_seeds} seed{'s' if self.n_qaft_seeds > 1 else ''} of QAFT and "
                 f"{self.n_control_seeds} of the control")
        verdict = ("the interval includes 0: no advantage beyond adaptation is shown"
                   if self.remaining.low <= 0 <= self.remaining.high else "")
        return (f"At {self.format} on {self.corpus}, QAFT beats GPTQ by {cell(self.advantage)} nats/token; "
                f"fine-tuning in full precision on the same calibration data alone gains "
                f"{cell(self.adaptation)}, so {cell(self.remaining)} of QAFT's advantage remains after the "
                f"control ({seeds}; {int(self.remaining.level * 100)} % paired bootstrap over "
                f"{self.remaining.n_units} segments"
                f"{'; ' + verdict if verdict else ''}).")


def control_adjusted_gap(
    fmt: str,
    corpus: str,
    gptq: Sequence[float] | np.ndarray,
    qaft: Sequence[Sequence[float] | np.ndarray],
    fp32: Sequence[float] | np.ndarray,
    control: Sequence[Sequence[float] | np.ndarray],
    token_counts: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> ControlAdjustedGap:
    """:class:`ControlAdjustedGap` from per-segment NLL sums on the same segments (QAFT and control: one
    array per seed).

    Why so many parameters: the four runs of the contrast (GPTQ, QAFT, w0, the control) and their token counts
    are the data; level, resamples and seed the bootstrap's usual keywords."""
    if not qaft or not control:
        raise StatsError(f"need at least one QAFT and one control run, got {len(qaft)} and {len(control)}")
    args = {"level": level, "n_resamples": n_resamples, "seed": seed}
    q, c = [1.0 / len(qaft)] * len(qaft), [1.0 / len(control)] * len(control)
    advantage = contrast_interval([gptq, *qaft], token_counts, [1.0, *(-x for x in q)], **args)
    adaptation = contrast_interval([fp32, *control], token_counts, [1.0, *(-x for x in c)], **args)
    remaining = contrast_interval([gptq, *qaft, fp32, *control], token_counts,
                                  [1.0, *(-x for x in q), -1.0, *c], **args)
    return ControlAdjustedGap(fmt, corpus, advantage, adaptation, remaining, len(qaft), len(control))


def control_gaps(runs: Sequence[tuple[str, str, Sequence[float] | np.ndarray]],
                 fp32: Sequence[float] | np.ndarray, token_counts: Sequence[float] | np.ndarray,
                 corpus: str, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> list[ControlAdjustedGap]:
    """:func:`control_adjusted_gap` for every format with a ``gptq``, a ``qaft`` and an ``fp-finetune`` run,
    in the order of each format's first ``qaft`` run.

    Args:
        runs: ``(method, format, per-segment NLL sums)`` of every run evaluated on the same segments of
            ``corpus`` (several seeds of QAFT or of the control are averaged; the first GPTQ run of a format
            is used).
        fp32: the per-segment NLL sums at w0; ``token_counts``: scored tokens per segment.
    """
    gaps = []
    for fmt in dict.fromkeys(f for method, f, _ in runs if method == "qaft"):
        of = {m: [sums for method, f, sums in runs if method == m and f == fmt]
              for m in ("gptq", "qaft", "fp-finetune")}
        if of["gptq"] and of["fp-finetune"]:
            gaps.append(control_adjusted_gap(fmt, corpus, of["gptq"][0], of["qaft"], fp32, of["fp-finetune"],
                                             token_counts, level=level, n_resamples=n_resamples, seed=seed))
    return gaps


# ---------------------------------------------------------------------------------- rank correlation
MIN_PAIRS = 3  # a rank correlation of fewer pairs is not reported


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average rank).
    NaN when either variable is constant."""
    rx = scipy_stats.rankdata(np.asarray(x, dtype=np.float64))
    ry = scipy_stats.rankdata(np.asarray(y, dtype=np.float64))
    return float(pearson_rows(rx[None], ry[None])[0])


def rank_correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, level: float = 0.95,
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     unit: str = "candidates") -> Interval:
    """Spearman correlation of paired values with a percentile-bootstrap interval over the pairs.

    A resample draws ``n`` pairs with replacement and recomputes the rank correlation; resamples in which a
    variable is constant (correlation undefined) are dropped before taking the quantiles.

    Raises:
        StatsError: fewer than 3 pairs, lengths that differ, non-finite values, or a constant variable.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise StatsError(f"x and y must be 1-D of equal length, got shapes {xs.shape} and {ys.shape}")
    if len(xs) < MIN_PAIRS:
        raise StatsError(f"a rank correlation needs at least {MIN_PAIRS} pairs, got {len(xs)}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise StatsError("x and y must be finite")
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        raise StatsError("a rank correlation is undefined when one variable is constant")
    check_interval_settings(level, n_resamples)
    index = np.random.default_rng(seed).integers(0, len(xs), size=(n_resamples, len(xs)))
    boot = pearson_rows(scipy_stats.rankdata(xs[index], axis=1), scipy_stats.rankdata(ys[index], axis=1))
    boot = boot[np.isfinite(boot)]
    low, high = (np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot.size else (math.nan, math.nan))
    return Interval(spearman(xs, ys), float(low), float(high), level, "bootstrap", n_resamples, len(xs), unit)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN where a row is constant)."""
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


# ------------------------------------------------------------------------ over directions and seeds
def quantile_summary(
    values: Sequence[float] | np.ndarray,
    probs: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    unit: str = "directions",
) -> Quantiles:
    """Quantiles of ``values`` (e.g. basin radii over random directions) with min, max and mean."""
    x = _finite_1d(values, "values", minimum=1)
    probs = tuple(float(p) for p in probs)
    if not probs or any(not 0.0 <= p <= 1.0 for p in probs):
        raise StatsError(f"probs must be a non-empty sequence of numbers in [0, 1], got {probs!r}")
    q = np.quantile(x, probs)
    return Quantiles(probs, tuple(float(v) for v in q), len(x), float(x.mean()), float(x.min()),
                     float(x.max()), unit)


def quantile_interval(
    values: Sequence[float] | np.ndarray,
    prob: float = 0.5,
    *,
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    unit: str = "directions",
) -> Interval:
    """Percentile-bootstrap interval of the ``prob`` quantile of ``values`` (default: the median)."""
    x = _finite_1d(values, "values", minimum=2)
    if not 0.0 <= prob <= 1.0:
        raise StatsError(f"prob must be in [0, 1], got {prob!r}")
    _check_settings(level, "percentile", n_resamples)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples)
    chunk = max(1, _RESAMPLE_CHUNK_ELEMENTS // len(x))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        boot[start:start + rows] = np.quantile(x[rng.integers(0, len(x), size=(rows, len(x)))], prob, axis=1)
    low, high = _percentile_bounds(boot, level)
    return Interval(float(np.quantile(x, prob)), low, high, level, "bootstrap", n_resamples, len(x), unit)


def mean_t_interval(values: Sequence[float] | np.ndarray, *, level: float = 0.95,
                    unit: str = "seeds") -> Interval:
    """Mean of independent values (e.g. one NLL per seed) with a Student-t interval,
    ``mean +- t * s / sqrt(n)``."""
    x = _finite_1d(values, "values", minimum=2)
    _check_level(level)
    mean = float(x.mean())
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, level, "t", 0, len(x), unit)


def normal_interval(value: float, stderr: float, *, level: float = 0.95, n_units: int, unit: str) -> Interval:
    """``value +- z * stderr`` (for estimators that state a standard error, e.g. Hutch++ traces)."""
    _check_level(level)
    if not math.isfinite(stderr) or stderr < 0:
        raise StatsError(f"stderr must be finite and >= 0, got {stderr!r}")
    half = float(scipy_stats.norm.ppf(0.5 + level / 2)) * stderr
    return Interval(float(value), value - half, value + half, level, "normal", 0, n_units, unit)


# ------------------------------------------------------------------------------------------ internals
def _ratio(sums: np.ndarray) -> np.ndarray:
    """Token-mean from column sums ``(..., [nll, tokens])``."""
    return sums[..., 0] / sums[..., 1]


def _paired_difference(sums: np.ndarray) -> np.ndarray:
    """``mean_B - mean_A`` from column sums ``(..., [nll_a, nll_b, tokens])``."""
    return (sums[..., 1] - sums[..., 0]) / sums[..., 2]


def _resampled_sums(columns: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Column sums of ``n_resamples`` bootstrap resamples of the rows of ``columns``: ``(n_resamples, p)``.

    A resample draws ``n`` rows with replacement; it is represented by how often each row was drawn.
    """
    n = columns.shape[0]
    out = np.empty((n_resamples, columns.shape[1]))
    chunk = max(1, _RESAMPLE_CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        draws = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        out[start:start + rows] = counts @ columns
    return out


def _bootstrap_of_sums(
    columns: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    level: float,
    method: BootstrapMethod,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """Interval bounds of ``statistic(column sums)`` with rows of ``columns`` as the resampled units."""
    boot = statistic(_resampled_sums(columns, n_resamples, np.random.default_rng(seed)))
    if method == "percentile":
        return _percentile_bounds(boot, level)
    total = columns.sum(axis=0)
    estimate = float(statistic(total[None])[0])
    jackknife = statistic(total[None] - columns)  # leave-one-row-out estimates, (n,)
    return _bca_bounds(boot, estimate, jackknife, level)


def _percentile_bounds(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _bca_bounds(boot: np.ndarray, estimate: float, jackknife: np.ndarray,
                level: float) -> tuple[float, float]:
    """Bias-corrected and accelerated percentile bounds (Efron & Tibshirani 1993, ch. 14.3)."""
    below = (np.sum(boot < estimate) + 0.5 * np.sum(boot == estimate)) / len(boot)
    below = min(max(below, 0.5 / len(boot)), 1 - 0.5 / len(boot))  # keep the bias correction finite
    z0 = scipy_stats.norm.ppf(below)
    spread = jackknife.mean() - jackknife
    denom = 6.0 * np.sum(spread**2) ** 1.5
    acceleration = float(np.sum(spread**3) / denom) if denom > 0 else 0.0
    alpha = 1.0 - level
    z = scipy_stats.norm.ppf([alpha / 2, 1 - alpha / 2])
    adjusted = scipy_stats.norm.cdf(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
    low, high = np.quantile(boot, adjusted)
    return float(low), float(high)


def _segment_arrays(sums, counts, sums_name: str, counts_name: str) -> tuple[np.ndarray, np.ndarray]:
    s = _finite_1d(sums, sums_name, minimum=2)
    c = _finite_1d(counts, counts_name, minimum=2)
    if s.shape != c.shape:
        raise StatsError(f"{sums_name} has {len(s)} entries but {counts_name} has {len(c)}: "
                         f"one of each per segment")
    if np.any(c <= 0):
        raise StatsError(f"{counts_name} must be > 0 for every segment; "
                         f"segment {int(np.argmin(c))} has {c.min()!r}")
    return s, c


def _finite_1d(values, name: str, minimum: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise StatsError(f"{name} must be one-dimensional, got shape {x.shape}")
    if len(x) < minimum:
        raise StatsError(f"{name} needs at least {minimum} entries (one per segment, batch, seed or "
                         f"direction) for an interval, got {len(x)}")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise StatsError(f"{name} contains non-finite values at positions {bad}")
    return x


def _check_level(level: float) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise StatsError(f"level must be a coverage in (0, 1), e.g. 0.95; got {level!r}")


def check_interval_settings(level: float, n_resamples: int) -> None:
    """Raise :class:`StatsError` unless ``level`` is a coverage in (0, 1) and ``n_resamples`` an
    integer >= 100."""
    _check_level(level)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise StatsError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")


def _check_settings(level: float, method: str, n_resamples: int) -> None:
    check_interval_settings(level, n_resamples)
    if method not in BOOTSTRAP_METHODS:
        raise StatsError(f"method must be one of {BOOTSTRAP_METHODS}, got {method!r}")


def _fmt(x: float) -> str:
    """Four significant digits: 2.791, 0.01234, 1.234e-05."""
    return f"{x:.4g}"


def _fmt_alike(value: float, *others: float) -> list[str]:
    """``value`` to four significant digits and ``others`` to the same decimal places (2.885 [2.788, 2.980]);
    scientific notation for magnitudes below 1e-3 or from 1e5."""
    magnitude = abs(value) if value != 0 and math.isfinite(value) else 1.0
    if not 1e-3 <= magnitude < 1e5:
        return [f"{x:.3e}" for x in (value, *others)]
    decimals = max(0, 3 - math.floor(math.log10(magnitude)))
    return [f"{x:.{decimals}f}" for x in (value, *others)]
