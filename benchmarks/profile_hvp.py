"""Where an HVP's time goes: variants of the ResNet-18 HVP (cuDNN autotuning, channels-last, no BatchNorm)
as multiples of one gradient, and the top CUDA kernels of the HVP from torch.profiler.

    python benchmarks/profile_hvp.py --device cuda --out benchmarks/results/profile_hvp_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds, strict_fp32  # noqa: E402

import geomprobe as gp  # noqa: E402


class _tf32:
    """TF32 matmuls inside the block (a user opt-in: 10-bit mantissa products)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def ratio(model, x, y, loss_fn, device):
    params = list(model.parameters())
    t_grad = median_seconds(lambda: torch.autograd.grad(loss_fn(model(x), y), params), device, repeats=5)
    land = gp.Landscape(model, loss_fn, (x, y))
    v = torch.randn(land.dim, device=device)
    t_hvp = median_seconds(lambda: land.hvp(v), device, repeats=5)
    return {"grad_ms": 1e3 * t_grad, "hvp_x": t_hvp / t_grad}, land, v


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    strict_fp32()
    g = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    res = {"benchmark": "profile_hvp", "env": environment(a.device), "variants": {}}
    model, _, (x, y) = models.make("resnet18", a.batch, a.device, g)
    model.eval()
    res["variants"]["baseline"], land, v = ratio(model, x, y, loss_fn, a.device)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            land.hvp(v)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
    res["top_kernels_ms_per_hvp"] = [
        (e.key[:90], round(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 3e3, 3), e.count // 3)
        for e in rows[:25]]
    with torch.backends.cudnn.flags(enabled=False):
        t_nocudnn = median_seconds(lambda: land.hvp(v), a.device, repeats=5)
    res["variants"]["hvp_without_cudnn"] = {"hvp_x": t_nocudnn / (res["variants"]["baseline"]["grad_ms"] / 1e3)}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), _tf32():
        t_tf32 = median_seconds(lambda: land.hvp(v), a.device, repeats=5)
    res["variants"]["hvp_tf32_allowed"] = {"hvp_x": t_tf32 / (res["variants"]["baseline"]["grad_ms"] / 1e3)}
    del land
    torch.backends.cudnn.benchmark = True
    res["variants"]["cudnn_benchmark"], land, _ = ratio(model, x, y, loss_fn, a.device)
    del land
    cl = model.to(memory_format=torch.channels_last)
    res["variants"]["cudnn_benchmark_channels_last"], land, _ = ratio(cl, x.to(memory_format=torch.channels_last), y, loss_fn, a.device)
    del land
    model.to(memory_format=torch.contiguous_format)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, cname, nn.Identity())
    res["variants"]["no_batchnorm_cudnn_benchmark"], land, _ = ratio(model, x, y, loss_fn, a.device)
    tm, tl, (tx, ty) = models.make("transformer", 32, a.device, g)
    res["variants"]["transformer_b32_cudnn_benchmark"], land, _ = ratio(tm.eval(), tx, ty, tl, a.device)
    dump(res, a.out)


if __name__ == "__main__":
    main()
