"""Where a resident Lanczos step spends the time outside its HVP (issue 16: "outside HVPs <= 10 %").

Runs ``lanczos`` (default reorthogonalization) on a ``scale.py`` case with everything on the device, clocking the
HVPs (synchronized) and the whole run, then once more under ``torch.profiler`` and prints the CUDA kernels and
the host-side operators that take the most time outside the HVPs.

    python benchmarks/profile_lanczos_step.py --case gpt2-124m:bf16 --steps 60 --out results/x.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import DTYPES, build, lm_loss, token_batches

from geomprobe import Landscape

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")  # the module, not the function it exports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="gpt2-tiny:fp32")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reorth", default="partial")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    name, dt = a.case.split(":")
    model, vocab, b, t = build(name, DTYPES[dt], a.device)
    batch = token_batches(vocab, b, t, 1, a.device, seed=1)[0]
    land = Landscape(model, lm_loss, [batch], mode="eval")
    cuda = land.device.type == "cuda"
    clock = [0.0]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def mv(v):
        sync()
        t0 = time.perf_counter()
        r = land.hvp(v)
        sync()
        clock[0] += time.perf_counter() - t0
        return r

    def run():
        gen = torch.Generator(device=land.device).manual_seed(0)
        return lanczos_module.lanczos(mv, land.dim, tol=0.0, max_iter=a.steps, dtype=land.dtype, device=land.device,
                                      generator=gen, reorth=a.reorth)

    run()  # warm-up: compiled kernels, allocator
    clock[0] = 0.0
    sync()
    t0 = time.perf_counter()
    r = run()
    sync()
    total = time.perf_counter() - t0
    res = {"case": a.case, "steps": r.steps, "total_s": total, "hvp_s": clock[0], "outside_s": total - clock[0],
           "outside_ms_per_step": (total - clock[0]) / r.steps * 1e3, "passes": r.reorthogonalizations,
           "regime": r.reorth_regime}
    print(json.dumps(res))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        run()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=a.rows)
    print(table)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
    print(cpu_table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**res, "kernels": table, "host": cpu_table}, indent=1))


if __name__ == "__main__":
    main()
