"""What measuring a Lanczos vector's inner products from sketches costs (linalg/sketched_gram.py): the sketch of a
d-vector on its device, and the host's bucket products against k stored sketches. One JSON line per figure.

    python3 benchmarks/sketch_cost.py --dim 1104218112 --dtype bf16 --out sketch_cost.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from geomprobe.linalg.sketched_gram import SketchedGram

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_104_218_112)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--stored", default="10,20,40")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    v = torch.randn(a.dim, device=dev, dtype=DTYPES[a.dtype])
    v /= torch.linalg.vector_norm(v.float())
    gram = SketchedGram(a.dim)
    rows = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    gram.sketch.apply(v)
    sync()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(5):
        gram.sketch.apply(v)
    sync()
    apply_s = (time.perf_counter() - t) / 5
    extra = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else 0
    rows.append({"what": "sketch on device", "dim": a.dim, "dtype": a.dtype, "buckets": gram.size,
                 "seconds": apply_s, "device_bytes_beside": extra,
                 "gb_per_s": v.numel() * v.element_size() / apply_s / 1e9})
    for k in sorted(int(x) for x in a.stored.split(",")):
        while gram.count < k:
            gram.push(v, 1.0)
        t = time.perf_counter()
        for _ in range(3):
            gram.measure(v, 1.0)
        rows.append({"what": "measure (sketch + host products)", "stored": k, "seconds": (time.perf_counter() - t) / 3,
                     "threads": torch.get_num_threads()})
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "rows": rows}
    for r in rows:
        print(json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
