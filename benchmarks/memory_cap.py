"""Does the probe fit wherever training fits? ResNet-18 training under a CUDA memory cap just above what
training itself needs, with a `spectrum` probe at every step.

The cap is set with `torch.cuda.set_per_process_memory_fraction` at `--headroom` times the memory reserved by
steady training. A probe that runs out of memory is recorded, training goes on, and the next probe retries
with smaller vector chunks, then smaller micro-batches, then the Lanczos basis in host memory. The benchmark
reports each probe's outcome and the settings the probe settled on, and checks training never failed.

    python benchmarks/memory_cap.py --out benchmarks/results/memory_cap_h100.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, strict_fp32  # noqa: E402

import geomprobe as gp  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--headroom", type=float, default=1.3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    strict_fp32()
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make("resnet18", a.batch, "cuda", g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_step()
    torch.cuda.synchronize()
    need = torch.cuda.max_memory_reserved()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = int(a.headroom * need)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    probe = gp.GeometryProbe(model, loss_fn, (x, y), metrics={"spectrum": {"max_iter": 40}}, schedule=gp.every(1))
    probe.attach(opt)
    trained = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the probe warns once per failure kind; we record all
        for _ in range(a.steps):
            train_step()  # a training OOM here would end the benchmark with a traceback: training must fit
            trained += 1
    probe.close()
    rows = [{"step": r["step"], "ok": "errors" not in r, "errors": r.get("errors"),
             "micro_batch_size": r["cost"]["micro_batch_size"], "chunk_size": r["cost"]["chunk_size"],
             "basis_device": r["cost"].get("basis_device"), "peak_mib": r["cost"]["peak_mib"],
             "seconds": r["cost"]["seconds"], "lambda_max": r.get("spectrum", {}).get("lambda_max")}
            for r in probe.records]
    dump({"benchmark": "memory_cap", "env": environment("cuda"), "batch": a.batch,
          "training_reserved_mib": need / 2**20, "cap_mib": cap / 2**20, "headroom": a.headroom,
          "training_steps_completed": trained, "probes": rows}, a.out)


if __name__ == "__main__":
    main()
