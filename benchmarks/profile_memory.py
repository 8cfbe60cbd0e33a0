"""Where a probe's peak CUDA memory goes: ResNet-18, whole batch and micro-batches, under cuDNN policies.

For each variant, in a fresh process (cuDNN reads its environment once): the peak of one training step, the
peak of a `spectrum` probe (Landscape build + Lanczos), and the largest blocks alive at the probe's peak with
the operator that allocated them, read from the CUDA caching allocator's history.

    python benchmarks/profile_memory.py --out benchmarks/results/profile_memory_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, strict_fp32, train_step_peak  # noqa: E402

import geomprobe as gp  # noqa: E402

VARIANTS = {
    # name: (micro_batch_size, cudnn flags, environment)
    "whole": (None, {}, {}),
    "micro16": (16, {}, {}),
    "micro16_deterministic": (16, {"deterministic": True}, {}),
    "micro16_wscap64": (16, {}, {"CUDNN_CONV_WSCAP_DBG": "64"}),
    "whole_wscap64": (None, {}, {"CUDNN_CONV_WSCAP_DBG": "64"}),
}


def _frame(frames: list[dict]) -> str:
    """The most telling frame of an allocation: the first aten/autograd one, else the first at all."""
    names = [f.get("name", "") for f in frames]
    for n in names:
        if "at::native" in n or "cudnn" in n.lower() or "autograd" in n:
            return n[:160]
    return names[0][:160] if names else "?"


def _live_at_peak(snapshot: dict, top: int = 8) -> list[dict]:
    """Replay the allocator trace; the largest blocks alive at the moment the allocated total peaked."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in snapshot["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _frame(ev.get("frames", [])))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            if ev["action"] == "free_requested":
                total -= live.pop(ev["addr"])[0]
    rows = sorted(at_peak.values(), key=lambda r: -r[0])[:top]
    return [{"mib": s / 2**20, "by": f} for s, f in rows]


def one(name: str) -> dict:
    micro, flags, _ = VARIANTS[name]
    strict_fp32()
    for k, v in flags.items():
        setattr(torch.backends.cudnn, k, v)
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make("resnet18", 128, "cuda", g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_peak = train_step_peak(model, loss_fn, x, y, opt, steps=2)  # the second is the steady one
    kw = {} if micro is None else {"micro_batch_size": micro, "graph_budget_bytes": 1}
    warm = gp.Landscape(model, loss_fn, (x, y), **kw)
    warm.hvp(torch.ones(warm.dim, device="cuda"))
    warm.close()
    del warm
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    land = gp.Landscape(model, loss_fn, (x, y), **kw)
    res = gp.metrics.spectrum(land)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    land.close()
    del land
    torch.cuda.empty_cache()
    # the history of one build and one HVP (where the peak falls), with C++ frames naming the operators
    try:
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="all")
        land = gp.Landscape(model, loss_fn, (x, y), **kw)
        land.hvp(torch.ones(land.dim, device="cuda"))
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        land.close()
        live = _live_at_peak(snap)
    except Exception as e:  # noqa: BLE001 - the figures above stand without the breakdown
        live = [{"error": f"{type(e).__name__}: {e}"[:300]}]
    return {"train_step_peak_mib": step_peak / 2**20, "probe_peak_mib": peak / 2**20, "ratio": peak / step_peak,
            "lambda_max": res["lambda_max"], "hvps": res["hvps"], "live_at_peak": live}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one)))
        return
    out = {"benchmark": "profile_memory", "env": environment("cuda"), "variants": {}}
    for name in a.variants.split(","):
        env = dict(os.environ, **VARIANTS[name][2])
        done = subprocess.run([sys.executable, __file__, "--one", name], env=env, capture_output=True, text=True)
        out["variants"][name] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                                 else {"error": done.stderr[-2000:]})
    dump(out, a.out)


if __name__ == "__main__":
    main()
