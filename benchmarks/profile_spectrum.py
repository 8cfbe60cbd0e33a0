"""Where a spectrum probe's time outside its HVPs goes (issue 16's 10 % target), on one model.

Times, device-synchronized, every part of a ``spectrum`` run on a Landscape built once: the HVPs, the rest of
each Krylov step (three-term step, Gram-Schmidt against the stored basis, the packed host transfer), the Ritz
computation of each step (the tridiagonal eigenproblem and the stopping test), the start vector, and what is
left (Ritz vectors, the result). Then a torch.profiler table of the same run by self time on the host and on
the device. One JSON document on stdout and in ``--out``.

    python benchmarks/profile_spectrum.py --model gpt2-124m --dtype bf16 --out p.json       # an H200
    python benchmarks/profile_spectrum.py --model gpt2-tiny --dtype fp32 --device cpu       # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib

from scale import DTYPES, build, lm_loss, token_batches
from timing import environment, strict_fp32, sync

from geomprobe.engine.landscape import Landscape
from geomprobe.metrics.spectrum import spectrum

# the module, not the function of the same name that geomprobe.linalg exports
lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


class Parts:
    """Wraps module-level functions with device-synchronized timers, so a part's seconds are its own."""

    def __init__(self, device):
        self.device, self.seconds, self.calls, self._undo = device, {}, {}, []

    def wrap(self, owner, name: str, label: str) -> None:
        orig = getattr(owner, name)

        def timed(*a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            out = orig(*a, **k)
            sync(self.device)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
            self.calls[label] = self.calls.get(label, 0) + 1
            return out

        setattr(owner, name, timed)
        self._undo.append((owner, name, orig))

    def restore(self) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    strict_fp32()
    device = torch.device(args.device)
    model, vocab, b, t = build(args.model, DTYPES[args.dtype], device)
    batch = token_batches(vocab, b, t, 1, device, seed=1)[0]
    land = Landscape(model, lm_loss, [batch], mode="eval")
    spectrum(land, tol=args.tol, seed=0)  # warm-up: kernels, allocator
    parts = Parts(device)
    parts.wrap(Landscape, "hvp", "hvp")
    parts.wrap(lanczos_module, "krylov_step", "krylov_step (hvp included)")
    parts.wrap(lanczos_module, "ritz_pairs", "ritz_pairs")
    parts.wrap(lanczos_module, "extremes_converged", "stopping test")
    parts.wrap(lanczos_module, "start_vector", "start vector")
    sync(device)
    t0 = time.perf_counter()
    out = spectrum(land, tol=args.tol, seed=1)
    sync(device)
    total = time.perf_counter() - t0
    parts.restore()
    s = parts.seconds
    hvp = s.get("hvp", 0.0)
    step_rest = s.get("krylov_step (hvp included)", 0.0) - hvp
    known = hvp + step_rest + s.get("ritz_pairs", 0.0) + s.get("stopping test", 0.0) + s.get("start vector", 0.0)
    doc = {
        "environment": environment(args.device), "args": vars(args), "params": land.dim,
        "spectrum": {k: out.get(k) for k in ("lambda_max", "lambda_min", "converged", "hvps", "steps")},
        "seconds": total, "hvp_seconds": hvp, "outside_seconds": total - hvp,
        "outside_share": (total - hvp) / total if total else None,
        "parts": {"hvp": hvp, "krylov step without its hvp": step_rest, "ritz_pairs": s.get("ritz_pairs", 0.0),
                  "stopping test": s.get("stopping test", 0.0), "start vector": s.get("start vector", 0.0),
                  "the rest (Ritz vectors, result)": total - known},
        "calls": parts.calls,
    }
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        spectrum(land, tol=args.tol, seed=1)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    doc["profile_host"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    doc["profile_device"] = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    land.close()
    text = json.dumps(doc, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    brief = {k: doc[k] for k in ("params", "seconds", "hvp_seconds", "outside_share", "parts", "spectrum")}
    print(json.dumps(brief, default=str), flush=True)


if __name__ == "__main__":
    main()
