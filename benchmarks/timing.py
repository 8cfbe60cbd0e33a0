"""Helpers the benchmarks share: warm-up, device synchronization, median of repeats, the common command-line
options, and a training step's peak memory."""

from __future__ import annotations

import argparse
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
        info["transparent_huge_pages"] = geomprobe.linalg.host_blocks.thp_mode()
    except ImportError:  # pragma: no cover
        pass
    return info


def dump(obj: dict, path: str | None) -> None:
    text = json.dumps(obj, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def model_benchmark_parser(doc: str | None, models: str) -> argparse.ArgumentParser:
    """A parser with the options every per-model benchmark takes: device, models, batch, --small, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=models)
    ap.add_argument("--batch", type=int, default=None, help="default: 128 (GPU) / 32 (CPU)")
    ap.add_argument("--small", action="store_true", help="narrower models (CPU smoke runs)")
    ap.add_argument("--out", default=None)
    return ap


def host_kernel_args(doc: str | None, dim: float, repeats: int) -> argparse.Namespace:
    """The options of the host-kernel benchmarks (--dim, --threads, --repeats, --out), parsed, with torch's thread
    count set from --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=float, default=dim)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def train_step_peak(model, loss_fn, x, y, optimizer, steps: int = 1) -> int:
    """Peak CUDA bytes of the last of ``steps`` training steps, above what was allocated before it."""
    peak = 0
    for _ in range(steps):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        peak = torch.cuda.max_memory_allocated() - base
    return peak


def strict_fp32() -> None:
    """TF32 off for matmuls and cuDNN: every figure is strict fp32 unless a benchmark says otherwise."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
