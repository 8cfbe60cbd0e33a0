"""Seconds and page faults per HVP on the CPU with and without a reused output buffer (issue 16).

The 10M-parameter MLP of ``benchmarks/scale.py`` (784 -> 2048 x 3 -> 10, tanh, one batch of 256 by default,
float32, its ``Landscape(model, loss_fn, [batch], mode="eval")``): ``land.hvp(v)`` returns a fresh 40 MB
product, which glibc serves by a new mmap (blocks above 32 MB) whose pages fault in at every product;
``land.hvp(v, out=buf)`` writes into one buffer for the whole run. The two are timed alternately in one
process (``--repeats`` each after ``--warmup``), with the minor page faults of each product
(``getrusage``), and the two results are compared bit for bit.

    OMP_NUM_THREADS=1 python benchmarks/hvp_out.py --repeats 20 --out results/hvp_out_cpu_mlp_10m.json
    OMP_NUM_THREADS=1 python benchmarks/hvp_out.py --batches 2    # products accumulated over two batches
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import MLP
from timing import dump, environment

from geomprobe.engine.landscape import Landscape


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process (user + system: the kernel's page zeroing included, another
    job's share of a busy host not) and minor page faults of one call."""
    f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0, _faults() - f0


def measure(repeats: int, warmup: int, batches: int, batch_size: int) -> dict:
    """Per-product seconds and minor page faults of ``hvp(v)`` and ``hvp(v, out=buf)``, alternated."""
    model = MLP()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, 784, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(batches)]
    ce = torch.nn.CrossEntropyLoss()

    def loss_fn(model, b):
        return ce(model(b[0]), b[1])

    land = Landscape(model, loss_fn, data, mode="eval")
    v = torch.randn(land.dim, generator=torch.Generator().manual_seed(0), dtype=land.dtype)
    buf = torch.empty_like(v)
    # an older checkout's hvp has no out: its fresh products alone, the figures before the change
    has_out = "out" in inspect.signature(land.hvp).parameters
    runs: dict[str, list] = {"fresh": [], "out": []} if has_out else {"fresh": []}
    calls = {"fresh": lambda: land.hvp(v), "out": lambda: land.hvp(v, out=buf)}
    for i in range(warmup + repeats):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:  # neither always goes first
            timed = _timed(calls[name])
            if i >= warmup:
                runs[name].append(timed)
    same = not has_out or torch.equal(land.hvp(v).view(torch.int32), land.hvp(v, out=buf).view(torch.int32))
    res = {"dim": land.dim, "batches": batches, "batch_size": batch_size, "repeats": repeats,
           "bit_identical": bool(same), "threads": torch.get_num_threads(), "vectors": land.info()["vectors"],
           "chunk_size": land.chunk_size, "graphs_kept": land.info()["graphs_kept"]}
    for name, rows in runs.items():
        secs, cpu = [r[0] for r in rows], [r[1] for r in rows]
        res[name] = {"median_s": statistics.median(secs), "mean_s": statistics.fmean(secs),
                     "min_s": min(secs), "max_s": max(secs), "cpu_median_s": statistics.median(cpu),
                     "cpu_min_s": min(cpu), "minor_faults_per_hvp": statistics.median(r[2] for r in rows)}
    if has_out:
        res["saved_s"] = res["fresh"]["median_s"] - res["out"]["median_s"]
        res["saved_cpu_s"] = res["fresh"]["cpu_median_s"] - res["out"]["cpu_median_s"]
        res["speedup"] = res["fresh"]["median_s"] / res["out"]["median_s"]
    land.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=1, help="probe batches (the products of later ones add into the first)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = measure(args.repeats, args.warmup, args.batches, args.batch_size)
    print(f"d = {res['dim']:,}, {res['batches']} batch(es) of {res['batch_size']}, {res['threads']} thread(s), "
          f"{res['repeats']} products each, bit-identical: {res['bit_identical']}")
    for name in [n for n in ("fresh", "out") if n in res]:
        r = res[name]
        print(f"  {name:5s}  median {r['median_s']:.4f} s  mean {r['mean_s']:.4f} s  "
              f"[{r['min_s']:.4f}, {r['max_s']:.4f}]  CPU median {r['cpu_median_s']:.4f} s  "
              f"minor faults {r['minor_faults_per_hvp']:.0f}")
    if "saved_s" in res:
        print(f"  saved {res['saved_s'] * 1e3:.1f} ms per HVP ({res['speedup']:.3f}x), "
              f"{res['saved_cpu_s'] * 1e3:.1f} ms of CPU")
    dump({"environment": environment("cpu"), "args": vars(args), "results": res}, args.out)


if __name__ == "__main__":
    main()
