"""Peak memory of a piece of work: the process's resident set (Linux) and, on an accelerator, its allocator.

:class:`MemoryWatch` brackets the work::

    with MemoryWatch(device) as watch:
        run_step()
    print(watch.peak.describe())          # "peak RSS 3.21 GB (+1.10 GB), cuda 2.05 GB"

The RSS peak since the watch started is exact where the kernel lets a process reset its high-water mark
(``/proc/self/clear_refs``, Linux); elsewhere it is the peak over the process's life and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

GB = 1e9


def current_rss_bytes() -> int:
    """Resident set size of this process now (bytes), from ``/proc/self/status`` (Linux)."""
    return _proc_status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux ``clear_refs`` 5).

    Returns False where the kernel does not allow it; :func:`peak_rss_bytes` then reports the peak over the
    process's whole life (``resource.getrusage``), which includes everything before the reset.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size (bytes) since the last :func:`reset_peak_rss` (Linux ``VmHWM``), else since
    start."""
    try:
        return _proc_status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def release_freed_memory() -> bool:
    """Hand the memory the C allocator keeps after tensors are freed back to the system (glibc's
    ``malloc_trim(0)``); returns False where the C library is not glibc (nothing happens).

    glibc keeps freed heap memory for later allocations: after SmolLM2's QAFT has returned and its tensors are
    freed, the process still holds 3.37 GB against 1.01 GB before it; this call brings it back to 1.01 GB in
    milliseconds. Call it between large pieces of work (each step of a figure run, each variant of a
    quantization table, each task of a curvature store) and, through :class:`PeriodicRelease`, after the
    backward passes of a training loop, so one piece's peak is not the next one's floor (SmolLM2's QAFT, 4 x
    256 tokens: 3.67 GB against 3.89, at no measurable cost in time).
    """
    trim = _glibc("malloc_trim")
    return bool(trim(0)) if trim is not None else False


def share_malloc_arenas() -> bool:
    """Let every thread created from now on allocate from the C allocator's existing arenas (glibc's
    ``mallopt(M_ARENA_MAX)`` set to one) instead of a new arena per thread; returns False where the C library
    is not glibc (nothing happens). Process-wide and permanent: arenas that exist are kept.

    glibc gives each new thread its own arena, up to eight per core, and a freed block stays in its thread's
    arena. GPTQ's one-pass solver (:func:`landscape.quant.capture.solve_in_one_pass`) runs one thread per
    calibration batch, each paused inside the block's forward pass: on SmolLM2 with 128 x 256 calibration
    tokens (16 threads) GPTQ peaked at 4.59 GB with an arena per thread and 3.42 GB with one shared arena, in
    no more time (277 s against 339 s on shared cores; ``MALLOC_ARENA_MAX=1`` in the environment).
    """
    mallopt = _glibc("mallopt")
    return bool(mallopt(_M_ARENA_MAX, 1)) if mallopt is not None else False


@contextlib.contextmanager
def large_blocks_mapped(threshold_bytes: int = 64 * 1024) -> Iterator[bool]:
    """While inside, the C allocator serves every block of ``threshold_bytes`` or more from a mapping of its
    own, handed back to the system when the block is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``); yields
    False where the C library is not glibc (nothing happens). Process-wide while inside; nested uses share the
    outermost one's setting.

    glibc starts at 128 KiB but raises its threshold to the size of each mapped block that is freed, up to 32
    MiB: after the first large tensor of a run is freed, every activation below that size comes from the heap,
    where a freed block stays resident as long as a live block sits above it. A Hessian-vector product over
    1 x 128 tokens of SmolLM2 frees hundreds of such blocks (0.3-0.8 MiB) between the ones its graph keeps:
    it added 1.64 GB to the process with glibc's threshold, 1.02 GB inside (the same product, about 10 % more
    time: a mapping and first-touch page faults per block). Not for training loops: QAFT's steps took 2.6
    times as long inside (the kernel's time for mapping and zeroing every activation of every pass).

    glibc maps a block only when no free space of its heap fits it: in a process whose heap has free space
    left by earlier work (a figure run's later steps), blocks that fit it still come from the heap and stay
    resident once freed, so long work inside also calls :func:`release_freed_memory` now and then (the Hessian
    operator after each batch of a product).

    On leaving, the threshold is set to 32 MiB, the ceiling glibc's own rule reaches once a large tensor has
    been freed (any model load does), and stays fixed there: blocks below it come from the heap again.
    """
    global _mapping_depth
    mallopt = _glibc("mallopt")
    if mallopt is None:
        yield False
        return
    if _mapping_depth == 0:
        mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))
    _mapping_depth += 1
    try:
        yield True
    finally:
        _mapping_depth -= 1
        if _mapping_depth == 0:
            mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_CEILING)


class PeriodicRelease:
    """:func:`release_freed_memory` at most once per ``interval_s`` seconds of the work that calls it: after
    every backward pass of a model whose pass takes a second or more (SmolLM2's QAFT), rarely on a toy whose
    pass takes milliseconds, where a trim (about 1 ms) and touching the returned pages again would cost more
    than the memory is worth."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last = time.perf_counter()

    def __call__(self) -> bool:
        now = time.perf_counter()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        return release_freed_memory()


_M_ARENA_MAX = -8  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_CEILING = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_mapping_depth = 0  # nested large_blocks_mapped() calls


@functools.cache
def _glibc(function: str):
    """glibc's ``function`` (looked up once), or ``None`` where the C library is not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/self/status")


@dataclass(frozen=True)
class MemoryPeak:
    """Peaks of one piece of work (bytes).

    Attributes:
        rss: peak resident set size of the process while the work ran.
        rss_before: resident set size when it started (``rss - rss_before`` is what the work added).
        rss_exact: False where the peak could not be reset and is the process's lifetime peak.
        device: peak bytes allocated on the accelerator (``None`` on the CPU).
    """

    rss: int
    rss_before: int
    rss_exact: bool
    device: int | None = None

    def to_dict(self) -> dict[str, float | bool | None]:
        device = None if self.device is None else self.device / GB
        return {"peak_rss_gb": self.rss / GB, "rss_before_gb": self.rss_before / GB,
                "rss_exact": self.rss_exact, "peak_device_gb": device}

    def describe(self) -> str:
        text = (f"peak RSS {self.rss / GB:.2f} GB (+{(self.rss - self.rss_before) / GB:.2f} GB)"
                f"{'' if self.rss_exact else ' (lifetime peak: this kernel cannot reset it)'}")
        return text if self.device is None else f"{text}, device {self.device / GB:.2f} GB"


class MemoryWatch:
    """Context manager measuring the :class:`MemoryPeak` of its body (``.peak`` once it has exited)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.peak: MemoryPeak | None = None

    def _on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> MemoryWatch:
        self._before = current_rss_bytes()
        self._exact = reset_peak_rss()
        if self._on_cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        device = torch.cuda.max_memory_allocated(self.device) if self._on_cuda() else None
        self.peak = MemoryPeak(peak_rss_bytes(), self._before, self._exact, device)
