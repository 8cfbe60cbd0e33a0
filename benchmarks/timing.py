"""Timing helpers for the benchmarks: warm-up, device synchronization, median of repeats."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import date
from typing import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, device-synchronized."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(device) -> dict:
    d = torch.device(device)
    info = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(d) if d.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    try:
        import geomprobe

        info["geomprobe"] = geomprobe.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def dump(obj: dict, path: str | None) -> None:
    text = json.dumps(obj, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
