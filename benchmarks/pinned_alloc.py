"""Page-locked host blocks: torch's allocator (rounded up to a power of two, cached) against the exact-size
registered blocks of geomprobe/linalg/pinned_memory.py (pooled), at the size of a 1B-parameter float32 row.

Per route: seconds to allocate a block cold and again after it was freed (cache / pool), the locked bytes it
took (torch: ``host_memory_stats``; exact: the block's size), and device-to-host and host-to-device copy GB/s
through it. The exact route also cold without its threads' page faulting (registration faults the pages).

    python benchmarks/pinned_alloc.py --bytes 4.4e9 --out r.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from geomprobe.linalg import host_blocks, pinned_memory


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def copy_rates(host: torch.Tensor, dev: torch.Tensor) -> dict:
    torch.cuda.synchronize()
    t = time.perf_counter()
    host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    d2h = time.perf_counter() - t
    t = time.perf_counter()
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = time.perf_counter() - t
    n = host.numel() * host.element_size() / 1e9
    return {"d2h_gb_s": n / d2h, "h2d_gb_s": n / h2d}


def locked_bytes() -> int | None:
    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0))
    except Exception:  # noqa: BLE001 - older torch: no host statistics
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=float, default=4.4e9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = int(args.bytes) // 4
    torch.cuda.init()
    dev = torch.randn(n, device="cuda")
    rows = {}

    before = locked_bytes()
    s, t = timed(lambda: torch.empty(n, dtype=torch.float32, pin_memory=True))
    after = locked_bytes()
    rows["torch_cold"] = {"seconds": s, "locked_bytes": None if before is None else after - before,
                          **copy_rates(t, dev)}
    del t
    gc.collect()
    s, t = timed(lambda: torch.empty(n, dtype=torch.float32, pin_memory=True))
    rows["torch_cached"] = {"seconds": s}
    del t
    gc.collect()
    torch.cuda.synchronize()
    s, _ = timed(torch._C._host_emptyCache) if hasattr(torch._C, "_host_emptyCache") else (None, None)
    rows["torch_empty_cache_s"] = s

    s, t = timed(lambda: pinned_memory.pinned_empty((n,), torch.float32))
    rows["exact_cold"] = {"seconds": s, "locked_bytes": t.untyped_storage().nbytes(), "pinned": t.is_pinned(),
                          **copy_rates(t, dev)}
    del t
    gc.collect()
    s, t = timed(lambda: pinned_memory.pinned_empty((n,), torch.float32))
    rows["exact_pooled"] = {"seconds": s, "stats": pinned_memory.pool_stats()}
    del t
    gc.collect()
    s, _ = timed(pinned_memory.release_pool)
    rows["exact_release_s"] = s
    host_blocks.POPULATE = False  # registration faults the pages itself, on one thread
    s, t = timed(lambda: pinned_memory.pinned_empty((n,), torch.float32))
    rows["exact_cold_unpopulated"] = {"seconds": s}
    del t
    gc.collect()
    pinned_memory.release_pool()
    for k, v in rows.items():
        print(k, json.dumps(v), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bytes": n * 4, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
