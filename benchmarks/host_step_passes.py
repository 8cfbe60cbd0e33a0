"""The passes of one host-vector Lanczos step, timed as ``krylov_basis._host_step`` takes them and with its
update deferred to the pass that writes the next row.

A three-term step on host vectors (``krylov_basis._host_step``, local regime) reads and writes d-vectors in
four passes: ``alpha`` (``w`` and ``v``), the three-term update with its Gram-Schmidt coefficients, the update
by them with the norm, and the quotient into the next basis row. Deferred, the coefficients' pass also takes
the norm (``beta^2 = ||w||^2 - ||c||^2``) and one pass writes ``(w - B^T c) / beta`` into the row: two fewer
passes of twelve. This times both sequences on populated vectors (no first-touch faults, which dominate
``host_lanczos.py``'s fast synthetic runs) and a copy as the floor. The deferred step was built and measured
(benchmarks/RESULTS.md section 6, seventeenth round): 95-109 ms against 102-115 ms on a 2-core host at two
threads, 147 against 144 ms at one, and on the H200's host no faster within the runs' noise (the 1B Llama's
fp32 steps 5-10: 26.9 s deferred, 26.1 s applied, round32), so the step applies its update as before.

    OMP_NUM_THREADS=2 python benchmarks/host_step_passes.py --dim 5e7 --threads 2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import host_kernel_args

from geomprobe.linalg.host_arith import lanczos_pass
from geomprobe.linalg.host_fused import host_combine


def main() -> None:
    args = host_kernel_args(__doc__, 5e7, 6)
    d = int(args.dim)
    g = torch.Generator().manual_seed(0)
    prev, cur, y = (torch.randn(d, generator=g) for _ in range(3))
    prev /= prev.norm()
    cur -= (cur @ prev) * prev
    cur /= cur.norm()
    w, row = torch.empty(d), torch.zeros(d)
    groups = [prev[None], cur[None]]

    def applied() -> float:
        w.copy_(y)
        t = time.perf_counter()
        alpha = float(lanczos_pass(w, [cur[None]], dots=True)[0][0])
        c, _ = lanczos_pass(w, groups, pre=[(prev, 0.7), (cur, alpha)], dots=True)
        nsq = lanczos_pass(w, groups, sub=c, norm=True)[1]
        torch.div(w, float(nsq.sqrt()), out=row)
        return time.perf_counter() - t

    def deferred() -> float:
        w.copy_(y)
        t = time.perf_counter()
        alpha = float(lanczos_pass(w, [cur[None]], dots=True)[0][0])
        c, wsq = lanczos_pass(w, groups, pre=[(prev, 0.7), (cur, alpha)], dots=True, norm=True)
        beta = (float(wsq) - float(c.square().sum())) ** 0.5
        host_combine(row, [(w, 1 / beta), (prev, -float(c[0]) / beta), (cur, -float(c[1]) / beta)])
        return time.perf_counter() - t

    def copy() -> float:
        t = time.perf_counter()
        row.copy_(w)
        return time.perf_counter() - t

    applied(), deferred(), copy()  # warm-up: scratch buffers
    a, b = [], []
    for _ in range(args.repeats):  # interleaved: a shared host's drift falls on both
        a.append(applied())
        b.append(deferred())
    res = {"dim": d, "threads": torch.get_num_threads(), "applied_ms": 1e3 * statistics.median(a),
           "deferred_ms": 1e3 * statistics.median(b),
           "copy_ms": 1e3 * statistics.median([copy() for _ in range(args.repeats)])}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
