"""The first write of fresh host basis rows (issue 16): ms per row for a Lanczos basis in host memory appending
rows of the scale benchmark's 10M MLP (d = 10,020,874 float32, 40 MB a row) under each way of getting the pages,
with the writing thread's page faults and CPU time.

    OMP_NUM_THREADS=1 python benchmarks/first_touch.py --rows 48 --repeats 2 --out benchmarks/results/first_touch_cpu.json

Modes (``geomprobe.linalg.host_blocks`` switches): ``fault`` (the write faults every 4 KiB page, the code before),
``populate`` (MADV_POPULATE_WRITE on the writing thread before the write), ``prefetch`` (the next row populated
on a background thread while a stand-in for the matvec sleeps ``--matvec-ms``), ``huge`` (2 MiB pages by
MADV_HUGEPAGE, written directly). The modes alternate within one process, ``--repeats`` rounds; each round
allocates a fresh basis, so every row is fresh memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import environment

from geomprobe.linalg import host_blocks as HB
from geomprobe.linalg.krylov_basis import LanczosBasis

MODES = {"fault": {"HUGE_PAGES": False, "PREFETCH": False, "POPULATE": False},
         "populate": {"HUGE_PAGES": False, "PREFETCH": False, "POPULATE": True},
         "prefetch": {"HUGE_PAGES": False, "PREFETCH": True, "POPULATE": True},
         "huge": {"HUGE_PAGES": True, "PREFETCH": False, "POPULATE": False}}


def one(mode: str, d: int, rows: int, matvec_ms: float) -> dict:
    for k, v in MODES[mode].items():
        setattr(HB, k, v)
    w = torch.randn(d, generator=torch.Generator().manual_seed(0))
    basis = LanczosBasis(d, torch.float32, "cpu")
    write_s = cpu_s = 0.0
    faults = 0
    for i in range(rows):
        if matvec_ms:
            time.sleep(matvec_ms / 1e3)  # the matvec's time, when the prefetch thread has a core to itself
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        t0 = time.perf_counter()
        basis.append_normalized(w, 1.0 + i)
        write_s += time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        cpu_s += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        faults += r1.ru_minflt - r0.ru_minflt
    if basis.prefetcher is not None:
        basis.prefetcher.wait()
    return {"mode": mode, "ms_per_row": 1e3 * write_s / rows, "thread_cpu_ms_per_row": 1e3 * cpu_s / rows,
            "thread_faults_per_row": faults / rows, "prefetched": basis.prefetcher is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=10_020_874)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--matvec-ms", type=float, default=300.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    saved = {k: getattr(HB, k) for k in ("HUGE_PAGES", "PREFETCH", "POPULATE")}
    results = []
    try:
        for r in range(args.repeats):
            for mode in args.modes.split(","):
                res = {"round": r, **one(mode, args.dim, args.rows, args.matvec_ms if mode == "prefetch" else 0.0)}
                print(json.dumps(res), flush=True)
                results.append(res)
    finally:
        for k, v in saved.items():
            setattr(HB, k, v)
    out = {"environment": environment("cpu"), "args": vars(args), "thp_mode": HB.thp_mode(), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
