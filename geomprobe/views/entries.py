"""Views as probe entries: ``view_line`` and ``view_plane`` measured at each probe like a metric.

Registered in the metric registry so that a :class:`GeometryProbe` (and ``geomprobe probe --metric``) runs
them on its Landscape, under its state guard, with the optimizer's last step for ``"update"``; their arrays
go to the run's sidecar files (a plane's grids always do), and ``geomprobe report --png`` draws them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..metrics.registry import CostPlan, PlanContext, register
from .surface import _points_pair, check_points, line, plane

__all__ = ["view_line", "view_plane"]


def _lanczos(c: PlanContext, o: dict, names: Sequence[Any]) -> int:
    eig = any(isinstance(n, str) and n.startswith(("top", "bottom")) for n in names)
    return min(c.dim, o["max_iter"] if o["max_iter"] is not None else 300) if eig else 0


def _plan_line(o: dict, c: PlanContext) -> CostPlan:
    """1 HVP for the quadratic model, plus Lanczos for an eigenvector (none when spectrum recorded it);
    ``points`` forward passes per probe batch."""
    m = _lanczos(c, o, [o["direction"]])
    return CostPlan(1 + m, exact=m == 0, vectors=m + 4, forwards=check_points(o["points"]) * c.batches)


def _plan_plane(o: dict, c: PlanContext) -> CostPlan:
    """2 HVPs for the quadratic model, plus Lanczos for eigenvectors; one forward pass per grid point and
    probe batch."""
    m = _lanczos(c, o, [o["u"], o["v"]])
    pa, pb = _points_pair(o["points"])
    na, nb = check_points(pa, "points along u"), check_points(pb, "points along v")
    return CostPlan(2 + m, exact=m == 0, vectors=m + 6, forwards=na * nb * c.batches)


@register("view_line", plan=_plan_line,
          cost="points x batches forward passes, 1 HVP (+ Lanczos for top/bottom unless spectrum recorded it)")
def view_line(land: Any, *, direction: str = "top", span: Sequence[float] = (-1.0, 1.0), points: int = 41,
              normalize: str | None = None, seed: int = 0, tol: float = 1e-3, max_iter: int | None = None,
              last_update: torch.Tensor | None = None) -> dict:
    """The loss along ``direction`` through the probed parameters, beside the quadratic model
    (:func:`geomprobe.views.line`; its cost and errors). Arrays are stored as numpy arrays (a sidecar
    beyond 64 points)."""
    out = line(land, direction, span=span, points=points, normalize=normalize, seed=seed, tol=tol,
               max_iter=max_iter, last_update=last_update)
    for key in ("t", "loss", "quadratic"):
        out[key] = np.asarray(out[key])
    return out


@register("view_plane", plan=_plan_plane,
          cost="points_u x points_v x batches forward passes, 2 HVPs (+ Lanczos for top/bottom)")
def view_plane(land: Any, *, u: str = "top", v: str = "random",
               span: Sequence[float] | Sequence[Sequence[float]] = (-1.0, 1.0),
               points: int | Sequence[int] = (21, 21), normalize: str | None = None, seed: int = 0,
               tol: float = 1e-3, max_iter: int | None = None, last_update: torch.Tensor | None = None) -> dict:
    """The loss on the plane of ``u`` and ``v`` through the probed parameters, beside the quadratic model
    (:func:`geomprobe.views.plane`; its cost and errors). The grids go to sidecar files."""
    return plane(land, u, v, span=span, points=points, normalize=normalize, seed=seed, tol=tol,
                 max_iter=max_iter, last_update=last_update)
