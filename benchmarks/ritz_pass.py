"""An offloaded Lanczos run's Ritz pass (linalg/ritz.py ``_streamed_ritz_into``) on page-locked host rows of a
1B-parameter model's length (RITZ_COLUMNS-column slices of each row), with the bus's own speed for the same bytes
(one copy per row, and per slice) beside it, and three ways to feed the adds (a fresh device row per copy; one
reused for every copy, as the library's slices are; two alternating, copied on a side stream). The library's pass
also copies the two results back (``bus_gbps`` counts both ways).

    python benchmarks/ritz_pass.py --dim 1104218112 --rows 4 --repeats 3 --out r.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from geomprobe.linalg import ritz
from geomprobe.linalg.pinned_memory import pinned_empty


def timed(fn, repeats: int) -> list[list[float]]:
    """[seconds until ``fn`` returned (the host's own time, blocking included), seconds until the device was
    done] per repeat."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out.append([round(t1 - t0, 4), round(time.perf_counter() - t0, 4)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1104218112)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    blocks = []
    for _ in range(a.rows):
        B = pinned_empty((1, a.dim), torch.float32)
        B = B if B is not None else torch.empty(1, a.dim, pin_memory=True)
        B.fill_(0.5)  # the values do not matter to the times
        blocks.append(B)
    setup = time.perf_counter() - t0
    Uk = torch.randn(a.rows, 2, dtype=torch.float64)
    targets = [torch.empty(1, a.dim).pin_memory(), torch.empty(1, a.dim).pin_memory()]
    gb = a.rows * a.dim * 4 / 1e9
    res = {"dim": a.dim, "rows": a.rows, "gb": gb, "setup_s": setup, "pinned": [B.is_pinned() for B in blocks]}
    row = torch.empty(a.dim, device=dev)
    res["copy_rows_s"] = timed(lambda: [row.copy_(B[0], non_blocking=True) for B in blocks], a.repeats)
    cols = ritz.RITZ_COLUMNS
    res["copy_slices_s"] = timed(lambda: [row[c:c + cols].copy_(B[0, c:c + cols], non_blocking=True)
                                          for B in blocks for c in range(0, a.dim, cols)], a.repeats)
    row = None  # freed before the passes
    res["pass_slices_s"] = timed(lambda: ritz._streamed_ritz_into(blocks, Uk, dev, targets, whole=torch.float32),
                                 a.repeats)
    res["pass_slices_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    # experiments for the host's wait in the pass: one device row reused for every copy (no allocation per row),
    # and two reused alternately with the copies on a stream of their own (a row's copy beside the last one's adds)
    X = torch.zeros(2, a.dim, device=dev)
    coef = Uk.tolist()
    buf = torch.empty(a.dim, device=dev)

    def reused() -> None:
        for i, B in enumerate(blocks):
            buf.copy_(B[0], non_blocking=True)
            for j in range(2):
                X[j].add_(buf, alpha=coef[i][j])

    res["pass_reused_row_s"] = timed(reused, a.repeats)
    buf = None

    def fresh() -> None:  # the pass as it was until round52's commit: a fresh device row per copy
        for i, B in enumerate(blocks):
            row = B[0].to(dev, non_blocking=True)
            for j in range(2):
                X[j].add_(row, alpha=coef[i][j])

    res["pass_fresh_row_s"] = timed(fresh, a.repeats)
    side = torch.cuda.Stream()
    bufs = [torch.empty(a.dim, device=dev), torch.empty(a.dim, device=dev)]
    done = [torch.cuda.Event(), torch.cuda.Event()]

    def alternating() -> None:
        main = torch.cuda.current_stream()
        for i, B in enumerate(blocks):
            b, ready = bufs[i % 2], torch.cuda.Event()
            side.wait_event(done[i % 2])  # its last adds have read it
            with torch.cuda.stream(side):
                b.copy_(B[0], non_blocking=True)
                ready.record(side)
            main.wait_event(ready)
            for j in range(2):
                X[j].add_(b, alpha=coef[i][j])
            done[i % 2].record(main)

    for e in done:
        e.record(torch.cuda.current_stream())
    res["pass_two_rows_side_stream_s"] = timed(alternating, a.repeats)
    for k in [k for k in res if k.endswith("_s") and isinstance(res[k], list)]:
        res[k[:-2] + "_gbps"] = [round(gb / t[1], 1) for t in res[k]]
    for k in ("pass_slices_s",):  # rows in, the two results out
        res[k[:-2] + "_bus_gbps"] = [round(gb * (a.rows + 2) / a.rows / t[1], 1) for t in res[k]]
    print(json.dumps(res))
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
