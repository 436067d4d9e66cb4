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


ALLOCATE_AND_FREE = """
import sys
import torch
from landscape.memory import current_rss_bytes, return_large_blocks
if sys.argv[1] == "fixed":
    assert return_large_blocks()
big = torch.ones(4 * 2**20); del big  # 16 MiB, freed: glibc raises its dynamic threshold past 8 MiB
before = current_rss_bytes()
block = torch.ones(2 * 2**20); during = current_rss_bytes(); del block  # 8 MiB
print((during - before) / 2**20, (current_rss_bytes() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_with_a_fixed_threshold_a_freed_large_block_leaves_the_rss():
    """glibc (2.36 here) keeps an 8 MiB block in its heap once a 16 MiB one was freed, so RSS stays 8 MiB
    up; after return_large_blocks() the freed block leaves the resident set at once (a fresh process)."""
    out = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, "fixed"], capture_output=True, text=True,
                         check=True).stdout.split()
    during, after = float(out[0]), float(out[1])
    assert during > 7 and after < 1  # resident while it lived, gone once freed
