"""Host norms and inner products at a chunk's size, timed at a given thread count: ``chunk_norm_sq`` (row norms
of ``NORM_ROW`` entries, then their squares summed pairwise) against ``chunk_dot`` of a vector with itself
(products into scratch, a pairwise sum) and ``torch.dot`` (BLAS, in order), over one pass of a ``--dim`` vector
in chunks of ``HOST_CHUNK_ELEMENTS`` as the host passes take it. Also the conversion of bf16 chunks to float32
scratch, which bounds the host passes over half-precision rows.

    OMP_NUM_THREADS=1 python benchmarks/host_norms.py --dim 2e7 --threads 1
    python benchmarks/host_norms.py --dim 2.2e8 --threads 16 --out r.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import host_kernel_args

from geomprobe.linalg.host_arith import HOST_CHUNK_ELEMENTS, chunk_dot, chunk_norm_sq


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    args = host_kernel_args(__doc__, 2e7, 5)
    d = int(args.dim)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=g)
    xb = x.to(torch.bfloat16)
    scratch = torch.empty(HOST_CHUNK_ELEMENTS)
    out = torch.zeros(())
    step = HOST_CHUNK_ELEMENTS

    def over_chunks(op):
        def run():
            for a in range(0, d, step):
                op(a, min(d, a + step))
        return run

    ways = {
        "chunk_norm_sq": over_chunks(lambda a, b: chunk_norm_sq(x[a:b], out)),
        "chunk_dot(x, x)": over_chunks(lambda a, b: chunk_dot(x[a:b], x[a:b], out)),
        "torch.dot": over_chunks(lambda a, b: torch.dot(x[a:b], x[a:b])),
        "bf16 -> float32 scratch": over_chunks(lambda a, b: scratch[: b - a].copy_(xb[a:b])),
        "float32 copy": over_chunks(lambda a, b: scratch[: b - a].copy_(x[a:b])),
    }
    res = {"dim": d, "threads": torch.get_num_threads(), "chunk": step, "ways": {}}
    for name, fn in ways.items():
        s = median_seconds(fn, args.repeats)
        nbytes = d * (2 if name.startswith("bf16") else 4)
        res["ways"][name] = {"seconds": s, "gb_per_s": nbytes / s / 1e9}
        print(f"{name:26s} {s * 1e3:9.2f} ms  {nbytes / s / 1e9:7.1f} GB/s read", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
