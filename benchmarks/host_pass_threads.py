"""How a host-vector Lanczos step's fused pass scales with threads: torch's intra-op threads on each chunk (what
:func:`geomprobe.linalg.host_arith.lanczos_pass` does) against column spans handed to Python threads, each
span's pass on one torch thread, and both together (the spans' ops then fork teams of their own).

The pass timed is the three-term step of the estimated regime (``pre`` = beta prev + alpha cur, the dots with
prev and cur after it): three d-vectors read, one written. Also timed: a copy of one d-vector into another at
the same settings (the bandwidth floor) and the spans' results against the one-call pass (they agree to the
last bit: the same chunks, summed in the same order).

    python benchmarks/host_pass_threads.py --dim 5e8 --threads 16 --workers 1,4,8,16 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from geomprobe.linalg.host_arith import columns, lanczos_pass  # noqa: E402


def spans_pass(w, prev, cur, workers: int):
    """The pass over ``workers`` contiguous column spans (chunk-aligned, so the chunks are the one-call pass's),
    each on its own Python thread; returns the dots summed over spans in span order."""
    cols = columns(2)
    chunks = (w.shape[0] + cols - 1) // cols
    per = (chunks + workers - 1) // workers
    bounds = [(min(w.shape[0], i * per * cols), min(w.shape[0], (i + 1) * per * cols)) for i in range(workers)]
    bounds = [(a, b) for a, b in bounds if b > a]
    out = [None] * len(bounds)

    def work(i, a, b):
        out[i] = lanczos_pass(w[a:b], [prev[None, a:b], cur[None, a:b]], pre=[(prev[a:b], 0.5), (cur[a:b], 0.25)],
                              dots=True)[0]

    threads = [threading.Thread(target=work, args=(i, a, b)) for i, (a, b) in enumerate(bounds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return torch.stack(out).sum(0)


def timed(fn, repeats: int) -> float:
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return min(best)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=float, default=5e8)
    ap.add_argument("--threads", default="16,1", help="torch thread counts to try")
    ap.add_argument("--workers", default="1,4,8,16", help="Python span threads to try")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    d = int(args.dim)
    g = torch.Generator().manual_seed(0)
    prev, cur, w0 = (torch.randn(d, generator=g) for _ in range(3))
    w = w0.clone()
    dst = torch.empty_like(w)
    rows = []
    gb_pass = 4 * d * 4 / 1e9  # three reads and one write
    for nt in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(nt)
        copy_s = timed(lambda: dst.copy_(w0), args.repeats)
        for nw in [int(x) for x in args.workers.split(",")]:
            def run():
                w.copy_(w0)
                t = time.perf_counter()
                r = spans_pass(w, prev, cur, nw) if nw > 1 else lanczos_pass(
                    w, [prev[None], cur[None]], pre=[(prev, 0.5), (cur, 0.25)], dots=True)[0]
                return time.perf_counter() - t, r
            times, res = [], None
            for _ in range(args.repeats):
                s, res = run()
                times.append(s)
            row = {"torch_threads": nt, "workers": nw, "pass_s": min(times), "pass_gb_s": gb_pass / min(times),
                   "copy_gb_s": 2 * d * 4 / 1e9 / copy_s, "dots": res.tolist()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    ref = rows[0]["dots"]
    for r in rows:
        r["same_as_first"] = r["dots"] == ref
    print(f"\nd = {d:,} fp32, {os.cpu_count()} cpus: pass GB/s (copy GB/s) by torch threads x span threads")
    for r in rows:
        print(f"  threads {r['torch_threads']:>3} workers {r['workers']:>3}: {r['pass_s'] * 1e3:8.1f} ms "
              f"{r['pass_gb_s']:6.1f} GB/s (copy {r['copy_gb_s']:5.1f}) same dots {r['same_as_first']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dim": d, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
