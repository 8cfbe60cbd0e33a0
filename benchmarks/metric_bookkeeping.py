"""Seconds the diagonal, share and noise statistics spend outside their matvecs on GPT-2 124M's block layout
(148 blocks; every block's size divided by ``--shrink`` so that it fits a small host), CPU only.

The Hessian is a fixed diagonal ``D`` (a matvec is one elementwise product, timed and subtracted), so what is
left is the metrics' own bookkeeping: rmed's exact plan with its screen and pool (``diagonal_ratios``, raw and
scaled by a preconditioner), precond's reads for the scaled max (``read_scaled_candidates``) and its statistics,
diagshare's bootstrap over 148 strata (``_summarize``) and noise's per-block tails and traces (``_block_tails``
after ``collect_noise`` of 64 synthetic gradients). Run it against two checkouts to compare them:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/metric_bookkeeping.py --shrink 16 --out after.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment  # noqa: E402

from geomprobe.engine.paramspace import Block  # noqa: E402
from geomprobe.metrics import _reads  # noqa: E402
from geomprobe.metrics.diagshare import _summarize  # noqa: E402
from geomprobe.metrics.noise import _block_tails  # noqa: E402
from geomprobe.metrics.rmed import diagonal_ratios, diagonal_statistics, read_diagonal  # noqa: E402
from geomprobe.stats.gradient_noise import collect_noise  # noqa: E402


def block(name: str, start: int, stop: int) -> Block:
    return Block(name, start, stop, (name,))


def gpt2_blocks(shrink: int) -> list[Block]:
    """GPT-2 124M's 148 parameter blocks in order, each size divided by ``shrink`` (at least 1)."""
    e, v, p, layers = 768, 50257, 1024, 12
    sizes = [("wte", v * e), ("wpe", p * e)]
    for i in range(layers):
        sizes += [(f"h.{i}.ln_1.weight", e), (f"h.{i}.ln_1.bias", e), (f"h.{i}.attn.c_attn.weight", e * 3 * e),
                  (f"h.{i}.attn.c_attn.bias", 3 * e), (f"h.{i}.attn.c_proj.weight", e * e),
                  (f"h.{i}.attn.c_proj.bias", e), (f"h.{i}.ln_2.weight", e), (f"h.{i}.ln_2.bias", e),
                  (f"h.{i}.mlp.c_fc.weight", e * 4 * e), (f"h.{i}.mlp.c_fc.bias", 4 * e),
                  (f"h.{i}.mlp.c_proj.weight", 4 * e * e), (f"h.{i}.mlp.c_proj.bias", e)]
    sizes += [("ln_f.weight", e), ("ln_f.bias", e)]
    out, at = [], 0
    for name, n in sizes:
        n = max(1, n // shrink)
        out.append(block(name, at, at + n))
        at += n
    return out


class TimedDiagonal:
    """``v -> D v`` for a fixed diagonal ``D``, counting its own seconds."""

    def __init__(self, diag: torch.Tensor):
        self.diag, self.seconds, self.calls = diag, 0.0, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = v * self.diag
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shrink", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    blocks = gpt2_blocks(args.shrink)
    d = blocks[-1].stop
    g = torch.Generator().manual_seed(0)
    # curvature scales that differ by block and a heavy-ish spread within one (a few large entries)
    diag = torch.cat([torch.exp(torch.randn(b.size, generator=g, dtype=torch.float64) + j % 7) for j, b in
                      enumerate(blocks)])
    p = torch.exp(torch.randn(d, generator=g)).to(torch.float64)
    opts = {"exact_threshold": 0, "k": 6, "top": 2, "screen_samples": 32, "z": 4.0, "hvps": 2048, "signs": 2,
            "min_k": 3, "pilot": 0, "batch": 16, "dtype": torch.float64}
    res: dict = {"environment": environment("cpu"), "args": vars(args), "dim": d, "blocks": len(blocks), "runs": []}
    for rep in range(args.repeats):
        row = {}
        mv = TimedDiagonal(diag)
        t0 = time.perf_counter()
        diagonal_ratios(mv, d, blocks, scalings=(None, p), generator=torch.Generator().manual_seed(rep), **opts)
        row["rmed_raw_and_scaled"] = time.perf_counter() - t0 - mv.seconds
        row["rmed_matvecs"] = mv.calls
        mv = TimedDiagonal(diag)
        gen = torch.Generator().manual_seed(rep)
        read = {k: v for k, v in opts.items() if k not in ("batch", "dtype")}
        reads = read_diagonal(mv, d, blocks, generator=gen, dtype=torch.float64, batch=16, **read)
        t0, m0 = time.perf_counter(), mv.seconds
        diagonal_statistics(reads.parts, reads.plan, [None], z=4.0, level=0.95, bootstrap=400, budget=2048,
                            generator=gen)
        parts, _ = _reads.read_scaled_candidates(mv, d, reads, p, z=4.0, generator=gen, dtype=torch.float64,
                                                 device=None, batch=16)
        diagonal_statistics(parts, reads.plan, [p], z=4.0, level=0.95, bootstrap=400, budget=2048, generator=gen)
        row["precond_rmed"] = time.perf_counter() - t0 - (mv.seconds - m0)
        rng = np.random.default_rng(rep)
        strata = []
        for b in blocks:
            k = min(b.size, 6)
            dg = np.abs(rng.normal(size=k))
            inner = dg + np.abs(rng.normal(size=k))
            strata.append({"block": b, "exact": k == b.size, "w": b.size / k, "diag": dg, "inner": inner,
                           "tot": inner + np.abs(rng.normal(size=k))})
        t0 = time.perf_counter()
        _summarize(strata, 0.95, 1000, np.random.default_rng(rep))
        row["diagshare_summary"] = time.perf_counter() - t0
        class Rows:
            """64 gradients of heavy-tailed noise, made afresh 8 at a time (the same on both passes)."""

            def __init__(self, seed: int):
                self.seed = seed

            def __len__(self):
                return 64

            def __iter__(self):
                for a in range(0, 64, 8):
                    gr = torch.Generator().manual_seed(1000 * self.seed + a)
                    yield torch.randn(8, d, generator=gr) / torch.rand(8, d, generator=gr).add_(0.05)

        t0 = time.perf_counter()
        stats = collect_noise(Rows(rep), blocks, generator=torch.Generator().manual_seed(rep))
        row["noise_collect"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _block_tails(stats, 16, 0)
        row["noise_block_tails"] = time.perf_counter() - t0
        del stats
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
    keys = [k for k in res["runs"][0] if not k.endswith("matvecs")]
    res["median"] = {k: float(np.median([r[k] for r in res["runs"]])) for k in keys}
    print(json.dumps(res["median"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
