"""The Gram-Schmidt products of a Lanczos step, timed against the memory they read.

A Lanczos step on a d-vector basis of n rows reads the basis twice: ``c = B w`` and ``w -= c B``. At HBM speed
(4.8 TB/s on an H200) two reads of 22 bf16 rows of 124M entries take about 2 ms; the step measured about 12 ms
outside its HVP (benchmarks/RESULTS.md §6), because a plain product with few rows (or one output row) leaves
cuBLAS too little parallelism. The default run compares, for rows 1 to 64 and 300, in bf16 and fp32:

- ``old sub_rows``: :func:`~geomprobe.linalg.vectors.sub_rows` with the block-diagonal update off
  (``blocks=0``), what the library did before it (CUDA: the fused ``torch.mm(..., out_dtype=float32)`` product
  for half types, ``addmv_`` for fp32, an elementwise ``addcmul_`` for one row);
- ``library sub_rows``: what ``sub_rows`` does now on this device (its choice is recorded: the block-diagonal
  GEMM of :mod:`geomprobe.linalg.blockdiag` where ``sub_rows_kernel`` says so);
- ``block-diagonal sub_rows s=K``: the block-diagonal update forced with K blocks per row (K = 16, 32, 64),
  whatever the automatic choice, to place the thresholds (``vectors.BLOCKDIAG_ROWS``, ``BLOCKDIAG_FROM_ROWS``)
  and to decide fp32 (not measured before: ``BLOCKDIAG_DTYPES``);
- ``library row_dots`` (the step's other product) and ``clone`` (included in every sub_rows time).

``--ways all`` adds what earlier rounds compared: the fused and sliced products, the half-type ``torch.mv``,
the in-place ``addmm_``, and the segmented kernels with forced segment counts (``--segments``).

GB/s counts the bytes of the basis read (the vector's own traffic left out, so rows compare across ways; for
``norm`` and ``clone`` it is the vector's). Each row count records how far the library's update is from the old
one (``agreement``: max |new - old| over max |old|, and the entries whose one rounding to the stored type went
the other way). A basis that would not fit in 85 % of the free device memory is measured at d halved until it
does (recorded per row). Every way runs in its own try/except: a way this build lacks, or memory it runs out
of, is recorded, not fatal. The JSON goes to ``--out`` (stdout without it); a table of old against new ms
ends the output.

    python benchmarks/profile_rowdots.py --out r.json                                   # a GPU: bf16 and fp32
    python benchmarks/profile_rowdots.py --rows 1,2,8,16,22,64,128,300 --dtypes fp16 --ways all --out r.json
    python benchmarks/profile_rowdots.py --dim 124439824 --rows 2,8,16,22 --dtypes bf16 --out r.json  # odd blocks
    OMP_NUM_THREADS=2 python benchmarks/profile_rowdots.py --device cpu --dim 4194304 --rows 1,2,8,22,64 --out r.json
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



DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK_COUNTS = (16, 32, 64)


def parse_rows(text: str) -> list[int]:
    """``"1-64,300"`` -> [1, 2, ..., 64, 300]."""
    rows: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            rows.extend(range(a, b + 1))
        elif part:
            rows.append(int(part))
    return sorted(set(rows))


def library_choice(B: torch.Tensor, w: torch.Tensor) -> str:
    """What sub_rows does with these rows on this device (its own decision functions)."""
    k = V._blocks(B, w, V._segments(B, w, None), None)
    if k is not None:
        return f"block-diagonal K={k}"
    return "elementwise" if B.shape[0] == 1 and w.device.type == "cuda" else "product"


def _ways(B: torch.Tensor, c: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, every: bool,
          segment_counts: list[int]) -> dict:
    n, dim = B.shape
    ways = {
        "old sub_rows": lambda: V.sub_rows(w.clone(), c, B, blocks=0),
        "library sub_rows": lambda: V.sub_rows(w.clone(), c, B),
        "library row_dots": lambda: V.row_dots(B, w),
        "clone (included in sub_rows)": lambda: w.clone(),
    }
    for k in BLOCK_COUNTS:
        if n == 1 or dim % k == 0:
            ways[f"block-diagonal sub_rows s={k}"] = lambda k=k: V.sub_rows(w.clone(), c, B, blocks=k)
    if not every:
        return ways
    cuda = w.device.type == "cuda"
    step = (1 << 24) // n
    ch = c.to(dtype)
    ways.update({
        "fused row_dots": lambda: torch.mm(B, w[:, None], out_dtype=torch.float32),
        "unsegmented row_dots": lambda: V.row_dots(B, w, segments=1 if cuda else None),
        "sliced row_dots": lambda: sum(B[:, s : s + step].float() @ w[s : s + step].float()
                                       for s in range(0, dim, step)),
        "native mv": lambda: torch.mv(B, w),
        "fused sub_rows": lambda: torch.mm(ch[None], B, out_dtype=torch.float32),
        "unsegmented sub_rows": lambda: V.sub_rows(w.clone(), c, B, segments=1 if cuda else None, blocks=0),
        "in-place addmm sub_rows": lambda: w.clone()[None].addmm_(ch[None], B, alpha=-1),
        "library norm": lambda: V.vector_norm(w),
    })
    if n == 1:
        ways["addcmul sub_rows"] = lambda: w.clone().addcmul_(B[0], ch[0], value=-1)
        ways["native dot"] = lambda: torch.dot(B[0], w)
    for k in segment_counts:  # the library's own segmented kernels with the segment count forced (any device)
        ways[f"segmented row_dots s={k}"] = lambda k=k: V.row_dots(B, w, segments=k)
        ways[f"segmented sub_rows s={k}"] = lambda k=k: V.sub_rows(w.clone(), c, B, segments=k, blocks=0)
    return ways


def _agreement(B: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> dict:
    """How far the library's update is from the old one (both round once to w's type)."""
    try:
        old = V.sub_rows(w.clone(), c, B, blocks=0).float()
        new = V.sub_rows(w.clone(), c, B).float()
        return {"sub_rows": float((new - old).abs().max() / old.abs().max()),
                "sub_rows_entries_differing": int((new != old).sum())}
    except Exception as e:  # noqa: BLE001  recorded, not fatal
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _fitting_dim(n: int, dim: int, item: int, device: torch.device) -> int:
    """``dim``, halved until an (n, dim) basis fits in 85 % of the free device memory (a multiple of 16 stays
    one while it can)."""
    if device.type != "cuda":
        return dim
    free = torch.cuda.mem_get_info(device)[0]
    while dim > 1 and n * dim * item > 0.85 * free:
        dim //= 2
    return dim


def measure(dtype_name: str, rows: list[int], args, device: torch.device, segment_counts: list[int]) -> dict:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    w_full = torch.randn(args.dim, generator=g, device=device, dtype=torch.float32).to(dtype)
    copy_s = timed(lambda: w_full.clone(), device, args.repeats)
    out = {"dim": args.dim, "library_segments": S.segment_count(args.dim),
           "copy_gbps": 2 * w_full.numel() * w_full.element_size() / copy_s / 1e9, "rows": {}}
    for n in rows:
        row: dict = {}
        try:
            dim = _fitting_dim(n, args.dim, w_full.element_size(), device)
            w = w_full[:dim]
            B = torch.empty(n, dim, device=device, dtype=dtype)
            for i in range(n):  # a row at a time: a float32 (300, 124M) draw alone would fill an H200
                B[i] = torch.randn(dim, generator=g, device=device, dtype=torch.float32)
            c = torch.randn(n, generator=g, device=device, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001  a row count past the device's memory is recorded, not fatal
            out["rows"][n] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        row["dim"], row["choice"] = dim, library_choice(B, w)
        bytes_read = B.numel() * B.element_size()
        for name, fn in _ways(B, c, w, dtype, args.ways == "all", segment_counts).items():
            try:
                s = timed(fn, device, args.repeats)
                moved = w.numel() * w.element_size() if ("norm" in name or "clone" in name) else bytes_read
                row[name] = {"ms": 1e3 * s, "gbps": moved / s / 1e9}
            except Exception as e:  # noqa: BLE001  a way a build lacks is recorded, not fatal
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        row["agreement"] = _agreement(B, c, w)
        out["rows"][n] = row
        del B
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{dtype_name} {n} rows: old {_ms(row, 'old sub_rows')} ms, library {_ms(row, 'library sub_rows')} ms "
              f"({row['choice']})", file=sys.stderr, flush=True)
    return out


def _ms(row: dict, name: str) -> str:
    v = row.get(name)
    return f"{v['ms']:.2f}" if isinstance(v, dict) and "ms" in v else "-"


def table(runs: dict) -> str:
    """One line per row count: old and library sub_rows ms, their ratio and the forced block counts, per dtype."""
    names = list(runs)
    head = "rows" + "".join(f" | {d}: old  new  old/new  " + "  ".join(f"K={k}" for k in BLOCK_COUNTS) + "  choice"
                            for d in names)
    lines = [head]
    all_rows = sorted({n for r in runs.values() for n in r["rows"]})
    for n in all_rows:
        cells = [f"{n:4d}"]
        for d in names:
            row = runs[d]["rows"].get(n, {})
            old, new = row.get("old sub_rows", {}), row.get("library sub_rows", {})
            ratio = f"{old['ms'] / new['ms']:.2f}x" if "ms" in old and "ms" in new else "-"
            forced = "  ".join(_ms(row, f"block-diagonal sub_rows s={k}") for k in BLOCK_COUNTS)
            extra = "" if row.get("dim", runs[d]["dim"]) == runs[d]["dim"] else f" d={row['dim']}"
            cells.append(f"{_ms(row, 'old sub_rows')} {_ms(row, 'library sub_rows')} {ratio}  {forced}  "
                         f"{row.get('choice', row.get('error', '-'))}{extra}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=124_439_808)
    ap.add_argument("--rows", default="1-64,300", help="row counts: comma-separated, ranges as a-b")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp16, fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ways", default="sub_rows", choices=["sub_rows", "all"])
    ap.add_argument("--segments", default="256,1024,2048,8192",
                    help="segment counts timed with --ways all (comma-separated, '' for none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtypes {bad}: choose from {sorted(DTYPES)}")
    device = torch.device(args.device)
    segment_counts = [int(k) for k in args.segments.split(",") if k.strip()]
    rows = parse_rows(args.rows)
    results = {"environment": environment(args.device), "threads": torch.get_num_threads(), "ways": args.ways,
               "blockdiag_rows": list(V.BLOCKDIAG_ROWS), "blockdiag_from_rows": V.BLOCKDIAG_FROM_ROWS,
               "blockdiag_dtypes": [str(t) for t in V.BLOCKDIAG_DTYPES], "runs": {}}
    for d in dtypes:
        results["runs"][d] = measure(d, rows, args, device, segment_counts)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = json.dumps(results, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, flush=True)
    print(f"\nsub_rows, ms per call ({results['environment']['device']}, d = {args.dim}; old: blocks=0, new: the "
          f"library's choice; K=k: block-diagonal forced)", flush=True)
    print(table(results["runs"]), flush=True)


if __name__ == "__main__":
    main()
