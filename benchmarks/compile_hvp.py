"""Does torch.compile make an HVP cheaper? Forward-over-reverse (`torch.func.jvp` of `torch.func.grad`) compiled
with inductor, against geomprobe's eager double backward with the graph reused, each as a multiple of one
eager gradient; strict fp32.

Compilation is paid once per shape and is reported separately (a probe runs tens of HVPs at one shape).
The compiled HVP is checked against the eager one before it is timed.

    python benchmarks/compile_hvp.py --device cuda --out benchmarks/results/compile_hvp_h100.json
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds, model_benchmark_parser, strict_fp32, sync  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe.engine.state import math_attention  # noqa: E402


def measure(name: str, device: str, batch: int, small: bool, repeats: int, mode: str) -> dict:
    # Each model compiles from a clean slate: recompiling the same function for a second model switches
    # dynamo to dynamic shapes, whose kernels were measured 100x further from float64 (8.5e-5 vs 5.6e-7).
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make(name, batch, device, g, small=small)
    model.eval()
    params = list(model.parameters())
    t_grad = median_seconds(lambda: torch.autograd.grad(loss_fn(model(x), y), params), device, repeats=repeats)
    land = gp.Landscape(model, loss_fn, (x, y))
    v = torch.randn(land.dim, generator=g, dtype=torch.float64).to(device=device, dtype=land.dtype)
    t_reuse = median_seconds(lambda: land.hvp(v), device, repeats=repeats)
    ref = land.hvp(v)
    # a float64 reference of the same product, to tell which fp32 route is further from the truth
    m64 = copy.deepcopy(model).double()
    x64 = x.double() if x.is_floating_point() else x
    ref64 = gp.Landscape(m64, loss_fn, (x64, y)).hvp(v.double())
    del m64

    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    tangent = dict(zip(names, land.space.split(v)))

    def f(wd):
        return loss_fn(functional_call(model, {**wd, **buffers}, (x,)), y)

    def hvp(wd, td):
        return jvp(grad(f), (wd,), (td,))[1]

    out = {"model": name, "params": land.dim, "batch": batch, "grad_ms": round(1e3 * t_grad, 3),
           "hvp_reuse_x": round(t_reuse / t_grad, 3),
           "eager_rel_err_vs_float64": float((ref.double() - ref64).norm() / ref64.norm())}
    try:
        compiled = torch.compile(hvp, mode=mode, fullgraph=False)
        t0 = time.perf_counter()
        with math_attention():
            got = compiled(w, tangent)
        sync(device)
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        flat = torch.cat([got[n].reshape(-1) for n in names])
        out["compiled_rel_diff"] = float((flat - ref).norm() / ref.norm())
        out["compiled_rel_err_vs_float64"] = float((flat.double() - ref64).norm() / ref64.norm())

        def run():
            with math_attention():
                return compiled(w, tangent)

        out["hvp_compiled_x"] = round(median_seconds(run, device, repeats=repeats) / t_grad, 3)
    except Exception as e:  # noqa: BLE001 - a model inductor cannot compile is a result, not a crash
        out["compile_failure"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    land.close()
    return out


def main(argv=None):
    ap = model_benchmark_parser(__doc__, "resnet18,transformer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    a = ap.parse_args(argv)
    strict_fp32()
    batch = a.batch or (128 if a.device.startswith("cuda") else 32)
    rows = [measure(m, a.device, batch, a.small, a.repeats, a.mode) for m in a.models.split(",")]
    dump({"benchmark": "compile_hvp", "env": environment(a.device), "mode": a.mode, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
