"""Block Lanczos against single-vector Lanczos: HVPs and wall time to λ_max (and λ_min) at tol 1e-3.

A block step applies H to b vectors in one batched call (`is_grads_batched`); whether that pays depends on
how much cheaper a batched HVP is per vector on the model (benchmarks/RESULTS.md, section 1).

    python benchmarks/block_lanczos.py --device cuda --out benchmarks/results/block_lanczos_h100.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, model_benchmark_parser, strict_fp32, sync  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe import linalg  # noqa: E402
from geomprobe.linalg.block_lanczos import block_lanczos  # noqa: E402


def _timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    r = fn()
    sync(device)
    return r, time.perf_counter() - t0


def measure(name, device, batch, small, blocks, which):
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make(name, batch, device, g, small=small)
    model.eval()
    land = gp.Landscape(model, loss_fn, (x, y), chunk_size=max(blocks))
    kw = dict(tol=1e-3, which=which, dtype=land.dtype, device=land.device, generator=linalg.default_generator(0))
    linalg.lanczos(land.hvp, land.dim, max_iter=3, tol=0.0, dtype=land.dtype, device=land.device)  # warm-up
    block_lanczos(land.hvp, land.dim, block=max(blocks), max_iter=max(blocks), tol=0.0, dtype=land.dtype,
                  device=land.device)
    ref, _ = _timed(lambda: linalg.lanczos(land.hvp, land.dim, tol=1e-7, max_iter=300, dtype=land.dtype,
                                           device=land.device), device)
    lmax, lmin = ref.top(1)[0][0], ref.bottom(1)[0][0]
    rows = {"model": name, "params": land.dim, "which": which}
    r, t = _timed(lambda: linalg.lanczos(land.hvp, land.dim, **kw), device)
    rows["single"] = {"hvps": r.matvecs, "seconds": t, "lambda_max_rel_err": abs(r.top(1)[0][0] - lmax) / abs(lmax),
                      "lambda_min_rel_err": abs(r.bottom(1)[0][0] - lmin) / abs(lmax), "converged": r.converged}
    for b in blocks:
        r, t = _timed(lambda: block_lanczos(land.hvp, land.dim, block=b, **kw), device)
        rows[f"block{b}"] = {"hvps": r.matvecs, "seconds": t,
                             "lambda_max_rel_err": abs(r.top(1)[0][0] - lmax) / abs(lmax),
                             "lambda_min_rel_err": abs(r.bottom(1)[0][0] - lmin) / abs(lmax), "converged": r.converged}
    land.close()
    return rows


def main(argv=None):
    ap = model_benchmark_parser(__doc__, "mlp,resnet18,transformer")
    ap.add_argument("--blocks", default="4,8")
    ap.add_argument("--which", default="largest", choices=["largest", "both"])
    a = ap.parse_args(argv)
    strict_fp32()
    batch = a.batch or (128 if a.device.startswith("cuda") else 32)
    blocks = [int(b) for b in a.blocks.split(",")]
    rows = [measure(m, a.device, batch, a.small, blocks, w) for m in a.models.split(",")
            for w in (["largest", "both"] if a.which == "both" else ["largest"])]
    dump({"benchmark": "block_lanczos", "env": environment(a.device), "rows": rows}, a.out)


if __name__ == "__main__":
    main()
