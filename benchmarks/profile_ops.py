"""Where one model's gradient and HVP spend their GPU time: the top CUDA kernels of each, per call.

    python benchmarks/profile_ops.py --models transformer --out benchmarks/results/profile_ops_h100.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds, model_benchmark_parser, strict_fp32  # noqa: E402

import geomprobe as gp  # noqa: E402


def top_kernels(fn, calls: int = 3, top: int = 30) -> tuple[float, list]:
    """Total kernel milliseconds per call of ``fn`` and its ``top`` kernels as (name, ms per call, launches)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    dev = lambda e: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
    rows = sorted(prof.key_averages(), key=lambda e: -dev(e))
    total = sum(dev(e) for e in rows) / calls / 1e3
    return round(total, 3), [(e.key[:110], round(dev(e) / calls / 1e3, 3), e.count // calls) for e in rows[:top]]


def top_nodes(fn, calls: int = 3, top: int = 25) -> list:
    """The autograd nodes (and forward ops) of ``fn`` with the most kernel time, inclusive, per call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    dev = lambda e: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
    rows = [e for e in prof.key_averages() if e.key.startswith("autograd::engine::evaluate_function")]
    rows.sort(key=lambda e: -dev(e))
    return [(e.key.split(": ")[-1][:80], round(dev(e) / calls / 1e3, 3), e.count // calls) for e in rows[:top]]


def _language_model(spec: str, device):
    """``name:dtype`` of ``benchmarks/scale.py`` (its model, batch and loss), with a Landscape whose graph is kept
    (``memory=None``), and the plain gradient to divide by."""
    import scale

    name, dtype = spec.split(":")
    model, vocab, batch, tokens = scale.build(name, scale.DTYPES[dtype], device)
    model.eval()
    (data,) = scale.token_batches(vocab, batch, tokens, 1, device, seed=0)
    params = list(model.parameters())
    grad = lambda: torch.autograd.grad(scale.lm_loss(model, data), params)
    land = gp.Landscape(model, scale.lm_loss, [data], memory=None)
    return model, land, grad


def main(argv=None):
    ap = model_benchmark_parser(__doc__, "transformer")
    a = ap.parse_args(argv)
    strict_fp32()
    out = {"benchmark": "profile_ops", "env": environment(a.device), "rows": []}
    for name in a.models.split(","):
        if ":" in name:  # a language model of benchmarks/scale.py: "gpt2-124m:bf16"
            model, land, grad = _language_model(name, a.device)
        else:
            g = torch.Generator().manual_seed(0)
            model, loss_fn, (x, y) = models.make(name, a.batch or 128, a.device, g, small=a.small)
            model.eval()
            params = list(model.parameters())
            grad = lambda: torch.autograd.grad(loss_fn(model(x), y), params)
            land = gp.Landscape(model, loss_fn, (x, y))
        v = torch.randn(land.dim, device=a.device, dtype=land.dtype)
        t_grad = median_seconds(grad, a.device)
        t_hvp = median_seconds(lambda: land.hvp(v), a.device)
        g_total, g_top = top_kernels(grad)
        h_total, h_top = top_kernels(lambda: land.hvp(v))
        nodes = top_nodes(lambda: land.hvp(v))
        out["rows"].append({"model": name, "grad_ms": 1e3 * t_grad, "hvp_x": t_hvp / t_grad,
                            "grad_kernel_ms": g_total, "hvp_kernel_ms": h_total,
                            "grad_top": g_top, "hvp_top": h_top,
                            "hvp_nodes": nodes})
        land.close()
    dump(out, a.out)


if __name__ == "__main__":
    main()
