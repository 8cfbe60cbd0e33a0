"""The start vector's draw in host memory (``VectorSpace.gaussian`` on the CPU, the host-vector mode's Lanczos
start): seconds for a ``--dim`` vector at ``--threads``, the library's draw against the earlier one (each piece
drawn into a fresh tensor and copied, ``out`` faulted in by the threads' own writes), in float32 and bf16.

    python benchmarks/host_draw.py --dim 1.1e9 --threads 16 --out r.json
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

from geomprobe.linalg import space


def draw_seconds(d: int, dtype: torch.dtype, old: bool) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    patches = []
    if old:
        plain = space.ShardedSpace._draw_threads
        patches = [mock.patch.object(space, "populate", lambda t: False),
                   mock.patch.object(space, "advise_huge_pages", lambda t: False),
                   mock.patch.object(space.ShardedSpace, "_draw_threads",
                                     lambda self, base, out, fill, fill_into=None: plain(self, base, out, fill, None))]
    for p in patches:
        p.start()
    try:
        t0 = time.perf_counter()
        v = space.VectorSpace(d).gaussian(g, dtype)
        s = time.perf_counter() - t0
    finally:
        for p in patches:
            p.stop()
    check = float(v[:4096].double().sum())
    del v
    return s, check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=float, default=1e8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = int(args.dim)
    res = {"dim": d, "threads": torch.get_num_threads(), "draws": []}
    for dtype in (torch.float32, torch.bfloat16):
        for old in (True, False, True, False):
            s, check = draw_seconds(d, dtype, old)
            row = {"dtype": str(dtype), "way": "old" if old else "library", "seconds": s, "m_per_s": d / s / 1e6,
                   "check": check}
            res["draws"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
