"""The (L0, L1)-smoothness of a training trajectory, fitted from a run's records (docs/metrics.md#smoothness).

Two analyses of :mod:`geomprobe.trajectory` read the records a :class:`~geomprobe.GeometryProbe` wrote (plain dicts, so they run on any
run folder without torch):

* :func:`fit_l0_l1` / :func:`smoothness_fit` — the ``(L0, L1)``-smoothness envelope
  ``‖∇²f(x)‖ ≤ L0 + L1 ‖∇f(x)‖`` (Zhang, He, Sra, Jadbabaie 2020) fitted as the lower envelope of the points
  ``(G_t, L̂_t)``, with ``G_t = ‖∇f(x_t)‖`` (the record's ``grad_norm``) and ``L̂_t = max(|λ_max|, |λ_min|)``
  from Lanczos (``spectrum``; ``saddle`` or ``density`` when ``spectrum`` is absent)::

      min_{L0, L1}  Σ_t (L0 + L1 G_t)   s.t.   L0 + L1 G_t ≥ L̂_t,   L0, L1 ≥ 0

  beside the Spearman correlation of log L̂ with log G (rank correlation: the logs do not change it).
* :func:`edge_of_stability` (in :mod:`geomprobe.trajectory.edge_of_stability`) — when
  ``η·sharpness`` first passes the stability threshold of the optimizer's update.

Both take a run's records (and meta): ``reader = RunReader("runs/sgd")``, then
``smoothness_fit(reader.records)`` and ``edge_of_stability(reader.records, reader.meta)``; ``geomprobe report``
turns them into findings and its ``--json`` document carries them under ``trajectory``. The batch-size
scaling rules of docs/metrics.md#batch_scaling live with the optimizers: :func:`geomprobe.optim.scale_for_batch`.

How the LP is solved: exactly, without an LP library. The objective is ``n·(L0 + L1 Ḡ)``, the height of the
line ``L0 + L1 G`` at the mean gradient norm ``Ḡ``, so the optimum is a vertex of a 2-D polygon: either an
edge of the upper convex hull of the points (a line through two of them), or a line through one point with
``L1 = 0`` or ``L0 = 0``. Checking those ``O(n)`` candidates gives the exact optimum in ``O(n log n)``; the
test suite checks it against ``scipy.optimize.linprog``. The line is tight (equal to ``L̂_t``) at the points
it passes through, two of them whenever a hull edge wins.

>>> import numpy as np
>>> x = 0.9 ** np.arange(12)                  # iterates of f(x) = x**4 shrinking towards 0
>>> fit = fit_l0_l1(4 * x**3, 12 * x**2)       # G = |f'|, L = f'' = 12 (G/4)**(2/3)
>>> fit.points, len(fit.tight), round(fit.spearman, 6)
(12, 2, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigurationError

__all__ = [
    "SmoothnessFit",
    "fit_l0_l1",
    "smoothness_fit",
    "sharpness_of",
    "spearman",
    "MIN_FIT_POINTS",
    "SHARPNESS_SOURCES",
]

# Fewer points than this leave the envelope and the rank correlation without meaning (2 points fix a line
# through both, and a rank correlation of 2 points is always ±1).
MIN_FIT_POINTS = 3
# A constraint counts as tight when the line is within this relative distance of the point.
TIGHT_REL = 1e-9
# Where the sharpness max(|λ_max|, |λ_min|) is read from, first found wins: each is a Lanczos estimate of
# the same Hessian's extremes.
SHARPNESS_SOURCES = ("spectrum", "saddle", "density")


@dataclass(frozen=True)
class SmoothnessFit:
    """The fitted envelope ``L0 + L1·G`` and the points it was fitted to.

    ``tight`` holds the indices (into ``grad_norm``/``sharpness``) of the points the line touches;
    ``steps`` are the records' steps when the fit came from a run.
    """

    L0: float
    L1: float
    spearman: float
    points: int
    tight: tuple[int, ...]
    grad_norm: np.ndarray = field(repr=False)
    sharpness: np.ndarray = field(repr=False)
    steps: np.ndarray | None = field(default=None, repr=False)

    def envelope(self, grad_norm: Any) -> np.ndarray:
        """The bound ``L0 + L1·G`` at the given gradient norms."""
        return self.L0 + self.L1 * np.asarray(grad_norm, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays but the tight points' steps)."""
        tight_steps = [int(self.steps[i]) for i in self.tight] if self.steps is not None else None
        return {"L0": self.L0, "L1": self.L1, "spearman": _finite_or_none(self.spearman), "points": self.points,
                "tight": list(self.tight), "tight_steps": tight_steps}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` over the pairs where both are finite; NaN when fewer
    than 3 pairs remain or either side is constant.

    >>> spearman([1, 2, 3, 4], [10, 20, 15, 40])
    0.8
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x) - 0.5 * (len(x) + 1), _ranks(y) - 0.5 * (len(y) + 1)
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def _upper_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the upper convex hull's vertices, left to right (monotone chain, collinear points dropped)."""
    order = np.lexsort((y, x))
    hull: list[int] = []
    for i in order:
        # Equal x: only the highest point can lie on the upper hull, and it sorts last.
        while hull and x[hull[-1]] == x[i]:
            hull.pop()
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross >= 0:  # b lies on or below the chord a→i: not a vertex of the upper hull
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def fit_l0_l1(grad_norm: Any, sharpness: Any, steps: Any = None) -> SmoothnessFit:
    """Fit ``‖∇²f‖ ≤ L0 + L1‖∇f‖`` as the lower envelope of ``(grad_norm, sharpness)`` points
    (docs/metrics.md#smoothness).

    Solves ``min Σ_t (L0 + L1 G_t)`` s.t. ``L0 + L1 G_t ≥ L̂_t``, ``L0, L1 ≥ 0`` exactly (module docstring).
    Non-finite pairs are dropped; at least :data:`MIN_FIT_POINTS` must remain. Cost: no HVPs, ``O(n log n)``.
    """
    G = np.asarray(grad_norm, dtype=np.float64).ravel()
    L = np.asarray(sharpness, dtype=np.float64).ravel()
    if G.shape != L.shape:
        raise ConfigurationError(f"fit_l0_l1: grad_norm has {G.size} values but sharpness has {L.size}; "
                                 "pass one of each per iterate")
    keep = np.isfinite(G) & np.isfinite(L)
    st = None if steps is None else np.asarray(steps)[keep]
    G, L = G[keep], L[keep]
    if len(G) < MIN_FIT_POINTS:
        raise ConfigurationError(
            f"too few iterates for the (L0, L1) fit: it needs at least {MIN_FIT_POINTS} with both a gradient "
            f"norm and a sharpness, got {len(G)}; probe more steps (a denser schedule) or record the spectrum metric"
        )
    if (G < 0).any():
        raise ConfigurationError("fit_l0_l1: gradient norms must be >= 0; pass norms, not signed values")
    candidates = [(float(L.max(initial=0.0)), 0.0)]  # L1 = 0: a flat line through the highest point
    positive = G > 0
    if positive.any() and (L[~positive] <= 0).all():
        candidates.append((0.0, max(float((L[positive] / G[positive]).max()), 0.0)))  # L0 = 0: through 0
    hull = _upper_hull(G, L)
    for a, b in zip(hull[:-1], hull[1:]):
        slope = (L[b] - L[a]) / (G[b] - G[a])
        candidates.append((float(L[a] - slope * G[a]), float(slope)))
    scale = max(float(np.abs(L).max()), float(np.finfo(np.float64).tiny))
    best: tuple[float, float] | None = None
    for L0, L1 in candidates:
        # Candidates outside the quadrant or below a point are not vertices of the feasible polygon.
        if L0 < -TIGHT_REL * scale or L1 < 0 or (L0 + L1 * G < L - TIGHT_REL * scale).any():
            continue
        L0 = max(L0, 0.0)
        if best is None or L0 + L1 * G.mean() < best[0] + best[1] * G.mean():
            best = (L0, L1)
    assert best is not None  # the flat line through the highest point is always feasible
    L0, L1 = best
    tight = tuple(int(i) for i in np.flatnonzero(np.abs(L0 + L1 * G - L) <= TIGHT_REL * scale))
    # Ranks are unchanged by the logs, and the raw values keep points with G = 0 or L̂ = 0 in the count.
    return SmoothnessFit(L0=L0, L1=L1, spearman=spearman(G, L), points=len(G), tight=tight, grad_norm=G,
                         sharpness=L, steps=st)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def sharpness_of(record: Mapping[str, Any]) -> float:
    """``max(|λ_max|, |λ_min|)`` of one record, from the first metric in :data:`SHARPNESS_SOURCES`; NaN if none."""
    for name in SHARPNESS_SOURCES:
        result = record.get(name)
        if isinstance(result, Mapping):
            values = [abs(v) for v in (_number(result.get("lambda_max")), _number(result.get("lambda_min")))
                      if math.isfinite(v)]
            if values:
                return max(values)
    return math.nan


def smoothness_fit(records: Sequence[Mapping[str, Any]]) -> SmoothnessFit:
    """:func:`fit_l0_l1` on a run's records (``RunReader(...).records``): G from ``grad_norm``, L̂ from
    :func:`sharpness_of`. Raises :class:`ConfigurationError` when fewer than :data:`MIN_FIT_POINTS` records
    have both."""
    steps = np.asarray([r.get("step", i) for i, r in enumerate(records)], dtype=np.int64)
    G = np.asarray([_number(r.get("grad_norm")) for r in records], dtype=np.float64)
    L = np.asarray([sharpness_of(r) for r in records], dtype=np.float64)
    return fit_l0_l1(G, L, steps=steps)
