"""Probe overhead in a real training loop, probe memory against a training step's, and a scaling table.

1. ResNet-18 on CIFAR-shaped synthetic data, SGD with momentum, batch 128: wall time of N steps without a
   probe and with the default probe (metrics ["spectrum"], schedule every(100) | budget(0.05)); the
   overhead is the ratio minus one. Per-probe cost is also given in training steps (~ gradients).
2. Memory: peak CUDA memory of a probe against that of one training step at the same batch size.
3. Scaling: per-probe time (spectrum to tol 1e-3) and per-HVP time against parameter count (MLPs of 1e5
   to 1e8 parameters) and probe batch size.

    python benchmarks/overhead.py --device cuda --out benchmarks/results/overhead_h100.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds, strict_fp32, sync, train_step_peak  # noqa: E402

import geomprobe as gp  # noqa: E402


def train_loop(device, steps, probe_on, batch=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = models.ResNet18().to(device)
    X = torch.randn(4096, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (4096,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    probe = None
    if probe_on:
        probe = gp.GeometryProbe(model, loss_fn, (X[:batch], y[:batch]))   # the defaults
        probe.attach(opt, probe_now=False)
    perm = torch.randperm(4096, generator=g).to(device)
    # warm-up steps outside the timed region (cudnn autotuning, allocator)
    for i in range(5):
        idx = perm[(i * batch) % 4096:(i * batch) % 4096 + batch]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        s = (i * batch) % 4096
        idx = perm[s:s + batch]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    sync(device)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "step_ms": 1e3 * wall / steps}
    if probe is not None:
        out["probes"] = len(probe.records)
        out["probe_s"] = [r["cost"]["seconds"] for r in probe.records]
        out["probe_hvps"] = [r["cost"]["hvps"] for r in probe.records]
        out["probe_peak_mib"] = [r["cost"]["peak_mib"] for r in probe.records]
        out["converged"] = [r.get("spectrum", {}).get("converged") for r in probe.records]
        probe.close()
    return out


def memory_ratio(device, batch=128):
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make("resnet18", batch, device, g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_peak = train_step_peak(model, loss_fn, x, y, opt)
    torch.cuda.reset_peak_memory_stats()
    base2 = torch.cuda.memory_allocated()
    land = gp.Landscape(model, loss_fn, (x, y))
    gp.metrics.spectrum(land)
    probe_peak = torch.cuda.max_memory_allocated() - base2
    lmax = gp.metrics.spectrum(land)["lambda_max"]
    land.close()
    out = {"train_step_peak_mib": step_peak / 2**20, "probe_peak_mib": probe_peak / 2**20,
           "ratio": probe_peak / step_peak}
    for micro, basis in ((32, None), (16, None), (16, "cpu")):
        # once untimed: cuDNN's first calls at a new batch shape allocate search workspace
        warm = gp.Landscape(model, loss_fn, (x, y), micro_batch_size=micro, graph_budget_bytes=1)
        warm.hvp(torch.ones(warm.dim, device=device))
        warm.close()
        del warm
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base3 = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        land = gp.Landscape(model, loss_fn, (x, y), micro_batch_size=micro, graph_budget_bytes=1)
        res = gp.metrics.spectrum(land, basis_device=basis)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base3
        key = f"micro{micro}" + ("_basis_cpu" if basis else "")
        out[key] = {"probe_peak_mib": peak / 2**20, "ratio": peak / step_peak,
                    "seconds": time.perf_counter() - t0, "hvps": res["hvps"],
                    "lambda_max_rel_diff": abs(res["lambda_max"] - lmax) / abs(lmax)}
        land.close()
    # the whole batch with the basis in host memory: the graph alone
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base4 = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    land = gp.Landscape(model, loss_fn, (x, y))
    res = gp.metrics.spectrum(land, basis_device="cpu")
    sync(device)
    peak = torch.cuda.max_memory_allocated() - base4
    out["whole_basis_cpu"] = {"probe_peak_mib": peak / 2**20, "ratio": peak / step_peak,
                              "seconds": time.perf_counter() - t0, "hvps": res["hvps"]}
    land.close()
    return out


def scaling(device, widths, batches):
    rows = []
    for width, depth in widths:
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            model = models.MLP(width=width, depth=depth).to(device)
            x = torch.randn(batch, 784, generator=g).to(device)
            y = torch.randint(0, 10, (batch,), generator=g).to(device)
            loss_fn = nn.CrossEntropyLoss()
            params = list(model.parameters())
            d = sum(p.numel() for p in params)
            t_grad = median_seconds(lambda: torch.autograd.grad(loss_fn(model(x), y), params), device, repeats=3)
            land = gp.Landscape(model, loss_fn, (x, y))
            v = torch.randn(d, generator=g).to(device)
            t_hvp = median_seconds(lambda: land.hvp(v), device, repeats=3)
            sync(device)
            t0 = time.perf_counter()
            land2 = gp.Landscape(model, loss_fn, (x, y))
            out = gp.metrics.spectrum(land2, max_iter=100)
            sync(device)
            rows.append({"params": d, "width": width, "depth": depth, "batch": batch, "grad_ms": 1e3 * t_grad,
                         "hvp_x": t_hvp / t_grad, "probe_s": time.perf_counter() - t0, "probe_hvps": out["hvps"],
                         "converged": out["converged"]})
            del land, land2, model
            torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--parts", default="overhead,memory,scaling")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    strict_fp32()
    res = {"benchmark": "overhead", "env": environment(a.device)}
    parts = a.parts.split(",")
    if "overhead" in parts:
        without = train_loop(a.device, a.steps, False)
        with_probe = train_loop(a.device, a.steps, True)
        res["overhead"] = {"steps": a.steps, "without": without, "with": with_probe,
                           "overhead_fraction": with_probe["wall_s"] / without["wall_s"] - 1,
                           "probe_cost_in_steps": [s / (without["wall_s"] / a.steps) for s in with_probe["probe_s"]]}
    if "memory" in parts and torch.device(a.device).type == "cuda":
        res["memory"] = memory_ratio(a.device)
    if "scaling" in parts:
        widths = [(100, 2), (1000, 2), (3000, 2), (7000, 3)] if a.device.startswith("cuda") else [(100, 2), (300, 2)]
        res["scaling"] = scaling(a.device, widths, [32, 128, 512])
    dump(res, a.out)


if __name__ == "__main__":
    main()
