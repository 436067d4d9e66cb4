"""How curvature measurements converge with the tokens they are taken on (issue 22, item 1).

A Hessian measured on a few hundred tokens is a sample Hessian, not the Hessian of the held-out NLL. A
convergence sweep takes each quantity at several token budgets; at each budget it is measured on
``replicates`` *disjoint* groups of held-out windows, so the spread between replicates is what one measurement
at that budget would see, and their mean (with a Student-t interval) shows the drift with the budget.

* :class:`Budgets`: the budgets (windows per replicate) and which windows each replicate uses.
* :func:`group_estimates`: an additive quantity (``u^T H u``, ``g^T u``: sums over segments divided by scored
  tokens) at every budget and replicate from one pass of per-segment sums over all the windows.
* :func:`converge`: a quantity's values per budget -> :class:`Convergence` (mean and interval per budget, the
  largest single-replicate deviation from the reference, the smallest budget stable to a tolerance).
* :func:`flattest_share`: in what share of replicates each direction is the flattest.
* :class:`SweepSettings`, :func:`sweep_tasks`, :func:`report`: the sweep itself as resumable store tasks (for
  :func:`landscape.store.run_tasks`) and its report (``python -m analyses.curvature_convergence``,
  ``landscape spectrum --budgets``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from landscape.curvature import Curvature, DirectionalCurvature, Spectrum, TraceEstimate
from landscape.data import TokenSet
from landscape.engine.directions import displacement_direction, random_direction_of_length
from landscape.stats import Interval, mean_t_interval
from landscape.store import StoreData, StoreRecord

DEFAULT_TOLERANCE = 0.10  # "stable to 10 %"


class ConvergenceError(ValueError):
    """A convergence sweep that cannot be served: bad budgets, replicates or too little held-out text."""


@dataclass(frozen=True)
class Budgets:
    """Token budgets of a convergence sweep.

    At budget ``i`` a replicate is ``segments[i]`` consecutive held-out windows of ``seq_len`` tokens, and the
    ``replicates[i]`` replicates are disjoint: replicate ``r`` uses windows ``r * segments[i]`` up to
    ``(r + 1) * segments[i]``. Replicates of different budgets share windows (the sweep needs
    ``max(segments * replicates)`` windows, not their sum).
    """

    seq_len: int
    segments: tuple[int, ...]
    replicates: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConvergenceError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.segments or len(self.segments) != len(self.replicates):
            raise ConvergenceError(f"one replicate count per budget: {len(self.segments)} budgets, "
                                   f"{len(self.replicates)} replicate counts")
        if any(s < 1 for s in self.segments) or list(self.segments) != sorted(set(self.segments)):
            raise ConvergenceError(f"budgets must be distinct, increasing and >= 1 window each, got "
                                   f"{list(self.segments)} windows")
        if any(r < 1 for r in self.replicates):
            raise ConvergenceError(f"replicates must be >= 1, got {list(self.replicates)}")

    @classmethod
    def from_tokens(cls, tokens: Sequence[int], seq_len: int, replicates: Sequence[int],
                    available: int | None = None) -> Budgets:
        """Budgets given in tokens (each a multiple of ``seq_len``), with one replicate count for all budgets
        or one per budget; ``available``: held-out windows there are (checked)."""
        bad = [t for t in tokens if t < seq_len or t % seq_len]
        if bad:
            raise ConvergenceError(f"token budgets must be positive multiples of seq_len={seq_len}, "
                                   f"got {bad}")
        reps = tuple(replicates) * len(tokens) if len(replicates) == 1 else tuple(replicates)
        budgets = cls(seq_len, tuple(t // seq_len for t in tokens), reps)
        if available is not None and budgets.n_windows > available:
            worst = max(range(len(reps)), key=lambda i: budgets.segments[i] * reps[i])
            raise ConvergenceError(
                f"{reps[worst]} disjoint replicates of {budgets.tokens(worst)} tokens need "
                f"{budgets.n_windows} windows of {seq_len} tokens; the held-out text has {available}: "
                f"lower the largest budget or its replicates")
        return budgets

    @property
    def n_windows(self) -> int:
        """Windows the sweep reads (the first ``n_windows`` of the held-out set)."""
        return max(s * r for s, r in zip(self.segments, self.replicates))

    def tokens(self, i: int) -> int:
        """Tokens of one replicate at budget ``i`` (``segments * seq_len``; each window's first is not
        scored)."""
        return self.segments[i] * self.seq_len

    def groups(self, i: int) -> list[range]:
        """The windows of each replicate at budget ``i`` (disjoint ranges)."""
        s = self.segments[i]
        return [range(r * s, (r + 1) * s) for r in range(self.replicates[i])]

    def labels(self) -> list[str]:
        """One label per budget: ``"1,024 (8 x 128)"``."""
        return [f"{self.tokens(i):,} ({s} x {self.seq_len})" for i, s in enumerate(self.segments)]


def group_estimates(unit_sums: np.ndarray, unit_tokens: np.ndarray, budgets: Budgets) -> list[np.ndarray]:
    """An additive per-token quantity at every budget and replicate,
    ``sum(unit_sums[g]) / sum(unit_tokens[g])`` over each replicate's windows ``g``, from per-window sums
    over (at least) the sweep's first windows.

    Returns one ``(replicates,)`` array per budget.
    """
    sums, counts = np.asarray(unit_sums, dtype=np.float64), np.asarray(unit_tokens, dtype=np.float64)
    if sums.shape != counts.shape or sums.ndim != 1:
        raise ConvergenceError(f"unit_sums and unit_tokens must be 1-D of one length, got {sums.shape} and "
                               f"{counts.shape}")
    if len(sums) < budgets.n_windows:
        raise ConvergenceError(f"{len(sums)} per-window sums, the sweep needs {budgets.n_windows}")
    return [np.array([sums[list(g)].sum() / counts[list(g)].sum() for g in budgets.groups(i)])
            for i in range(len(budgets.segments))]


@dataclass(frozen=True)
class BudgetSummary:
    """One quantity at one budget.

    Attributes:
        values: the replicates' values; ``interval``: their mean with a Student-t interval (``None`` with one
            replicate).
        deviation: the largest ``|value - reference| / |reference|`` of a single replicate (what one
            measurement at this budget can be off by, as far as the replicates show).
    """

    tokens: int
    values: np.ndarray
    interval: Interval | None
    deviation: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def spread(self) -> float:
        """Relative standard deviation between replicates (NaN with one)."""
        return float(np.std(self.values, ddof=1) / abs(self.mean)) if len(self.values) > 1 else float("nan")


@dataclass(frozen=True)
class Convergence:
    """A quantity across the budgets of a sweep.

    Attributes:
        reference: the mean at the largest budget (the best estimate the sweep has).
        stable_from: index of the smallest budget from which on *every* replicate (at it and at every larger
            budget) is within ``tolerance`` of the reference; ``None`` when even the largest budget's
            replicates are not (the sweep is too small to say).
    """

    name: str
    budgets: tuple[BudgetSummary, ...]
    reference: float
    tolerance: float
    stable_from: int | None

    @property
    def stable_tokens(self) -> int | None:
        return None if self.stable_from is None else self.budgets[self.stable_from].tokens


def converge(name: str, values: Sequence[Sequence[float]], budgets: Budgets, *,
             tolerance: float = DEFAULT_TOLERANCE, level: float = 0.95) -> Convergence:
    """Summarise a quantity's replicate values per budget (``values[i]``: the replicates of budget ``i``)."""
    if len(values) != len(budgets.segments):
        raise ConvergenceError(f"{name}: {len(values)} budgets of values, the sweep has "
                               f"{len(budgets.segments)}")
    if not 0 < tolerance < 1:
        raise ConvergenceError(f"tolerance must be in (0, 1), got {tolerance}")
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    for i, a in enumerate(arrays):
        if a.shape != (budgets.replicates[i],) or not np.isfinite(a).all():
            raise ConvergenceError(f"{name}: budget {budgets.labels()[i]} needs {budgets.replicates[i]} "
                                   f"finite values, got {a.tolist()}")
    reference = float(arrays[-1].mean())
    scale = abs(reference) if reference != 0 else 1.0
    summaries = tuple(
        BudgetSummary(budgets.tokens(i), a,
                      mean_t_interval(a, level=level, unit="disjoint replicates") if len(a) > 1 else None,
                      float(np.max(np.abs(a - reference)) / scale))
        for i, a in enumerate(arrays))
    stable_from = None
    for i in reversed(range(len(summaries))):
        if summaries[i].deviation > tolerance:
            break
        stable_from = i
    return Convergence(name, summaries, reference, tolerance, stable_from)


