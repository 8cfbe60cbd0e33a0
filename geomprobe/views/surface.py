"""The loss along a line and on a plane through the Landscape's parameters, beside the quadratic model.

``line``: ``L(theta + t u)`` at ``points`` values of ``t``, and the second-order model
``L0 + (gᵀu) t + ½ (uᵀHu) t²`` from the gradient and one HVP: where the two part, the loss stops being
quadratic along ``u``. ``plane``: ``L(theta + a u + b v)`` on a grid, and its quadratic model
``L0 + a gᵀu + b gᵀv + ½ (a² uᵀHu + 2ab uᵀHv + b² vᵀHv)`` from two HVPs (Li et al. 2018 draw such planes with
filter-normalized random directions; along the top eigenvectors they show the sharpest section).

Every loss is a forward pass on the Landscape's probe batches through :func:`geomprobe.engine.evaluate.losses_at`:
the model's parameters are never written, and its buffers, flags and RNG are returned as found.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from ..engine.evaluate import ForwardProgress, flat_parameters, losses_at
from ..errors import ConfigurationError
from .directions import resolve_direction

__all__ = ["line", "plane", "check_points", "check_span", "check_budget"]


def check_points(points: Any, what: str = "points") -> int:
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise ConfigurationError(f"{what} must be an integer >= 2 (the grid's ends are points), got {points!r}")
    return int(points)


def check_span(span: Any, what: str = "span") -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in span)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be two numbers (lo, hi), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigurationError(f"{what} must be two finite numbers with lo < hi, got {span!r}")
    return lo, hi


def check_budget(forwards: int, max_forwards: int | None) -> None:
    if max_forwards is not None and forwards > max_forwards:
        raise ConfigurationError(f"this view needs {forwards} forward passes, over max_forwards={max_forwards}; "
                                 "use fewer points or fewer probe batches, or raise the budget")


def _grid(span: tuple[float, float], points: int) -> np.ndarray:
    t = np.linspace(span[0], span[1], points)
    zero = np.isclose(t, 0.0, rtol=0.0, atol=1e-12 * (span[1] - span[0]))
    t[zero] = 0.0  # the Landscape's own parameters, exactly, when the grid passes through them
    return t


def line(land: Any, direction: Any = "top", *, span: Sequence[float] = (-1.0, 1.0), points: int = 41,
         normalize: str | None = None, seed: int = 0, last_update: torch.Tensor | None = None, previous: Any = None,
         tol: float = 1e-3, max_iter: int | None = None, filter_1d: str = "weights", max_forwards: int | None = None,
         progress: ForwardProgress | None = None) -> dict:
    """The loss at ``theta + t u`` for ``points`` values of ``t`` evenly in ``span``, beside the quadratic model.

    ``direction``: ``"top"``, ``"bottom"`` (``"top2"``, ...), ``"gradient"``, ``"update"``, ``"random"``, a flat
    tensor or a dict of tensors (:func:`~geomprobe.views.directions.resolve_direction`, which says how each is
    scaled and what ``normalize``, ``seed``, ``last_update``, ``previous``, ``tol``, ``max_iter`` do).

    Returns ``t``, ``loss`` (measured) and ``quadratic`` (``L0 + slope t + ½ curvature t²``) as lists, with
    ``loss0``, ``slope = gᵀu``, ``curvature = uᵀHu`` (``uᵀHu/‖u‖²`` is ``curvature / norm²``), the
    direction's description, ``forwards`` and ``hvps`` spent and ``seconds``.

    Cost: ``points * batches`` forward passes (refused beforehand above ``max_forwards``), 1 HVP for the
    quadratic model, and for eigenvectors a Lanczos run unless Ritz vectors are recorded on ``land``. The loss
    is exact up to rounding; the quadratic model is exact for a quadratic loss, and its gap to the loss is
    the measurement of everything beyond second order.
    """
    points = check_points(points)
    lo_hi = check_span(span)
    check_budget(points * len(land.batches), max_forwards)
    t0, before = time.perf_counter(), land.hvps
    u, info = resolve_direction(land, direction, normalize=normalize, seed=seed, last_update=last_update,
                                previous=previous, tol=tol, max_iter=max_iter, filter_1d=filter_1d)
    slope = float(land.grad.to(u.device).double() @ u.double())
    curvature = float(u.double() @ land.hvp(u).double())
    t = _grid(lo_hi, points)
    theta = flat_parameters(land)
    loss = losses_at(land, (theta if s == 0.0 else theta + float(s) * u for s in t), count=points, progress=progress)
    quad = land.loss + slope * t + 0.5 * curvature * t**2
    return {**info, "t": t.tolist(), "loss": loss.tolist(), "quadratic": quad.tolist(), "loss0": land.loss,
            "slope": slope, "curvature": curvature, "forwards": points * len(land.batches),
            "hvps": land.hvps - before, "seconds": time.perf_counter() - t0}


def _points_pair(points: Any) -> tuple[Any, Any]:
    if isinstance(points, (tuple, list)):
        if len(points) != 2:
            raise ConfigurationError(f"points must be an integer or a pair (n_u, n_v), got {points!r}")
        return points[0], points[1]
    return points, points


def plane(land: Any, u: Any = "top", v: Any = "random", *, span: Sequence = (-1.0, 1.0),
          points: int | Sequence[int] = (21, 21), normalize: str | None = None, seed: int = 0,
          last_update: torch.Tensor | None = None, previous: Any = None, tol: float = 1e-3,
          max_iter: int | None = None, filter_1d: str = "weights", max_forwards: int | None = None,
          progress: ForwardProgress | None = None) -> dict:
    """The loss at ``theta + a u + b v`` on a grid, beside the quadratic model.

    ``u``, ``v``: directions as for :func:`line` (two ``"random"`` directions are drawn from ``seed`` and
    ``seed + 1``; ``"top"`` with ``"top2"`` gives the two sharpest directions). ``span``: ``(lo, hi)`` for both
    axes or ``((lo_a, hi_a), (lo_b, hi_b))``; ``points``: an integer or ``(n_a, n_b)``.

    Returns ``x`` (the ``a`` values), ``y`` (the ``b`` values), ``loss`` and ``quadratic`` as float64 arrays
    of shape ``(n_b, n_a)`` (row ``j`` at ``b = y[j]``, as matplotlib's contour takes them), ``loss0``, ``slope``
    ``(gᵀu, gᵀv)``, ``curvature`` ``[[uᵀHu, uᵀHv], [vᵀHu, vᵀHv]]``, ``cosine`` (between ``u`` and ``v``;
    random directions in high dimension are nearly orthogonal), each direction's description, ``forwards``,
    ``hvps`` and ``seconds``.

    Cost: ``n_a * n_b * batches`` forward passes (refused beforehand above ``max_forwards``), 2 HVPs, and
    the eigenvectors' Lanczos as for :func:`line`. Exact up to rounding, as :func:`line`.
    """
    pa, pb = _points_pair(points)
    na, nb = check_points(pa, "points along u"), check_points(pb, "points along v")
    if isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(s, (tuple, list)) for s in span):
        sa, sb = check_span(span[0], "span along u"), check_span(span[1], "span along v")
    else:
        sa = sb = check_span(span)
    check_budget(na * nb * len(land.batches), max_forwards)
    t0, before = time.perf_counter(), land.hvps
    kw = dict(normalize=normalize, last_update=last_update, previous=previous, tol=tol, max_iter=max_iter,
              filter_1d=filter_1d)
    du, info_u = resolve_direction(land, u, seed=seed, **kw)
    dv, info_v = resolve_direction(land, v, seed=seed + 1, **kw)
    cosine = float(du.double() @ dv.double()) / (info_u["norm"] * info_v["norm"])
    if abs(cosine) > 1 - 1e-9:
        raise ConfigurationError(f"directions {info_u['direction']!r} and {info_v['direction']!r} are parallel; "
                                 "a plane needs two independent directions")
    g = land.grad.to(du.device).double()
    slope = [float(g @ du.double()), float(g @ dv.double())]
    H = land.hvp(torch.stack([du, dv])).double()
    C = [[float(du.double() @ H[0]), float(du.double() @ H[1])], [float(dv.double() @ H[0]), float(dv.double() @ H[1])]]
    x, y = _grid(sa, na), _grid(sb, nb)
    theta = flat_parameters(land)

    def grid_points():
        for b in y:
            for a in x:
                yield theta if a == 0.0 and b == 0.0 else theta + float(a) * du + float(b) * dv

    loss = losses_at(land, grid_points(), count=na * nb, progress=progress).reshape(nb, na)
    A, B = np.meshgrid(x, y)
    cross = 0.5 * (C[0][1] + C[1][0])  # symmetric to rounding; the mean is the symmetric model's term
    quad = land.loss + slope[0] * A + slope[1] * B + 0.5 * (C[0][0] * A**2 + 2 * cross * A * B + C[1][1] * B**2)
    return {"u": info_u, "v": info_v, "x": x, "y": y, "loss": loss, "quadratic": quad, "loss0": land.loss,
            "slope": slope, "curvature": C, "cosine": cosine, "forwards": na * nb * len(land.batches),
            "hvps": land.hvps - before, "seconds": time.perf_counter() - t0}
