"""ResNet-18 HVP under cuDNN algorithm policies (deterministic, exhaustive autotuning), each as a multiple of
the gradient under the same policy; strict fp32.

    python benchmarks/profile_cudnn.py --out benchmarks/results/profile_cudnn_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds, strict_fp32  # noqa: E402

import geomprobe as gp  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    strict_fp32()
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make("resnet18", 128, "cuda", g)
    model.eval()
    params = list(model.parameters())
    res = {"benchmark": "profile_cudnn", "env": environment("cuda"), "variants": {}}
    policies = {
        "default": dict(),
        "deterministic": dict(deterministic=True),
        "benchmark": dict(benchmark=True),
        "benchmark_exhaustive": dict(benchmark=True, benchmark_limit=0),
    }
    for name, flags in policies.items():
        old = {k: getattr(torch.backends.cudnn, k) for k in flags}
        for k, v in flags.items():
            setattr(torch.backends.cudnn, k, v)
        try:
            t_grad = median_seconds(lambda: torch.autograd.grad(loss_fn(model(x), y), params), "cuda", repeats=5)
            land = gp.Landscape(model, loss_fn, (x, y))
            v = torch.randn(land.dim, device="cuda")
            t_hvp = median_seconds(lambda: land.hvp(v), "cuda", repeats=5, warmup=2)
            res["variants"][name] = {"grad_ms": 1e3 * t_grad, "hvp_ms": 1e3 * t_hvp, "hvp_x": t_hvp / t_grad}
            del land
        except Exception as e:  # a policy some kernels refuse
            res["variants"][name] = {"error": str(e).splitlines()[0][:160]}
        finally:
            for k, v in old.items():
                setattr(torch.backends.cudnn, k, v)
    dump(res, a.out)


if __name__ == "__main__":
    main()
