"""Peak memory of a piece of work: a known allocation shows up in the peak, and the figure pipeline reports
each step's peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from landscape.memory import MemoryWatch, current_rss_bytes


def test_a_known_allocation_is_the_peak_it_adds():
    size = 300 * 2**20
    with MemoryWatch("cpu") as watch:
        block = torch.ones(size // 4, dtype=torch.float32)  # 300 MiB, touched
        del block
    peak = watch.peak
    assert peak.device is None and peak.rss >= peak.rss_before
    if peak.rss_exact:  # Linux with clear_refs: the peak is this body's alone
        assert 0.9 * size <= peak.rss - peak.rss_before <= 1.5 * size
        with MemoryWatch("cpu") as idle:
            pass
        assert idle.peak.rss - idle.peak.rss_before < 0.2 * size
    assert current_rss_bytes() < peak.rss
    assert "peak RSS" in peak.describe() and json.dumps(peak.to_dict())



def in_fresh_process(script: str, *args: str) -> tuple[bool, list[float]]:
    """Run ``script`` in a new Python process; it prints a flag (``True`` / ``False``) and numbers (MiB)."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", [float(x) for x in out[1:]]


FREE_THEN_RELEASE = """
import torch
from landscape.memory import current_rss_bytes, release_freed_memory
before = current_rss_bytes()
blocks = [torch.ones(2**18) for _ in range(256)]  # 256 x 1 MiB, below glibc's mmap threshold: heap memory
grown = current_rss_bytes()
blocks.reverse()
del blocks
kept = current_rss_bytes()
released = release_freed_memory()
print(released, (grown - before) / 2**20, (kept - before) / 2**20, (current_rss_bytes() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_freed_heap_memory_goes_back_to_the_system_when_released():
    """256 MiB of 1 MiB tensors, freed: whatever glibc keeps of them (a fresh process), release_freed_memory()
    hands back, leaving the RSS within a few MiB of where it started."""
    released, (grown, _, after) = in_fresh_process(FREE_THEN_RELEASE)
    assert grown > 200  # the tensors were resident
    assert released and after < 16


THREADS_THEN_MAIN = """
import sys, threading
import torch
from landscape.memory import current_rss_bytes, share_malloc_arenas
shared = sys.argv[1] == "shared" and share_malloc_arenas()
n_threads, blocks, pins = 8, 512, []  # 64 KiB blocks (glibc heap memory): 32 MiB per thread
together = threading.Barrier(n_threads)
def work():
    together.wait()  # all alive at once: unshared, each takes an arena of its own
    held = [torch.ones(2**14) for _ in range(blocks)]
    pins.append(torch.ones(16))  # kept above the freed blocks: glibc cannot hand those back by itself
    together.wait()
    del held
threads = [threading.Thread(target=work) for _ in range(n_threads)]
for t in threads: t.start()
for t in threads: t.join()
before = current_rss_bytes()
mine = [torch.ones(2**14) for _ in range(n_threads * blocks)]
print(shared, (current_rss_bytes() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_threads_that_share_the_arenas_leave_their_freed_memory_to_the_next_allocation():
    """Eight threads free 256 MiB that glibc keeps: in arenas of their own the main thread cannot reuse it and
    grows by as much; after share_malloc_arenas() it reuses it (GPTQ's one-pass solver runs such threads)."""
    _, (apart,) = in_fresh_process(THREADS_THEN_MAIN, "apart")
    shared, (reused,) = in_fresh_process(THREADS_THEN_MAIN, "shared")
    assert apart > 200
    assert shared and reused < 32


FREED_BETWEEN_LIVE_BLOCKS = """
import contextlib, sys
import torch
from landscape.memory import current_rss_bytes, large_blocks_mapped
big = torch.ones(2**22)  # 16 MiB, mapped: freeing it raises glibc's threshold to 16 MiB
del big
pins = []

def handed_back():
    blocks = []
    for _ in range(512):
        blocks.append(torch.ones(2**16))  # 256 KiB
        pins.append(torch.ones(16))  # a live block above each one
    before = current_rss_bytes()
    del blocks
    return (before - current_rss_bytes()) / 2**20

scope = large_blocks_mapped() if sys.argv[1] == "mapped" else contextlib.nullcontext(False)
with scope as mapped:
    inside = handed_back()
print(mapped, inside, handed_back())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_blocks_freed_between_live_ones_leave_the_process_while_large_blocks_are_mapped():
    """128 MiB of 256 KiB blocks, each below a block that stays: once a 16 MiB block has been freed, glibc
    serves them from its heap and keeps them resident when they are freed; inside large_blocks_mapped() each
    has its own mapping and leaves with its tensor (the blocks a Hessian-vector product frees are like these),
    and after it they come from the heap again."""
    _, (kept, _) = in_fresh_process(FREED_BETWEEN_LIVE_BLOCKS, "heap")
    mapped, (released, kept_after) = in_fresh_process(FREED_BETWEEN_LIVE_BLOCKS, "mapped")
    assert kept < 16
    assert mapped and released > 120
    assert kept_after < 16


def test_a_periodic_release_trims_at_most_once_per_interval(monkeypatch):
    """A training loop calls it after every backward pass: a toy's millisecond passes must not pay a trim
    each, a model whose pass takes seconds gets one after every pass."""
    import landscape.memory as memory

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    rare = memory.PeriodicRelease(interval_s=3600.0)
    assert [rare() for _ in range(5)] == [False] * 5 and calls == []
    every = memory.PeriodicRelease(interval_s=0.0)
    assert [every() for _ in range(3)] == [True] * 3 and len(calls) == 3
