"""One HVP as a multiple of one gradient, for an MLP, a CIFAR-size ResNet-18 and a 6-layer transformer.

Routes compared (all in eval mode, fp32 unless --dtype, TF32 off):
  grad           loss + torch.autograd.grad, no graph kept: the unit
  build          geomprobe.Landscape construction: forward + first-order graph (create_graph=True)
  hvp_reuse      Landscape.hvp(v): double backward through the retained graph, one vector
  hvp_reuse_torchconv  the same with fast_double_backward=False: torch's own double backward for every layer
                       (the key keeps its first name, from when only convolutions were replaced)
  hvp_batched    Landscape.hvp(V) with k vectors (is_grads_batched), per vector
  hvp_rebuild    forward + create_graph gradient + double backward for every HVP (no reuse)
  hvp_func       torch.func forward-over-reverse: jvp of grad of a functional_call

    python benchmarks/hvp_cost.py --device cuda --out benchmarks/results/hvp_cost_h100.json
    python benchmarks/hvp_cost.py --device cpu --small
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds, model_benchmark_parser  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe.engine.state import math_attention  # noqa: E402


def measure(name: str, device: str, batch: int, small: bool, k: int, repeats: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make(name, batch, device, g, small=small)
    model = model.to(dtype).eval()
    if x.is_floating_point():
        x = x.to(dtype)
    params = [p for p in model.parameters()]
    d = sum(p.numel() for p in params)

    def one_grad():
        return torch.autograd.grad(loss_fn(model(x), y), params)

    t_grad = median_seconds(one_grad, device, repeats=repeats)

    def build():
        return gp.Landscape(model, loss_fn, (x, y))

    t_build = median_seconds(build, device, repeats=repeats)
    land = build()
    v = torch.randn(d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    V = torch.randn(k, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    t_reuse = median_seconds(lambda: land.hvp(v), device, repeats=repeats)
    torch_conv = gp.Landscape(model, loss_fn, (x, y), fast_double_backward=False)
    t_torchconv = median_seconds(lambda: torch_conv.hvp(v), device, repeats=repeats)
    fast, slow = land.hvp(v), torch_conv.hvp(v)
    fast_vs_torch = float((fast - slow).norm() / slow.norm())
    torch_conv.close()
    del torch_conv, fast, slow
    try:
        t_batched = median_seconds(lambda: land.hvp(V), device, repeats=max(2, repeats // 2)) / k
    except torch.OutOfMemoryError:
        t_batched = float("nan")

    def rebuild():
        with math_attention():
            gr = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
            return torch.autograd.grad(gr, params, land.space.split(v))

    t_rebuild = median_seconds(rebuild, device, repeats=repeats)

    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach() for n, p in model.named_parameters()}
    tangent = dict(zip(names, land.space.split(v)))

    def f(wd):
        return loss_fn(functional_call(model, wd, (x,)), y)

    def func_hvp():
        with math_attention():
            return jvp(grad(f), (w,), (tangent,))[1]

    try:
        t_func = median_seconds(func_hvp, device, repeats=repeats)
    except Exception as e:  # some layers have no forward-mode rule
        print(f"{name}: torch.func HVP failed: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        t_func = float("nan")

    peak = None
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        land.hvp(v)
        peak = torch.cuda.max_memory_allocated() / 2**20
    r = lambda t: round(t / t_grad, 3)
    return {
        "model": name,
        "params": d,
        "batch": batch,
        "grad_ms": round(1e3 * t_grad, 3),
        "build_x": r(t_build),
        "hvp_reuse_x": r(t_reuse),
        "hvp_reuse_torchconv_x": r(t_torchconv),
        "fast_vs_torchconv_rel_diff": fast_vs_torch,
        f"hvp_batched{k}_x": r(t_batched),
        "hvp_rebuild_x": r(t_rebuild),
        "hvp_func_x": r(t_func),
        "hvp_peak_mib": None if peak is None else round(peak, 1),
    }


def main(argv=None) -> None:
    ap = model_benchmark_parser(__doc__, "mlp,resnet18,transformer")
    ap.add_argument("--k", type=int, default=8, help="vectors per batched HVP")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--tf32", choices=["off", "default"], default="off",
                    help="off: strict fp32; default: torch's own flags (cuDNN TF32 on, matmul TF32 off)")
    a = ap.parse_args(argv)
    if a.tf32 == "off":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    batch = a.batch or (128 if a.device.startswith("cuda") else 32)
    rows = [measure(m, a.device, batch, a.small, a.k, a.repeats, getattr(torch, a.dtype)) for m in a.models.split(",")]
    env = {**environment(a.device), "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}
    dump({"benchmark": "hvp_cost", "env": env, "small": a.small, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
