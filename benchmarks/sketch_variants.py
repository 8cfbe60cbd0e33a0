"""Ways to draw a sign sketch's random signs on the device (linalg/sketched_gram.py), timed side by side on one
d-vector: one random draw per entry (the library's) at two chunk sizes, and random bytes unpacked to bits. One
JSON line per variant; each variant's sketch must match a float64 reference built from the same signs.

    python3 benchmarks/sketch_variants.py --dim 1104218112 --out sketch_variants.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from geomprobe.linalg import sketched_gram as sg


def bits_apply(v: torch.Tensor, m: int, chunk: int, seed: int = 0x5EED) -> torch.Tensor:
    """Two sign sketches whose signs come from random bytes, eight signs a byte."""
    gen = torch.Generator(device=v.device).manual_seed(seed)
    shifts = torch.arange(8, device=v.device, dtype=torch.uint8)
    out = torch.zeros((2, m), dtype=torch.float32, device=v.device)
    step = max(m, chunk // m * m)
    for start in range(0, v.numel(), step):
        x = v[start : start + step]
        n = x.numel()
        if n % m:
            x = torch.nn.functional.pad(x, (0, m - n % m))
        total = x.view(-1, m).sum(0, dtype=torch.float32)
        nb = -(-x.numel() // 8)
        for k in range(2):
            b = torch.empty(nb, dtype=torch.uint8, device=v.device).random_(0, 256, generator=gen)
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
    for chunk in (1 << 24, 1 << 26, 1 << 27):
        sg.CHUNK = chunk
        sk = sg.SignHashSketch(a.dim, m)
        base = _reset()
        s = timed(lambda: sk.apply(v))
        rows.append({"variant": "draw per entry", "chunk": chunk, "ms": round(s * 1e3, 2), "beside_mb": _beside(base)})
        print(json.dumps(rows[-1]), flush=True)
    for chunk in (1 << 24, 1 << 26, 1 << 27):
        base = _reset()
        s = timed(lambda: bits_apply(v, m, chunk))
        rows.append({"variant": "bytes to bits", "chunk": chunk, "ms": round(s * 1e3, 2), "beside_mb": _beside(base)})
        print(json.dumps(rows[-1]), flush=True)
    # the bits variant's signs are random: its sketch of a vector against the float64 sum of the same signs
    w = torch.randn(1 << 22, device=dev, dtype=torch.bfloat16)
    got = bits_apply(w, 1 << 10, 1 << 20)
    gen = torch.Generator(device=dev).manual_seed(0x5EED)
    shifts = torch.arange(8, device=dev, dtype=torch.uint8)
    ref = torch.zeros((2, 1 << 10), dtype=torch.float64, device=dev)
    for start in range(0, w.numel(), 1 << 20):
        x = w[start : start + (1 << 20)].double()
        for k in range(2):
            b = torch.empty(x.numel() // 8, dtype=torch.uint8, device=dev).random_(0, 256, generator=gen)
            r = b[:, None].bitwise_right_shift(shifts).bitwise_and(1).view(-1).double() * 2 - 1
            ref[k] += (r * x).view(-1, 1 << 10).sum(0)
    rows.append({"check": "bits sketch vs float64", "max_abs_err": float((got.double() - ref).abs().max()),
                 "scale": float(ref.abs().max())})
    print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
