"""Ways to draw a sign sketch's random signs on the device (linalg/sketched_gram.py SIGNS), timed side by side on
one d-vector at three chunk sizes (CHUNK): one random draw per entry, and random bytes read as eight bits each. One
JSON line per variant.

    python3 benchmarks/sketch_variants.py --dim 1104218112 --out sketch_variants.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from geomprobe.linalg import sketched_gram as sg


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int = 5) -> float:
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t) / reps


def _reset() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _beside(base: int) -> float:
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if torch.cuda.is_available() else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_104_218_112)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    v = torch.randn(a.dim, device=dev, dtype=torch.bfloat16)
    m = sg.sketch_size(a.dim)
    rows = []
    for signs in ("draws", "bytes"):
        sg.SIGNS = signs
        for chunk in (1 << 24, 1 << 26, 1 << 27):
            sg.CHUNK = chunk
            sk = sg.SignHashSketch(a.dim, m)
            base = _reset()
            s = timed(lambda: sk.apply(v))
            rows.append({"signs": signs, "chunk": chunk, "ms": round(s * 1e3, 2), "beside_mb": _beside(base)})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
