"""Planned costs of the metrics registered without a planner of their own (see :class:`registry.CostPlan`).

Each planner mirrors what its metric spends, from the same options (their defaults filled in from the
metric's signature) and the same parameter blocks: exact where the metric's count is fixed, an upper bound
where an iteration may stop early. ``tests/test_progress.py`` runs every registered metric on a small model
and checks the plan against the HVPs the metric reports, so a planner that drifts from its metric fails there.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..linalg.certify import DEFAULT_RISK
from . import registry
from ._budget import RmedPlan, column_looks, plan_columns, plan_rmed, scaled_candidates_hvps
from ._columns import COLUMNS, columns_key
from ._common import select_blocks
from .registry import CostPlan, PlanContext, SharedPart
from .rmed import READ_OPTIONS
from .shared import RAW_DIAGONAL, RAW_SPECTRUM, diagonal_key, lanczos_key

__all__ = ["lanczos_steps"]


def lanczos_steps(max_iter: int | None, dim: int) -> int:
    """The most steps (one HVP each) :func:`geomprobe.linalg.lanczos.lanczos` takes: ``min(d, max_iter or 300)``."""
    return min(dim, max_iter if max_iter is not None else 300)


def _rmed(o: dict, c: PlanContext) -> CostPlan:
    # the metric's own plan within its budget hvps (exact entries, scaled down, or packed rows); with a pilot
    # that may switch to its exact fallback, the most either may spend
    plan = _rmed_plan(select_blocks(c.blocks, o["blocks"]), o)
    return CostPlan(plan.hvps, exact=plan.fallback is None, vectors=2 * c.chunk_size)


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


def _rmed_plan(blocks: Sequence[Any], o: dict) -> RmedPlan:
    return plan_rmed([b.size for b in blocks], budget=o["hvps"], exact_threshold=o["exact_threshold"], k=o["k"],
                     top=o["top"], screen_samples=o["screen_samples"], signs=o["signs"], min_k=o["min_k"],
                     pilot=o["pilot"])


def _precond_rmed(o: dict) -> dict:
    """precond's rmed options with rmed's defaults filled in."""
    return registry.get("rmed").options(o["rmed_options"] or {})


def _precond(o: dict, c: PlanContext) -> CostPlan:
    m = lanczos_steps(o["max_iter"], c.dim)
    hvps = m * (2 if o["raw"] else 1)
    if o["rmed"]:
        chosen = select_blocks(c.blocks, o["blocks"])
        plan = _rmed_plan(chosen, _precond_rmed(o))
        # rmed's reads, then the candidates P points to for its max
        hvps += plan.hvps + scaled_candidates_hvps(plan, [b.size for b in chosen])
    return CostPlan(hvps, exact=False, vectors=m + 2)


# The parts of a plan another metric may compute identically (metrics/shared.py): keys as the metrics build them.
def _spectrum_key(o: dict, *, k: int, which: str, bound: str, max_basis: int | None, risk: float | None) -> tuple:
    return lanczos_key(k=k, tol=o["tol"], max_iter=o["max_iter"], which=which, seed=o["seed"], bound=bound,
                       max_basis=max_basis, risk=risk)


def _spectrum_shares(o: dict, c: PlanContext) -> list[SharedPart]:
    if o.get("generator") is not None:
        return []
    key = _spectrum_key(o, k=o["k"], which=o["which"], bound=o["bound"], max_basis=o["max_basis"], risk=o["risk"])
    return [SharedPart(RAW_SPECTRUM, key, lanczos_steps(o["max_iter"], c.dim), exact=False)]


def _saddle_shares(o: dict, c: PlanContext) -> list[SharedPart]:
    if o.get("generator") is not None:
        return []
    key = _spectrum_key(o, k=1, which="both", bound="residual", max_basis=None, risk=DEFAULT_RISK)
    return [SharedPart(RAW_SPECTRUM, key, lanczos_steps(o["max_iter"], c.dim), exact=False)]


def _diagonal_part(blocks: Sequence[Any], o: dict, seed: int) -> SharedPart:
    read = {k: o[k] for k in READ_OPTIONS}
    plan = _rmed_plan(blocks, o)
    return SharedPart(RAW_DIAGONAL, diagonal_key(blocks, seed=seed, **read), plan.hvps, exact=plan.fallback is None)


def _rmed_columns(blocks: Sequence[Any], o: dict) -> list[SharedPart]:
    # the exact plan's entries are columns of the per-block orders (metrics/_columns.py): whole blocks and the
    # first k of the others. A packed plan reads no column, and one whose pilot may switch to exact entries
    # reads none for certain; as a receiver it plans none either (its packed branch, as costly as its plan,
    # takes nothing), so the plan stays an upper bound either way.
    plan = _rmed_plan(blocks, o)
    if plan.mode != "exact":
        return []
    cols = tuple((b.name, b.size if small else plan.k, b.size if small else plan.k)
                 for b, small in zip(blocks, plan.exact_blocks))
    return [SharedPart(COLUMNS, columns_key(o["seed"]), sum(n for _, n, _ in cols), exact=False, columns=cols)]


def _rmed_shares(o: dict, c: PlanContext) -> list[SharedPart]:
    if o.get("generator") is not None:
        return []
    chosen = select_blocks(c.blocks, o["blocks"])
    return [_diagonal_part(chosen, o, o["seed"]), *_rmed_columns(chosen, o)]


def _diagshare_shares(o: dict, c: PlanContext) -> list[SharedPart]:
    # its sampled columns are prefixes of the per-block orders (at least the first look's when rel_tol may stop
    # it); the dense path reads every selected column, which rmed may take, but can take none (it needs whole
    # columns)
    if o.get("generator") is not None:
        return []
    chosen = select_blocks(c.blocks, o["blocks"])
    sizes = [b.size for b in chosen]
    if sum(sizes) <= min(o["exact_threshold"], o["hvps"]):
        cols = tuple((b.name, 0, b.size) for b in chosen)
    else:
        looks = column_looks(sizes, budget=o["hvps"], k=o["k"])
        first = looks[0] if o["rel_tol"] else looks[-1]
        cols = tuple((b.name, most, least) for b, most, least in zip(chosen, looks[-1], first))
    return [SharedPart(COLUMNS, columns_key(o["seed"]), sum(n for _, n, _ in cols), exact=False, columns=cols)]


def _precond_shares(o: dict, c: PlanContext) -> list[SharedPart]:
    if o.get("generator") is not None:
        return []
    parts = []
    if o["raw"]:
        key = _spectrum_key(o, k=o["k"], which="both", bound="residual", max_basis=None, risk=DEFAULT_RISK)
        parts.append(SharedPart(RAW_SPECTRUM, key, lanczos_steps(o["max_iter"], c.dim), exact=False))
    if o["rmed"]:
        parts.append(_diagonal_part(select_blocks(c.blocks, o["blocks"]), _precond_rmed(o), o["seed"]))
    return parts


_PLANNERS = {
    "rmed": _rmed, "diagshare": _diagshare, "density": _density, "trace": _trace, "saddle": _saddle,
    "precision": _precision, "noise": _noise, "isotropy": _isotropy, "precond": _precond,
}

for _name, _planner in _PLANNERS.items():
    if _name in registry.REGISTRY and registry.REGISTRY[_name].planner is None:
        registry.set_plan(_name, _planner)

_SHARERS = {"spectrum": _spectrum_shares, "saddle": _saddle_shares, "rmed": _rmed_shares, "precond": _precond_shares,
            "diagshare": _diagshare_shares}

for _name, _sharer in _SHARERS.items():
    if _name in registry.REGISTRY and registry.REGISTRY[_name].shares is None:
        registry.set_shares(_name, _sharer)
