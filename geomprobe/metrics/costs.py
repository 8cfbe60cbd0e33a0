"""Planned costs of the metrics registered without a planner of their own (see :class:`registry.CostPlan`).

Each planner mirrors what its metric spends, from the same options (their defaults filled in from the
metric's signature) and the same parameter blocks: exact where the metric's count is fixed, an upper bound
where an iteration may stop early. ``tests/test_progress.py`` runs every registered metric on a small model
and checks the plan against the HVPs the metric reports, so a planner that drifts from its metric fails there.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import registry
from ._budget import plan_columns, plan_rmed
from ._common import select_blocks
from .registry import CostPlan, PlanContext

__all__ = ["lanczos_steps"]


def lanczos_steps(max_iter: int | None, dim: int) -> int:
    """The most steps (one HVP each) :func:`geomprobe.linalg.lanczos.lanczos` takes: ``min(d, max_iter or 300)``."""
    return min(dim, max_iter if max_iter is not None else 300)


def _rmed_hvps(blocks: Sequence[Any], *, exact_threshold: int = 1024, k: int = 512, top: int = 64,
               screen_samples: int = 32, scalings: int = 1, **_: Any) -> int:
    """HVPs of ``rmed``'s diagonal pass: exact small blocks, ``k`` samples and up to ``top`` candidates per
    scaling in larger ones, and one Bekas screen shared by all large blocks."""
    hvps, large = 0, False
    for b in blocks:
        if b.size <= max(exact_threshold, k + top):
            hvps += b.size
        else:
            large = True
            hvps += k + min(scalings * top, b.size - k)
    return hvps + (screen_samples if large and top > 0 else 0)


def _rmed(o: dict, c: PlanContext) -> CostPlan:
    # the metric's own plan within its budget hvps (exact entries, scaled down, or packed rows)
    chosen = select_blocks(c.blocks, o["blocks"])
    plan = plan_rmed([b.size for b in chosen], budget=o["hvps"], exact_threshold=o["exact_threshold"], k=o["k"],
                     top=o["top"], screen_samples=o["screen_samples"], signs=o["signs"], min_k=o["min_k"])
    # rel_tol reads a packed plan in rounds that may stop early: plan.hvps is then the cap
    return CostPlan(plan.hvps, exact=not (o["rel_tol"] and plan.mode == "packed"), vectors=2 * c.chunk_size)


def _diagshare(o: dict, c: PlanContext) -> CostPlan:
    chosen = select_blocks(c.blocks, o["blocks"])
    d = sum(b.size for b in chosen)
    if d <= min(o["exact_threshold"], o["hvps"]):
        return CostPlan(d, vectors=2 * c.chunk_size)
    return CostPlan(sum(plan_columns([b.size for b in chosen], budget=o["hvps"], k=o["k"])), exact=not o["rel_tol"],
                    vectors=2 * c.chunk_size)


def _density(o: dict, c: PlanContext) -> CostPlan:
    m = min(c.dim, o["m"])
    return CostPlan(o["n_v"] * m, exact=False, vectors=m + 2)


def _trace(o: dict, c: PlanContext) -> CostPlan:
    return CostPlan(o["hvps"], exact=not o["rel_tol"], vectors=2 * (o["batch"] or c.chunk_size) + o["hvps"] // 3)


def _saddle(o: dict, c: PlanContext) -> CostPlan:
    m = lanczos_steps(o["max_iter"], c.dim)
    return CostPlan(m, exact=False, vectors=m + 2)


def _precision(o: dict, c: PlanContext) -> CostPlan:
    # the float64 copy's own HVPs do not go through the Landscape; a float64 model needs no reference
    if c.dtype == torch.float64:
        return CostPlan(0, vectors=0)
    return CostPlan(o["vectors"], vectors=2 * o["vectors"])


def _noise(o: dict, c: PlanContext) -> CostPlan:
    cap = o["max_samples"]
    return CostPlan(0, gradients=cap if cap is not None else o["min_samples"])


def _isotropy(o: dict, c: PlanContext) -> CostPlan:
    lanczos = isinstance(o["u_min"], str) and o["u_min"] == "lanczos"
    m = min(c.dim, o["lanczos_max_iter"]) if lanczos else 0
    cap = o["max_samples"]
    return CostPlan(m, exact=not lanczos, gradients=cap if cap is not None else o["min_samples"], vectors=m + 2)


def _precond(o: dict, c: PlanContext) -> CostPlan:
    m = lanczos_steps(o["max_iter"], c.dim)
    hvps = m * (2 if o["raw"] else 1)
    if o["rmed"]:
        chosen = select_blocks(c.blocks, o["blocks"])
        hvps += _rmed_hvps(chosen, scalings=2 if o["raw"] else 1, **(o["rmed_options"] or {}))
    return CostPlan(hvps, exact=False, vectors=m + 2)


_PLANNERS = {
    "rmed": _rmed, "diagshare": _diagshare, "density": _density, "trace": _trace, "saddle": _saddle,
    "precision": _precision, "noise": _noise, "isotropy": _isotropy, "precond": _precond,
}

for _name, _planner in _PLANNERS.items():
    if _name in registry.REGISTRY and registry.REGISTRY[_name].planner is None:
        registry.set_plan(_name, _planner)
