"""Ways to draw a sign sketch's random signs on the device (linalg/sketched_gram.py), timed side by side on
one d-vector at three chunk sizes (CHUNK): the library's random draw per entry, and random bytes read as eight bits
each (bytes_apply). One JSON line per variant.

    python3 benchmarks/sketch_variants.py --dim 1104218112 --out sketch_variants.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from geomprobe.linalg import sketched_gram as sg


def bytes_apply(v: torch.Tensor, m: int, chunk: int, seed: int = 0x5EED) -> torch.Tensor:
    """The library's two sketches with their signs read eight at a time from random bytes (not kept: slower on an
    H200, whose random draws cost less than the shifts)."""
    gen = torch.Generator(device=v.device).manual_seed(seed)
    shifts = torch.arange(8, device=v.device, dtype=torch.uint8)
    out = torch.zeros((2, m), dtype=torch.float32, device=v.device)
    step = max(m, chunk // m * m)
    for start in range(0, v.numel(), step):
        x = v[start : start + step]
        if x.numel() % m:
            x = torch.nn.functional.pad(x, (0, m - x.numel() % m))
        total = x.view(-1, m).sum(0, dtype=torch.float32)
        for k in range(2):
            b = torch.empty(-(-x.numel() // 8), dtype=torch.uint8, device=v.device).random_(0, 256, generator=gen)
            u = b[:, None].bitwise_right_shift(shifts).bitwise_and_(1).view(-1)[: x.numel()]
            out[k].add_(u.mul(x).view(-1, m).sum(0, dtype=torch.float32), alpha=2.0).sub_(total)
    return out


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
        for chunk in (1 << 24, 1 << 26, 1 << 27):
            sg.CHUNK = chunk
            sk = sg.SignHashSketch(a.dim, m)
            fn = (lambda: sk.apply(v)) if signs == "draws" else (lambda: bytes_apply(v, m, chunk))
            base = _reset()
            s = timed(fn)
            rows.append({"signs": signs, "chunk": chunk, "ms": round(s * 1e3, 2), "beside_mb": _beside(base)})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
