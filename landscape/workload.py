"""How much work a run asks for, estimated before it starts, and the bounds it must stay within.

A scan of ``0:1:100000000000`` or a radius search over a billion directions used to start and run out of
memory (or fill the disk) hours later. Entry points now build a :class:`WorkEstimate` from their settings --
points, forward passes, tokens, memory and store size -- and :meth:`WorkEstimate.check` refuses, before any
file is created, a run above :class:`WorkLimits` (``--max-points``, ``--max-memory``) with the estimate in
the message. The points are checked first, before the model loads; the memory once the model's size is
known. The store's disk space is checked when it is created (:func:`landscape.store.files.check_free_space`).

Estimates are upper bounds of the order of magnitude, not predictions: memory counts the model, the
directions held beside it, one batch's logits and the store's arrays; see :func:`scan_workload`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import psutil

DEFAULT_MAX_POINTS = 1_000_000
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class WorkTooLargeError(ValueError):
    """A run whose estimated work or memory is above its bounds; the message holds the estimate."""


def parse_size(text: str) -> int:
    """``16G``, ``500MB``, ``1.5GiB`` or a number of bytes -> bytes (decimal units; ``KiB``... binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or not float(match.group(1)) > 0:
        raise ValueError(f"a memory size must be a positive number with an optional unit (B, K/KB, M/MB, "
                         f"G/GB, T/TB, KiB, MiB, GiB, TiB), e.g. 16G; got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    """``3.2 GB`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


@dataclass(frozen=True)
class WorkLimits:
    """Bounds a run must stay within.

    Attributes:
        max_points: most points (grid points, directions x radii...) one run may evaluate.
        max_memory: most bytes its estimate may need; None: the memory available when it is checked.
    """

    max_points: int = DEFAULT_MAX_POINTS
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_points, int) or isinstance(self.max_points, bool) or self.max_points < 1:
            raise ValueError(f"max_points must be an integer >= 1, got {self.max_points!r}")
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory < 1):
            raise ValueError(f"max_memory must be a positive number of bytes or None, "
                             f"got {self.max_memory!r}")

    def memory_bound(self) -> tuple[int, str]:
        """The memory bound in bytes and where it comes from."""
        if self.max_memory is not None:
            return self.max_memory, "--max-memory"
        return int(psutil.virtual_memory().available), "the memory available now"

    def check_points(self, what: str, points: int) -> None:
        """Refuse more than ``max_points`` points (grid points, directions, Hessian-vector products, optimiser
        steps: ``what`` says which) before anything is loaded."""
        if points > self.max_points:
            raise WorkTooLargeError(
                f"{what} asks for {points:,} points, more than --max-points {self.max_points:,}: choose "
                f"fewer, or raise --max-points if you mean it")


@dataclass(frozen=True)
class WorkEstimate:
    """What a run will do: its points, forward passes, tokens scored, peak memory and store size (bytes)."""

    what: str
    points: int
    forward_passes: int
    tokens: int
    memory_bytes: int
    store_bytes: int
    advice: str = "choose fewer points or directions, a smaller batch, --low-memory"

    def describe(self) -> str:
        work = f", {self.forward_passes:,} forward passes over {self.tokens:,} tokens" if self.tokens else ""
        store = f" and a {human_bytes(self.store_bytes)} store" if self.store_bytes else ""
        points = f"{self.points:,} point{'s' * (self.points != 1)}"
        return f"{self.what}: {points}{work}, about {human_bytes(self.memory_bytes)} of memory{store}"

    def check(self, limits: WorkLimits) -> None:
        """Raise :class:`WorkTooLargeError` (with this estimate) above ``limits``."""
        limits.check_points(self.what, self.points)
        bound, source = limits.memory_bound()
        if self.memory_bytes > bound:
            raise WorkTooLargeError(f"{self.describe()}: the memory is more than {human_bytes(bound)} "
                                    f"({source}): {self.advice}, or set --max-memory if you mean it")


def held_workload(what: str, points: int, model_bytes: int, weight_bytes: int, copies: float,
                  advice: str) -> WorkEstimate:
    """The estimate of a command whose memory is the model and ``copies`` float32 copies of the weights it
    works on (``weight_bytes`` each): a spectrum's Krylov basis and Hessian-vector products, a comparison's
    results and directions, a quantization method's state. ``points``: its products, points or steps;
    ``advice``: what would need less."""
    return WorkEstimate(what, points, points, 0, int(model_bytes + copies * weight_bytes), 0, advice)


def scan_workload(what: str, points: int, directions: int, model_bytes: int, direction_bytes: int,
                  segments: int, seq_len: int, batch_size: int, vocab: int, bytes_per_point: int,
                  streamed: bool = False, evaluations_per_point: int = 1) -> WorkEstimate:
    """The estimate of a scan or radius search.

    Why so many parameters: each is one independent size of the run (what is held in memory, how many tokens
    each point reads, how large a point's record is), and a caller knows them from different places (the
    settings, the loaded model, the data).

    Memory: the model, ``directions`` direction tensors of ``direction_bytes`` each (one layer's worth when
    ``streamed``), one batch's float32 logits three times over (logits, log-softmax, a temporary), and the
    store's arrays twice (written, then read back whole).
    """
    batches = math.ceil(segments / batch_size)
    held = (0 if streamed else directions * direction_bytes)
    logits = 3 * 4 * min(batch_size, segments) * seq_len * vocab
    memory = model_bytes + held + logits + 2 * points * bytes_per_point
    return WorkEstimate(what, points, points * evaluations_per_point * batches,
                        points * evaluations_per_point * segments * seq_len, memory, points * bytes_per_point)
