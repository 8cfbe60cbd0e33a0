"""The Gram-Schmidt products of a Lanczos step, timed against the memory they read.

A Lanczos step on a d-vector basis of n rows reads the basis twice: ``c = B w`` and ``w -= c B``. At HBM speed
(4.8 TB/s on an H200) two reads of 22 bf16 rows of 124M entries take about 2 ms; the step measured about 12 ms
outside its HVP (benchmarks/RESULTS.md §6), because a plain ``(n x d) @ (d x 1)`` product with few rows leaves
cuBLAS too little parallelism. This times each way of forming the two products, with float32 accumulation
for half types, at that size:

- ``fused``: ``torch.mm(..., out_dtype=float32)`` on the whole rows, what :mod:`geomprobe.linalg.vectors` did on
  CUDA before segmentation;
- ``segmented s=K``: the library's kernels with K segments per column slice forced
  (:mod:`geomprobe.linalg.segmented`), for several K, to tune ``SEGMENT_MAX``;
- ``library``: what :func:`~geomprobe.linalg.vectors.row_dots` / ``sub_rows`` do now on this device (CUDA:
  segmented with ``segment_count(d)`` segments; one row of ``sub_rows``: an elementwise ``addcmul_``);
- ``unsegmented``: the library's plain path (``segments=1`` on CUDA: one batch, the product of the whole rows);
- ``in-place addmm sub_rows``: ``w.addmm_(c, B, alpha=-1)`` in the half type (cuBLAS's float32 compute type,
  one read and write of ``w``, no float32 scratch), unsegmented;
- ``block-diagonal sub_rows s=K``: the update as one well-shaped GEMM of K times the flops (see
  :func:`block_diagonal_sub`), when K divides d;
- ``sliced``: float32 copies of column slices (the path without fused kernels), and ``native mv``: the
  half-type ``torch.mv`` (float32 accumulation inside cuBLAS, result rounded to the half type), for reference.

GB/s counts the bytes of the basis read (the vector's own traffic left out, so rows compare across ways; for
``norm`` it is the vector's). Each row count also records how far the library's results are from the fused
ones (``agreement``: max |new - old| over max |old|; float32 rounding is about 1e-6). Every way runs in its own
try/except: a way this build lacks, or memory it runs out of, is recorded, not fatal. One JSON line.

    python benchmarks/profile_rowdots.py --out r.json                                   # a GPU, bf16
    python benchmarks/profile_rowdots.py --rows 1,2,8,16,22,64,128,300 --dtype fp16 --out r.json
    OMP_NUM_THREADS=2 python benchmarks/profile_rowdots.py --device cpu --dim 4194304 --rows 1,64 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, median_seconds

from geomprobe.linalg import segmented as S
from geomprobe.linalg import vectors as V


def timed(fn, device, repeats: int = 5) -> float:
    # the median: robust to the other processes of a shared CPU (a sync per call costs microseconds on a GPU,
    # against milliseconds per product at 124M)
    return median_seconds(fn, device, repeats=repeats)


def block_diagonal_sub(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor, s: int) -> torch.Tensor:
    """``w -= c B`` as one GEMM with s output rows instead of one: ``w`` as an (s, L) matrix, ``B`` (contiguous,
    d = s L) as (n s, L), and an (s, n s) coefficient matrix holding ``c`` on the block diagonal. s times the
    flops of the product (s flops per byte of ``B``: memory-bound on an H200 below ~200), but a shape cuBLAS
    tiles well (M = s, N = L, K = n s) where the product with one output column is not. A candidate for
    ``sub_rows`` where the segmented update stays slow; it needs d divisible by s and rows d apart."""
    n, d = B.shape
    C = torch.zeros(s, n, s, dtype=c.dtype, device=c.device)
    idx = torch.arange(s, device=c.device)
    C[idx, :, idx] = c
    w.view(s, d // s).addmm_(C.view(s, n * s), B.view(n * s, d // s), alpha=-1)
    return w


def _ways(B: torch.Tensor, c: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, n: int, dim: int,
          segment_counts: list[int]) -> dict:
    step = (1 << 24) // n
    cuda = w.device.type == "cuda"
    ch = c.to(dtype)
    ways = {
        "fused row_dots": lambda: torch.mm(B, w[:, None], out_dtype=torch.float32),
        "library row_dots": lambda: V.row_dots(B, w),
        "unsegmented row_dots": lambda: V.row_dots(B, w, segments=1 if cuda else None),
        "sliced row_dots": lambda: sum(B[:, s : s + step].float() @ w[s : s + step].float()
                                       for s in range(0, dim, step)),
        "native mv": lambda: torch.mv(B, w),
        "fused sub_rows": lambda: torch.mm(ch[None], B, out_dtype=torch.float32),
        "library sub_rows": lambda: V.sub_rows(w.clone(), c, B),
        "unsegmented sub_rows": lambda: V.sub_rows(w.clone(), c, B, segments=1 if cuda else None),
        "in-place addmm sub_rows": lambda: w.clone()[None].addmm_(ch[None], B, alpha=-1),
        "clone (included in sub_rows)": lambda: w.clone(),
        "library norm": lambda: V.vector_norm(w),
    }
    if n == 1:
        ways["addcmul sub_rows"] = lambda: w.clone().addcmul_(B[0], ch[0], value=-1)
        ways["native dot"] = lambda: torch.dot(B[0], w)
    for k in (16, 64):
        if dim % k == 0:
            ways[f"block-diagonal sub_rows s={k}"] = lambda k=k: block_diagonal_sub(w.clone(), ch, B, k)
    for k in segment_counts:  # the library's own kernels with the segment count forced (any device)
        ways[f"segmented row_dots s={k}"] = lambda k=k: V.row_dots(B, w, segments=k)
        ways[f"segmented sub_rows s={k}"] = lambda k=k: V.sub_rows(w.clone(), c, B, segments=k)
    return ways


def _agreement(B: torch.Tensor, c: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> dict:
    """How far the library's products are from the fused unsegmented ones (or the float32 slices)."""
    out = {}
    try:
        if w.device.type == "cuda" and dtype in V.HALF_TYPES:
            old_dots = torch.mm(B, w[:, None], out_dtype=torch.float32)[:, 0]
            old_sub = (w.float() - torch.mm(c.to(dtype)[None], B, out_dtype=torch.float32)[0]).to(dtype)
        else:
            old_dots = V.row_dots(B, w, segments=None if w.device.type != "cuda" else 1)
            old_sub = V.sub_rows(w.clone(), c, B, segments=None if w.device.type != "cuda" else 1)
        new_dots, new_sub = V.row_dots(B, w), V.sub_rows(w.clone(), c, B)
        out["row_dots"] = float((new_dots - old_dots).abs().max() / old_dots.abs().max())
        out["sub_rows"] = float((new_sub.float() - old_sub.float()).abs().max() / old_sub.float().abs().max())
        # entries of w whose one rounding to the half type went the other way (float32 sums in another order)
        out["sub_rows_entries_differing"] = int((new_sub != old_sub).sum())
    except Exception as e:  # noqa: BLE001  recorded, not fatal
        out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=124_439_808)
    ap.add_argument("--rows", default="1,2,8,16,22,64,128,300")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--segments", default="256,1024,2048,8192",
                    help="segment counts timed beside the library's choice (comma-separated, '' for none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    segment_counts = [int(k) for k in args.segments.split(",") if k.strip()]
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(args.dim, generator=g, device=device, dtype=torch.float32).to(dtype)
    copy_s = timed(lambda: w.clone(), device, args.repeats)
    results = {"environment": environment(args.device), "dim": args.dim, "dtype": args.dtype,
               "threads": torch.get_num_threads(), "library_segments": S.segment_count(args.dim),
               "copy_gbps": 2 * w.numel() * w.element_size() / copy_s / 1e9, "rows": {}}
    for n in [int(r) for r in args.rows.split(",")]:
        row = {}
        try:
            B = torch.empty(n, args.dim, device=device, dtype=dtype)
            for i in range(n):  # a row at a time: a float32 (300, 124M) draw alone would fill an H200
                B[i] = torch.randn(args.dim, generator=g, device=device, dtype=torch.float32)
            c = torch.randn(n, generator=g, device=device, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001  a row count past the device's memory is recorded, not fatal
            results["rows"][n] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        bytes_read = B.numel() * B.element_size()
        for name, fn in _ways(B, c, w, dtype, n, args.dim, segment_counts).items():
            try:
                s = timed(fn, device, args.repeats)
                moved = w.numel() * w.element_size() if ("norm" in name or "clone" in name) else bytes_read
                row[name] = {"ms": 1e3 * s, "gbps": moved / s / 1e9}
            except Exception as e:  # noqa: BLE001  a way a build lacks is recorded, not fatal
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        row["agreement"] = _agreement(B, c, w, dtype)
        results["rows"][n] = row
        del B
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({n: {k: v.get("gbps", v.get("error")) if isinstance(v, dict) and k != "agreement" else v
                              for k, v in row.items()}}, default=str), file=sys.stderr, flush=True)
    text = json.dumps(results, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
