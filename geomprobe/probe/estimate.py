"""What a probe will cost before it runs: the planned HVPs and memory of each metric (:mod:`.progress`), and an
estimated time from one HVP and one gradient measured on the model at its current weights.

The estimate is ``hvps * t_hvp + gradients * t_grad`` per metric, plus building the probe's graph once
(``t_graph``: the forward and first-order gradient with its graph kept). It is an estimate, not a promise:
``t_hvp`` is one single-vector HVP (block HVPs of ``trace``, ``rmed`` and ``diagshare`` cost less per vector,
so their time is overstated), ``t_grad`` one gradient on a probe batch (the noise metrics' per-example or
noise-batch gradients differ in size), and a metric whose plan is an upper bound (``<=``) may stop earlier.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..engine.landscape import Landscape
from ..engine.state import frozen, rng_preserved

__all__ = ["estimate_costs", "time_text", "bytes_text"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_costs(probe: Any) -> dict[str, Any]:
    """Each metric's planned cost (``probe.cost_plan``) with an estimated time, from one measured HVP.

    ``probe`` is a :class:`~geomprobe.probe.geometry_probe.GeometryProbe` (its model at the weights to
    measure, its probe batches and Landscape options). Costs one Landscape build (a forward and a gradient
    with its graph), one warm-up HVP, one timed HVP and one timed gradient; the model, its ``.grad`` and the
    global RNG are left as found. Returns ``hvp_seconds``, ``gradient_seconds``, ``graph_seconds``,
    ``graph_bytes``, ``metrics`` (the plan of each metric with ``seconds``: its estimated time, ``None``
    where the plan is unknown) and ``total_seconds`` (the graph plus every metric).
    """
    options = {k: v for k, v in probe.landscape_options.items() if k != "graph_budget_bytes"}
    with torch.inference_mode(False), torch.enable_grad(), rng_preserved(probe.model):
        device = next(probe.model.parameters()).device
        _sync(device)
        t0 = time.perf_counter()
        # planned like a probe's (micro-batches where the whole graph would not fit), so the time is a probe's
        land = Landscape(probe.model, probe.loss_fn, probe.batches, **options)
        _sync(device)
        t_graph = time.perf_counter() - t0
        try:
            g = torch.Generator().manual_seed(probe.seed)
            v = torch.randn(land.dim, generator=g, dtype=torch.float64).to(device=land.device, dtype=land.dtype)
            v = v / v.norm()
            land.hvp(v)  # warm-up: the first product pays for allocations and kernel selection
            _sync(device)
            t0 = time.perf_counter()
            land.hvp(v)
            _sync(device)
            t_hvp = time.perf_counter() - t0
            t0 = time.perf_counter()
            with frozen(land.model, land.mode, seed=land.seed):
                loss = land.loss_on(land.batches[0])
                torch.autograd.grad(loss, land.params, allow_unused=True)
            _sync(device)
            t_grad = time.perf_counter() - t0
            graph_bytes = land.graph_bytes
        finally:
            land.close()
    metrics: dict[str, dict] = {}
    total = t_graph
    for name, plan in probe.cost_plan.items():
        seconds = None
        if plan.get("hvps") is not None:
            seconds = plan["hvps"] * t_hvp + (plan.get("gradients") or 0) * t_grad
            total += seconds
        metrics[name] = {**plan, "seconds": seconds}
    return {"hvp_seconds": t_hvp, "gradient_seconds": t_grad, "graph_seconds": t_graph, "graph_bytes": graph_bytes,
            "metrics": metrics, "total_seconds": total}


def time_text(seconds: float | None, exact: bool = True) -> str:
    """``"~3.2 s"`` (``"<=~3.2 s"`` for an upper bound), minutes and hours past 120 s; ``"?"`` when unknown."""
    if seconds is None:
        return "?"
    prefix = "~" if exact else "<=~"
    if seconds >= 7200:
        return f"{prefix}{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{prefix}{seconds / 60:.1f} min"
    if seconds >= 0.1:
        return f"{prefix}{seconds:.1f} s"
    return f"{prefix}{seconds * 1e3:.1f} ms"


def bytes_text(n: int | None) -> str:
    """Bytes in B, KiB, MiB or GiB; ``"-"`` when unknown."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
