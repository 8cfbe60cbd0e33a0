"""Spectral density of the Hessian by stochastic Lanczos quadrature, and what it says (docs/metrics.md#density).

``n_v`` Lanczos runs of ``m`` steps from Rademacher starts ``z_l`` give nodes ``theta_{l,i}`` and weights
``tau_{l,i} = U_{1i}^2``; the measure ``mu_hat = (1/n_v) sum_l sum_i tau_{l,i} delta(theta_{l,i})`` estimates
the spectral measure ``(1/d) sum_j delta(lambda_j)``, each run matching its first ``2m - 1`` moments in
expectation. The density ``phi(t) = (1/n_v) sum tau N(t; theta, s^2)`` with ``s^2 = 1e-5 max(1, spread)`` on a
10 000-point grid (krylov.slq_density). Reference: Ghorbani, Krishnan, Xiao, "An investigation into neural
net optimization via Hessian eigenvalue density" (2019).

Derived quantities and their errors:

* ``negative_mass = mu_hat((-inf, 0))``, the fraction of negative eigenvalues. Two errors add up: the
  Monte Carlo error over the ``n_v`` runs (``negative_mass_se``, each run's mass one independent draw), and
  the quadrature's: with ``m < d`` a Gauss node near 0 stands for eigenvalues on both sides of it, which
  is the whole error when many eigenvalues sit near zero. The Chebyshev-Markov-Stieltjes inequalities bound
  it per run without assumptions: the run's true mass below 0 lies between its quadrature mass less the
  weight of the last node below 0 and its quadrature mass plus the weight of the first node above
  (no gap when the run exhausted its Krylov space). ``negative_mass_lo``/``_hi`` is the 95 % interval
  from those per-run bounds (their means less/plus ``t_{n_v-1}`` standard errors), and
  ``negative_mass_err`` = the mean quadrature gap (the larger side) plus ``negative_mass_se``, so that it
  covers both parts.
* ``lambda_max``, ``lambda_min``: the extreme nodes over all runs, each with its run's residual bound
  ``beta_m |u_{m,i}|``; ``abs_ratio = |lambda_min| / lambda_max`` with ``abs_ratio_err`` the half-width of the
  interval spanned by both values moving within their bounds (``None`` if ``lambda_max`` may be <= 0).
  ``converged``: both bounds are below ``tol * max(|theta|, spread)``.
* bulk edge and outliers. **Bulk edge** ``b``: let ``t_med`` be the median of ``mu_hat``; the bulk is the
  connected stretch of grid points around ``t_med`` where ``phi >= edge_threshold * max(phi)`` (if ``t_med``
  itself is below it, the stretch ending just below ``t_med``); ``b`` is its upper end. Outliers are
  eigenvalues above ``b``, i.e. separated from the bulk by a gap where the smoothed density falls below
  the threshold. ``outliers`` = the largest number of Ritz values above ``b`` in any run: a certified
  lower bound on ``#{lambda > b}`` (Cauchy interlacing: the j-th largest Ritz value never exceeds the j-th
  largest eigenvalue), exact once Lanczos has resolved each outlier; it counts a repeated eigenvalue once.
  ``outliers_mass = d mu_hat((b, inf))`` counts multiplicity, with a standard error over the runs.
* ``trace = d mu_hat`` mean (Hutchinson with the same Rademacher starts) and its standard error.

Cost: ``n_v * min(m, d)`` HVPs (``hvps``). The grid and density are numpy arrays under ``grid`` and
``density`` (named in ``arrays``, for a sidecar file); everything else is JSON-ready.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError
from ..linalg.lanczos import lanczos
from ..linalg.slq import SLQResult, slq_density
from ..linalg.vectors import rademacher
from ._common import checked, half_width, resolve_generator, t_quantile
from .registry import register

__all__ = ["density", "bulk_edge"]


def bulk_edge(grid: np.ndarray, phi: np.ndarray, t_med: float, threshold: float = 1e-4) -> float:
    """Upper end of the bulk: the stretch of ``grid`` around ``t_med`` where ``phi >= threshold * max(phi)``.

    If ``t_med`` falls in a stretch below the threshold, the stretch ending just below it is the bulk.

    >>> g = np.linspace(0.0, 10.0, 11)
    >>> phi = np.array([1, 5, 5, 4, 0, 0, 0, 0, 1, 0, 0], dtype=float)   # bulk [0, 3], a bump at 8
    >>> bulk_edge(g, phi, 1.5, threshold=0.1)
    3.0
    """
    grid, phi = np.asarray(grid, dtype=np.float64), np.asarray(phi, dtype=np.float64)
    above = phi >= threshold * phi.max()
    i = int(np.clip(np.searchsorted(grid, t_med), 0, len(grid) - 1))
    if not above[i]:
        below_i = np.nonzero(above[:i])[0]
        if len(below_i) == 0:  # nothing below the median clears the threshold: take the first stretch
            below_i = np.nonzero(above)[0][:1]
        i = int(below_i[-1])
    gaps = np.nonzero(~above[i:])[0]
    return float(grid[i + gaps[0] - 1] if len(gaps) else grid[-1])


def _weighted_median(nodes: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(nodes)
    cw = np.cumsum(weights[order])
    return float(nodes[order][min(int(np.searchsorted(cw, 0.5 * cw[-1])), len(cw) - 1)])


def _negative_mass_bounds(theta: np.ndarray, weights: np.ndarray, *, exact: bool) -> tuple[float, float]:
    """Bounds on one run's true mass below 0, ``mu_z((-inf, 0))``, from its Gauss rule (nodes ascending).

    Chebyshev-Markov-Stieltjes: at each node ``x_k``, ``sum_{i<k} w_i <= F(x_k - 0)`` and ``F(x_k + 0) <=
    sum_{i<=k} w_i``. With ``x_{j-1} < 0 <= x_j``: ``F(0 - 0) >= sum_{i<j-1} w_i`` (``sum_{i<j} w_i`` when
    ``x_j = 0``) and ``F(0 - 0) <= sum_{i<=j} w_i``. ``exact``: the run exhausted its Krylov space, so the
    rule is the measure itself. No HVP.
    """
    j = int(np.searchsorted(theta, 0.0, side="left"))  # nodes below 0
    below = float(weights[:j].sum())
    if exact:
        return below, below
    at_zero = j < len(theta) and theta[j] == 0.0
    lower = below if at_zero else below - (float(weights[j - 1]) if j > 0 else 0.0)
    upper = below + (float(weights[j]) if j < len(theta) else 0.0)
    return max(lower, 0.0), min(upper, 1.0)


def _mean_se(x: np.ndarray) -> tuple[float, float | None]:
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(x.mean()), se


@register("density", cost="n_v * m HVPs (10 x 80 = 800 by default)")
def density(
    land: Any,
    *,
    n_v: int = 10,
    m: int = 80,
    grid_size: int = 10_000,
    sigma2: float | None = None,
    edge_threshold: float = 1e-4,
    tol: float = 1e-3,
    seed: int = 0,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
) -> dict:
    """SLQ spectral density with negative mass, |lambda_min|/lambda_max and the outliers above the bulk.

    Args:
        land: the Landscape.
        n_v: Lanczos runs (random starts); errors shrink as 1/sqrt(n_v).
        m: steps per run (moments up to 2m - 1 match); capped at ``d``.
        grid_size, sigma2: the density grid and the Gaussian smoothing variance (the default of
            docs/metrics.md#density if None).
        edge_threshold: relative density below which the bulk ends (module docstring).
        tol: relative residual bound under which the extremes count as converged.
        seed, generator: the randomness (Rademacher starts).
        basis_device: where the Lanczos basis lives (``"cpu"``: host memory; see krylov.lanczos).

    Returns the keys of the module docstring: ``grid``, ``density`` (numpy), ``arrays``, ``sigma2``,
    ``negative_mass(_err, _se, _lo, _hi)``, ``lambda_max(_err)``, ``lambda_min(_err)``, ``abs_ratio(_err)``, ``bulk_edge``,
    ``outliers``, ``outlier_values``, ``outliers_mass(_err)``, ``trace(_err)``, ``converged``, ``n_v``, ``m``,
    ``hvps``.

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> model = nn.Linear(4, 1, bias=False).double()
    >>> X = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(4, 1, dtype=torch.float64)))
    >>> out = density(land, n_v=4, grid_size=500)   # H = diag(0.5, 2, 4.5, 8), recovered exactly (m >= d)
    >>> round(out["lambda_max"], 9), round(out["lambda_min"], 9), out["negative_mass"], out["hvps"]
    (8.0, 0.5, 0.0, 16)
    >>> out["density"].shape, round(out["trace"], 9)                 # tr H = 15
    ((500,), 15.0)
    """
    if n_v < 1 or m < 1 or grid_size < 2 or not 0 < edge_threshold < 1:
        raise ConfigurationError(
            f"density needs n_v >= 1, m >= 1, grid_size >= 2 and 0 < edge_threshold < 1; got n_v={n_v}, m={m}, "
            f"grid_size={grid_size}, edge_threshold={edge_threshold}"
        )
    gen = resolve_generator(seed, generator)
    mv = checked(land.hvp)
    d = land.dim
    runs = []
    for _ in range(n_v):
        z = rademacher(d, gen, land.dtype, land.device)
        runs.append(lanczos(mv, d, tol=0.0, max_iter=m, v0=z, dtype=land.dtype, device=land.device,
                            basis_device=basis_device))
    nodes = [r.ritz_values.double().cpu() for r in runs]
    weights = [(r.U[0, :] ** 2).double().cpu() for r in runs]
    slq = SLQResult(nodes, weights, sum(r.matvecs for r in runs))
    grid, phi, s2 = slq_density(slq, grid_size=grid_size, sigma2=sigma2)
    grid, phi = grid.numpy(), phi.numpy()
    th = [n.numpy() for n in nodes]
    tw = [w.numpy() for w in weights]
    bd = [r.bounds.double().cpu().numpy() for r in runs]

    neg_runs = np.array([w[t < 0].sum() for t, w in zip(th, tw)])
    neg, neg_se = _mean_se(neg_runs)
    bounds = np.array([_negative_mass_bounds(t, w, exact=r.steps < m or r.steps == d)
                       for t, w, r in zip(th, tw, runs)])
    gap = max(float((neg_runs - bounds[:, 0]).mean()), float((bounds[:, 1] - neg_runs).mean()))
    neg_err = gap + (neg_se or 0.0)
    lo_mean, lo_se = _mean_se(bounds[:, 0])
    hi_mean, hi_se = _mean_se(bounds[:, 1])
    tq = t_quantile(0.975, n_v - 1) if n_v > 1 else math.inf
    neg_lo = max(0.0, lo_mean - tq * lo_se) if lo_se is not None else 0.0
    neg_hi = min(1.0, hi_mean + tq * hi_se) if hi_se is not None else 1.0
    tr, tr_err = _mean_se(np.array([d * (w * t).sum() for t, w in zip(th, tw)]))
    l_hi = max(range(n_v), key=lambda i: th[i][-1])
    l_lo = min(range(n_v), key=lambda i: th[i][0])
    lmax, lmax_err = float(th[l_hi][-1]), float(bd[l_hi][-1])
    lmin, lmin_err = float(th[l_lo][0]), float(bd[l_lo][0])
    spread = lmax - lmin
    converged = all(e <= tol * max(abs(v), spread) for v, e in ((lmax, lmax_err), (lmin, lmin_err)))

    ratio = ratio_err = None
    if lmax > 0:
        ratio = abs(lmin) / lmax
        if lmax - lmax_err > 0:
            lo = max(0.0, abs(lmin) - lmin_err) / (lmax + lmax_err)
            hi = (abs(lmin) + lmin_err) / (lmax - lmax_err)
            ratio_err = half_width(ratio, lo, hi)

    t_med = _weighted_median(np.concatenate(th), np.concatenate(tw))
    edge = bulk_edge(grid, phi, t_med, edge_threshold)
    counts = [int((t > edge).sum()) for t in th]
    best = int(np.argmax(counts))
    out_mass, out_mass_err = _mean_se(np.array([d * w[t > edge].sum() for t, w in zip(th, tw)]))
    return {
        "grid": grid,
        "density": phi,
        "arrays": ["grid", "density"],
        "sigma2": float(s2),
        "negative_mass": neg,
        "negative_mass_err": neg_err,
        "negative_mass_se": neg_se,
        "negative_mass_lo": neg_lo,
        "negative_mass_hi": neg_hi,
        "lambda_max": lmax,
        "lambda_max_err": lmax_err,
        "lambda_min": lmin,
        "lambda_min_err": lmin_err,
        "abs_ratio": ratio,
        "abs_ratio_err": ratio_err,
        "bulk_edge": edge,
        "outliers": counts[best],
        "outlier_values": [float(v) for v in th[best][th[best] > edge][::-1]],
        "outliers_mass": out_mass,
        "outliers_mass_err": out_mass_err,
        "trace": tr,
        "trace_err": tr_err,
        "converged": bool(converged),
        "n_v": n_v,
        "m": int(max(r.steps for r in runs)),
        "hvps": int(slq.matvecs),
    }
