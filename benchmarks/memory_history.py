"""What is live on the GPU at a stretch's peak, by where it was allocated (``scale.py --memory-history``).

``torch.cuda.memory._record_memory_history`` traces every allocation and free with its Python stack; replaying the
trace finds the moment of most allocated bytes and the blocks live then, which are grouped by the innermost frames
inside ``geomprobe`` (or the benchmark, else the innermost frame of all). Blocks allocated before the recording
started carry no trace: they are the stretch's starting figure (``start_bytes``), not listed.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

__all__ = ["MemoryHistory"]


def _where(frames: list[dict], depth: int = 3) -> str:
    """The ``depth`` innermost frames of our own code (geomprobe, the benchmarks), as ``file:line name``."""
    ours = [f for f in frames if "geomprobe" in f.get("filename", "") or "benchmarks" in f.get("filename", "")]
    picked = (ours or frames)[:depth]
    return " < ".join(f"{os.path.basename(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '?')}"
                      for f in picked) or "?"


class MemoryHistory:
    """Record the device's allocations inside a ``with`` block; :meth:`summary` replays them to the peak."""

    def __init__(self, device, max_entries: int = 3_000_000, rows: int = 20):
        self.device, self.max_entries, self.rows = torch.device(device), max_entries, rows
        self.snapshot: dict | None = None
        self.start_bytes = 0

    def __enter__(self) -> MemoryHistory:
        torch.cuda.synchronize(self.device)
        self.start_bytes = torch.cuda.memory_allocated(self.device)
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)

    def summary(self) -> dict:
        """The peak above the start, when in the trace it came (event index of all), the live blocks then
        grouped by where they were allocated (bytes, count), largest first, and the highest figure reached right
        after an allocation from each place (``peaks_by_allocation``: the peaks of the phases)."""
        traces = self.snapshot["device_traces"][self.device.index or 0]
        live: dict[int, tuple[int, list]] = {}
        total = peak = 0
        peak_at = -1
        for i, ev in enumerate(traces):
            action = ev.get("action")
            if action == "alloc":
                live[ev["addr"]] = (ev["size"], ev.get("frames", []))
                total += ev["size"]
            elif action == "free_completed" and ev["addr"] in live:
                total -= live.pop(ev["addr"])[0]
            if total > peak:
                peak, peak_at = total, i
        # the most allocated right after an allocation, by where that allocation was made: each phase's own peak
        # (a product's graph, a step's vectors, the Ritz pass), not only the stretch's highest
        local: dict[str, int] = defaultdict(int)
        live.clear()
        total = 0
        for ev in traces:
            if ev.get("action") == "alloc":
                live[ev["addr"]] = (ev["size"], ev.get("frames", []))
                total += ev["size"]
                key = _where(ev.get("frames", []), depth=2)
                local[key] = max(local[key], total)
            elif ev.get("action") == "free_completed" and ev["addr"] in live:
                total -= live.pop(ev["addr"])[0]
        by_phase = sorted(local.items(), key=lambda kv: -kv[1])[:8]
        # the live set at the peak: replay once more up to it
        live.clear()
        for ev in traces[: peak_at + 1]:
            if ev.get("action") == "alloc":
                live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            elif ev.get("action") == "free_completed":
                live.pop(ev["addr"], None)
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for size, frames in live.values():
            g = groups[_where(frames)]
            g[0] += size
            g[1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[: self.rows]
        return {"start_bytes": self.start_bytes, "peak_above_start_bytes": peak, "events": len(traces),
                "peak_event": peak_at,
                "at_peak": [{"where": k, "bytes": v[0], "blocks": v[1]} for k, v in rows],
                "peaks_by_allocation": [{"where": k, "bytes": v} for k, v in by_phase]}
