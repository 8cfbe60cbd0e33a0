"""What a memory plan reads before it plans: the host's available RAM, a device's free and allocated memory, and
the training step's peak (:mod:`.memory_plan` turns them into a budget). No planning here, and the only change
made to torch's counters is :func:`read_training_peak`'s reset."""

from __future__ import annotations

import os

import torch

from ..linalg.host_blocks import kept_bytes
from ..linalg.pinned_memory import pool_stats

__all__ = ["device_memory", "host_available_bytes", "read_training_peak"]


def host_available_bytes() -> int | None:
    """RAM the host can still give (``MemAvailable`` of /proc/meminfo, else free pages), counting the blocks this
    process keeps for reuse (:mod:`~geomprobe.linalg.pinned_memory`'s page-locked pool and the basis mappings
    :func:`~geomprobe.linalg.host_blocks.keep_released` keeps): the next probe's blocks come from there first, and
    without them a later probe would plan as if the first one's rows were still held. None if unknown."""
    free = _os_available_bytes()
    return None if free is None else free + pool_stats()["pooled_bytes"] + kept_bytes()


def _os_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device: torch.device | str) -> tuple[int | None, int]:
    """``(available, allocated)`` bytes on ``device``: on CUDA the free memory plus what torch's allocator
    holds cached but unused, and what tensors hold now; on the CPU the host's available RAM and 0 (what the
    process holds is already outside the available figure). ``available`` is None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        cached = torch.cuda.memory_reserved(device) - allocated
        return int(free + max(cached, 0)), int(allocated)
    if device.type == "cpu":
        return host_available_bytes(), 0
    return None, 0


def read_training_peak(device: torch.device | str) -> int | None:
    """The peak of allocated memory on ``device`` since the last reset, and a reset, so that the next
    interval measures training alone (CUDA; None elsewhere). The only change made to torch's counters."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = int(torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
    return peak
