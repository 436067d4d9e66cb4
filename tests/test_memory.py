"""Peak memory of a piece of work: a known allocation shows up in the peak, and the figure pipeline reports
each step's peak."""

from __future__ import annotations

import json

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

