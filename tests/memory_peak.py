"""The most bytes torch's CPU allocator held at once while a function ran, from torch's profiler: what CPU tests
use to show that a path never holds a whole vector where another does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def peak_host_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """``fn()`` under torch's profiler, and the most bytes torch's CPU allocator held beyond what it held at the
    start, from every allocation and release the profiler records (an op's net allocation at its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events() if e.name == "[memory]" or e.self_cpu_memory_usage)
    now = peak = 0
    for _, n in deltas:
        now += n
        peak = max(peak, now)
    return peak, out