def flattest_share(curvatures: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Share of replicates in which each direction has the smallest ``u^T H u`` (``curvatures``: direction ->
    its value in each replicate, all the same replicates)."""
    names = list(curvatures)
    table = np.array([np.asarray(curvatures[n], dtype=np.float64) for n in names])  # (directions, replicates)
    if table.ndim != 2 or table.shape[1] == 0:
        raise ConvergenceError(f"every direction needs the same, non-zero number of replicates, got "
                               f"{[len(curvatures[n]) for n in names]}")
    winners = table.argmin(axis=0)
    return {n: float(np.mean(winners == k)) for k, n in enumerate(names)}


def markdown(rows: Sequence[Convergence], budgets: Budgets) -> str:
    """A table: one row per quantity, one column per budget (mean [interval], largest single deviation), and
    the budget each quantity is stable from."""
    head = ["quantity", *(f"{label}: mean [95 %], max dev" for label in budgets.labels()),
            f"stable to {rows[0].tolerance:.0%} from" if rows else "stable from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for s in row.budgets:
            body = (f"{s.mean:.4g} [{s.interval.low:.4g}, {s.interval.high:.4g}]" if s.interval is not None
                    else f"{s.mean:.4g}")
            cells.append(f"{body} (n={len(s.values)}), {s.deviation:.0%}")
        if row.stable_from is None:
            stable = "not within the sweep"
        elif row.stable_from == len(row.budgets) - 1 and len(row.budgets) > 1:
            # only the largest budget's replicates agree: say how far its mean moved from the budget before
            drift = abs(row.budgets[-1].mean - row.budgets[-2].mean) / abs(row.reference or 1.0)
            stable = f"{row.stable_tokens:,} tokens only (the mean moved {drift:.0%} from the budget before)"
        else:
            stable = f"{row.stable_tokens:,} tokens"
        lines.append("| " + " | ".join([row.name, *cells, stable]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class SweepSettings:
    """What a convergence sweep measures at every budget and replicate.

    Attributes:
        k_top: top Hessian eigenvalues per replicate (0: no spectrum); lanczos_steps: products per Lanczos
            run.
        trace_matvecs: Hutch++ products per replicate (0: no trace); seed: of the Lanczos start and the probes
            (the same at every budget).
        directions: name -> a saved quantization result (path without suffix) whose displacement's
            ``u^T H u`` and ``g^T u`` are measured per window; random: random filter-normalised directions
            ``random0``, ``random1``, ...
        tolerance: the relative deviation a budget must stay within to count as stable.
    """

    k_top: int = 3
    lanczos_steps: int = 10
    trace_matvecs: int = 6
    seed: int = 0
    directions: tuple[tuple[str, str], ...] = ()
    random: int = 0
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if self.k_top < 0 or self.trace_matvecs < 0 or self.random < 0:
            raise ConvergenceError(f"k_top, trace_matvecs and random must be >= 0, got {self.k_top}, "
                                   f"{self.trace_matvecs}, {self.random}")
        if 0 < self.trace_matvecs < 6:
            raise ConvergenceError(f"trace_matvecs must be 0 or >= 6 (Hutch++), got {self.trace_matvecs}")
        if self.k_top and self.lanczos_steps < 2 * self.k_top:
            raise ConvergenceError(f"lanczos_steps must be >= 2 x k_top = {2 * self.k_top}, got "
                                   f"{self.lanczos_steps}")
        names = [n for n, _ in self.directions]
        if len(set(names)) != len(names) or any(n.startswith("random") for n in names):
            raise ConvergenceError(f"direction names must be distinct and not start with 'random', "
                                   f"got {names}")
        if not 0 < self.tolerance < 1:
            raise ConvergenceError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if not (self.k_top or self.trace_matvecs or self.directions or self.random):
            raise ConvergenceError("nothing to measure: no spectrum, trace, direction or random direction")

    @property
    def direction_names(self) -> list[str]:
        return [n for n, _ in self.directions] + [f"random{s}" for s in range(self.random)]


def task_names(budgets: Budgets, settings: SweepSettings) -> list[str]:
    """The sweep's store tasks in order (a fanned-out run counts them before loading anything)."""
    names = []
    for i in range(len(budgets.segments)):
        for r in range(budgets.replicates[i]):
            names += [f"spectrum/{budgets.tokens(i)}/{r}"] if settings.k_top else []
            names += [f"trace/{budgets.tokens(i)}/{r}"] if settings.trace_matvecs else []
    for name in settings.direction_names:
        names += [f"curvature/{name}", f"slope/{name}"]
    return names


def sweep_tasks(model: nn.Module, windows: TokenSet, budgets: Budgets, settings: SweepSettings, *,
                progress: bool = True) -> dict[str, Callable[[], StoreRecord]]:
    """The sweep's tasks (for :func:`landscape.store.run_tasks`) on the first ``budgets.n_windows`` of
    ``windows`` (held-out windows of ``budgets.seq_len`` tokens). Nothing is computed until a task runs."""
    if windows.seq_len != budgets.seq_len or windows.n_segments < budgets.n_windows:
        raise ConvergenceError(f"the sweep needs {budgets.n_windows} windows of {budgets.seq_len} tokens, "
                               f"got {windows.n_segments} of {windows.seq_len}")
    data = windows.subset(slice(0, budgets.n_windows))

    def on(group: range) -> Curvature:
        return Curvature(model, data.subset(list(group)), batch_size=1, progress=progress)

    tasks: dict[str, Callable[[], StoreRecord]] = {}
    for i in range(len(budgets.segments)):
        for r, group in enumerate(budgets.groups(i)):
            key = f"{budgets.tokens(i)}/{r}"
            if settings.k_top:
                tasks[f"spectrum/{key}"] = lambda g=group: on(g).spectrum(
                    settings.k_top, 0, lanczos_steps=settings.lanczos_steps, seed=settings.seed,
                    return_eigenvectors=False).to_record(include_eigenvectors=False)
            if settings.trace_matvecs:
                tasks[f"trace/{key}"] = lambda g=group: on(g).trace(settings.trace_matvecs,
                                                                    seed=settings.seed).to_record()
    sources, whole = dict(settings.directions), range(budgets.n_windows)

    def direction(name: str):  # built when its task runs (a finished task loads nothing), layer by layer
        if name in sources:
            return displacement_direction(model, sources[name], streamed=True)
        return random_direction_of_length(model, int(name.removeprefix("random")), 1.0)

    for name in settings.direction_names:
        tasks[f"curvature/{name}"] = lambda n=name: on(whole).rayleigh_quotient(direction(n)).to_record()
        tasks[f"slope/{name}"] = lambda n=name: on(whole).slope(direction(n)).to_record()
    assert list(tasks) == task_names(budgets, settings)
    return tasks


def sweep_rows(store: StoreData, budgets: Budgets,
               settings: SweepSettings) -> tuple[list[Convergence], dict[str, list[np.ndarray]]]:
    """Every quantity of a finished sweep store as a :class:`Convergence`, and each direction's ``u^T H u``
    per budget and replicate (for :func:`flattest_share`)."""
    rows: list[Convergence] = []
    index = range(len(budgets.segments))

    def per_budget(task: str, read: Callable[[str], float]) -> list[list[float]]:
        return [[read(f"{task}/{budgets.tokens(i)}/{r}") for r in range(budgets.replicates[i])]
                for i in index]

    for j in range(settings.k_top):
        rows.append(converge(f"lambda_{j + 1}", per_budget(
            "spectrum", lambda t, j=j: float(Spectrum.from_data(store, t).top.eigenvalues[j])), budgets,
            tolerance=settings.tolerance))
    if settings.trace_matvecs:
        rows.append(converge("trace (Hutch++)", per_budget(
            "trace", lambda t: TraceEstimate.from_data(store, t).value), budgets,
            tolerance=settings.tolerance))
    curvatures = {}
    for name in settings.direction_names:
        for kind, symbol in (("curvature", "u^T H u"), ("slope", "g^T u")):
            estimate = DirectionalCurvature.from_data(store, f"{kind}/{name}")
            values = group_estimates(estimate.unit_sums, estimate.unit_tokens, budgets)
            rows.append(converge(f"{symbol}, {name}", values, budgets, tolerance=settings.tolerance))
            if kind == "curvature":
                curvatures[name] = values
    return rows, curvatures


def report(store: StoreData, budgets: Budgets, settings: SweepSettings) -> str:
    """A finished sweep as Markdown: the convergence table, its conventions, the flattest-direction shares."""
    rows, curvatures = sweep_rows(store, budgets, settings)
    corpus = store.provenance.get("nll_convention", {}).get("corpus", "?")
    lines = [markdown(rows, budgets), "",
             f"Held-out {corpus} windows of {budgets.seq_len} tokens (token-mean NLL; each window's first "
             f"token unscored); replicates of a budget are disjoint; intervals: Student t over replicates; "
             f"'max dev': the largest |replicate - reference| / |reference|, reference = the largest "
             f"budget's mean; curvature in nats/token per squared weight unit, slope per weight unit."]
    if len(curvatures) > 1:
        lines += ["", "Share of replicates in which each direction has the smallest u^T H u:"]
        for i, label in enumerate(budgets.labels()):
            shares = flattest_share({n: v[i] for n, v in curvatures.items()})
            lines.append(f"- {label}: " + ", ".join(f"{n} {s:.0%}" for n, s in shares.items()))
    return "\n".join(lines)
