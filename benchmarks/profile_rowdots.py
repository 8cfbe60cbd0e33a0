"""The Gram-Schmidt products of a Lanczos step on half-precision vectors, timed against the memory they read.

A Lanczos step on a d-vector basis of n rows reads the basis twice: ``c = B w`` and ``w -= c B``. At HBM speed
(4.8 TB/s on an H200) two reads of 22 bf16 rows of 124M entries take about 2 ms; the step measured about 12 ms
outside its HVP (benchmarks/RESULTS.md §6). This times each way of forming the two products, with float32
accumulation, at that size:

- ``fused``: ``torch.mm(..., out_dtype=float32)``, what :mod:`geomprobe.linalg.vectors` does on CUDA;
- ``sliced``: float32 copies of column slices (the path elsewhere);
- ``native``: the half-type ``torch.mv`` (float32 accumulation inside cuBLAS, result rounded to bf16), for
  reference;

and reports GB/s for each beside the device's copy bandwidth. One JSON line.

    python benchmarks/profile_rowdots.py --out r.json          # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, sync

from geomprobe.linalg import vectors as V


def timed(fn, device, repeats: int = 5) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def _ways(B: torch.Tensor, c: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, n: int, dim: int) -> dict:
    step = (1 << 24) // n
    return {
        "fused row_dots": lambda: torch.mm(B, w[:, None], out_dtype=torch.float32),
        "library row_dots": lambda: V.row_dots(B, w),
        "sliced row_dots": lambda: sum(B[:, s : s + step].float() @ w[s : s + step].float()
                                       for s in range(0, dim, step)),
        "native mv": lambda: torch.mv(B, w),
        "fused sub_rows": lambda: torch.mm(c.to(dtype)[None], B, out_dtype=torch.float32),
        "library sub_rows": lambda: V.sub_rows(w.clone(), c, B),
        "library norm": lambda: V.vector_norm(w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=124_439_808)
    ap.add_argument("--rows", default="1,8,22,64")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(args.dim, generator=g, device=device, dtype=torch.float32).to(dtype)
    copy_s = timed(lambda: w.clone(), device)
    results = {"environment": environment(args.device), "dim": args.dim, "dtype": args.dtype,
               "copy_gbps": 2 * w.numel() * w.element_size() / copy_s / 1e9, "rows": {}}
    for n in [int(r) for r in args.rows.split(",")]:
        B = torch.randn(n, args.dim, generator=g, device=device, dtype=torch.float32).to(dtype)
        c = torch.randn(n, generator=g, device=device, dtype=torch.float32)
        bytes_read = B.numel() * B.element_size()
        ways = _ways(B, c, w, dtype, n, args.dim)
        row = {}
        for name, fn in ways.items():
            try:
                s = timed(fn, device)
                moved = w.numel() * w.element_size() if "norm" in name else bytes_read
                row[name] = {"ms": 1e3 * s, "gbps": moved / s / 1e9}
            except Exception as e:  # noqa: BLE001  a way a build lacks is recorded, not fatal
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        results["rows"][n] = row
    text = json.dumps(results, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
