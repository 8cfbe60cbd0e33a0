"""Spectral density of the Hessian by stochastic Lanczos quadrature, and what it says (docs/metrics.md#density).

``n_v`` Lanczos runs of ``m`` steps from Rademacher starts ``z_l`` give nodes ``theta_{l,i}`` and weights
``tau_{l,i} = U_{1i}^2``; the measure ``mu_hat = (1/n_v) sum_l sum_i tau_{l,i} delta(theta_{l,i})`` estimates
the spectral measure ``(1/d) sum_j delta(lambda_j)``, each run matching its first ``2m - 1`` moments in
expectation. The density ``phi(t) = (1/n_v) sum tau N(t; theta, s^2)`` with ``s^2 = 1e-5 max(1, spread)`` on a
10 000-point grid (krylov.slq_density). Reference: Ghorbani, Krishnan, Xiao, "An investigation into neural
net optimization via Hessian eigenvalue density" (2019).

Derived quantities and their errors. Every run is one independent draw of every linear functional of the
measure (its mass below 0, its mean, its mass above the bulk edge), so the spread over runs gives each a
standard error; intervals are ``mean -/+ q * se`` with ``q`` the Student-t quantile at ``level`` (widened for
the looks when the runs may stop early, "Stopping" below).

* ``negative_mass = mu_hat((-inf, 0))``, the fraction of negative eigenvalues. Two errors add up: the
  Monte Carlo error over the ``n_v`` runs (``negative_mass_se``, each run's mass one independent draw), and
  the quadrature's: with ``m < d`` a Gauss node near 0 stands for eigenvalues on both sides of it, which
  is the whole error when many eigenvalues sit near zero. The Chebyshev-Markov-Stieltjes inequalities bound
  it per run without assumptions: the run's true mass below 0 lies between its quadrature mass less the
  weight of the last node below 0 and its quadrature mass plus the weight of the first node above
  (no gap when the run exhausted its Krylov space). ``negative_mass_lo``/``_hi`` is the interval at
  ``level`` from those per-run bounds (their means less/plus ``q`` standard errors). The part only more
  steps ``m`` narrow is ``negative_mass_quad_err`` (half the mean gap between the bounds); the part more runs
  narrow, ``negative_mass_mc_err``, is ``q`` times the larger of ``negative_mass_se`` and the mean of the
  bounds' standard errors (the value's own is the larger where nodes near 0 move from run to run).
  ``negative_mass_err`` = the mean quadrature gap (the larger side) plus ``negative_mass_se``, so that it
  covers both parts.
* ``lambda_max``, ``lambda_min``: the extreme nodes over all runs, each with its run's residual bound
  ``beta_m |u_{m,i}|``; ``abs_ratio = |lambda_min| / lambda_max`` with ``abs_ratio_err`` the half-width of the
  interval spanned by both values moving within their bounds (``None`` if ``lambda_max`` may be <= 0).
  ``extremes_converged``: both bounds are below ``tol * max(|theta|, spread)``.
* bulk edge and outliers. **Bulk edge** ``b``: let ``t_med`` be the median of ``mu_hat``; the bulk is the
  connected stretch of grid points around ``t_med`` where ``phi >= edge_threshold * max(phi)`` (if ``t_med``
  itself is below it, the stretch ending just below ``t_med``); ``b`` is its upper end. Outliers are
  eigenvalues above ``b``, i.e. separated from the bulk by a gap where the smoothed density falls below
  the threshold. ``outliers`` = the largest number of Ritz values above ``b`` in any run: a certified
  lower bound on ``#{lambda > b}`` (Cauchy interlacing: the j-th largest Ritz value never exceeds the j-th
  largest eigenvalue), exact once Lanczos has resolved each outlier; it counts a repeated eigenvalue once.
  ``outliers_mass = d mu_hat((b, inf))`` counts multiplicity, with a standard error over the runs and the
  interval ``outliers_mass_lo``/``_hi``.
* ``trace = d mu_hat`` mean (Hutchinson with the same Rademacher starts), its standard error ``trace_err`` and
  the interval ``trace_lo``/``_hi``.

Stopping (``rel_tol``, default 0.2; 0 runs all ``n_v`` starts as before). The runs are looked at after each
start from the ``min_n_v``-th (default 3, so that a spread exists) to the ``n_v``-th, and stop at the first
look where every statistic named in ``stop_on`` (default the negative mass) has a Monte Carlo half-width ``e``
at most ``max(rel_tol * max(|value|, quad), floor)``: ``quad`` the part of its interval more runs cannot
narrow (the negative mass's ``negative_mass_quad_err``; 0 for the trace and the outlier mass) and ``floor``
``mass_tol`` for the negative mass (a fraction of all eigenvalues, for masses near 0), 0 otherwise. ``m`` is
unchanged. A plain Student-t interval at a data-chosen look covers less than its level (simulated, looks at
3..10 starts, nominal 0.95: 0.91 for normal draws, 0.86 for skewed ones), so with stopping on, every look's
``q`` is that of a repeated confidence interval (:mod:`geomprobe.stats.sequential`): the intervals hold at
all looks at once with probability ``level``, hence at the stop whatever the rule, at the price of ``q`` =
3.01 instead of 2.26 at the tenth start (3.65 instead of 2.57 at the sixth). The point estimates at a stop
are those of ``n_v`` equal to the starts used, with ``rel_tol=0`` (same seed, same starts).

Recorded: ``n_v`` (starts used), ``n_v_max``, ``hvps`` (spent), ``budget`` (``n_v_max * min(m, d)``, the cap),
``stopped_early``, ``precision_met`` (every ``stop_on`` statistic met its tolerance; True with ``rel_tol=0``),
``converged`` (``extremes_converged`` and ``precision_met``), ``interval_q`` (the ``q`` of the reported
intervals) and ``stop_on``.

First start from spectrum's run. When the Landscape holds a seeded cold Lanczos run from density's own
``seed`` (``spectrum``'s, or ``saddle``'s or ``precond``'s raw run, in full memory; :mod:`.shared` finds it
by its start), density's first start is that run's start ``u``, the unit Gaussian vector the seed's first
number seeds, and its other starts are the Rademacher vectors of the following numbers, exactly the starts 2,
3, ... of a call without it. The first start's ``min(m, d)`` steps are the run's first ones (the same
recurrence from the same vector): when the run took at least that many (or exhausted its Krylov space)
density reads them off its tridiagonal for no HVP (``first_start`` is ``"taken"``, ``shared``/``shared_hvps``
name the run and what it cost its metric, ``hvps`` counts the other starts only); when it stopped earlier on
its bounds, density runs ``u`` to ``min(m, d)`` steps itself (``"rerun"``, ``min(m, d)`` HVPs, nothing
received). A warm-started run, a run with a given generator (no key names its randomness), one from another
seed or in bounded memory (``max_basis``) is never kept there, and a call with its own ``generator`` or on a
sharded Landscape looks for none. Why the estimates and intervals stay what they claim:

* Same rule, whatever the run. The first start is the ``min(m, d)``-step Gauss rule of ``u`` in both cases, so
  its law does not depend on how long the run was. Taking a short run's nodes instead would mix rules of
  different degrees, whose negative masses differ systematically (gpt2-tiny, fp32: 0.69 below 0 from
  spectrum's 38 nodes against ~0.25 from 80; the half-width at three starts tripled and the probe ran all 10
  starts instead of 3), and falling back to a Rademacher start when the run is short would select ``u`` by
  its own stopping time (a run stops early where its start sits well in the extreme eigenvectors), which
  biases every statistic. Whether a run is there at all depends on the metrics and options of the probe, not
  on ``u``.
* Independence. ``u`` comes from the seed's first number and the other starts from the later ones, as
  density's own starts always did: independent as before.
* Unbiasedness. ``u = g / |g|`` is uniform on the sphere, so ``E[u u^T] = I / d``, as for a Rademacher ``z /
  sqrt(d)``: the run's measure ``mu_u = sum_j (q_j^T u)^2 delta(lambda_j)`` has the spectral measure as its
  mean, so its trace sample ``d sum_i w_i theta_i = d u^T H u`` is unbiased and its Chebyshev-Markov-Stieltjes
  bounds, which hold for every start, bracket the true negative mass in expectation.
* Coverage. The draws are independent with the same mean (the trace, the masses of ``mu_u``) but the first
  one's variance differs (the trace: ``2d/(d+2) (||H||_F^2 - tr(H)^2/d)`` against the Rademacher ``2
  (||H||_F^2 - sum_i H_ii^2)``). For independent draws with a common mean ``E[s^2] = (1/n) sum sigma_i^2 = n
  Var(mean)``: the standard error still estimates the mean's spread without bias, and draws whose means
  differ (the negative mass's bounds) only widen it. What remains is the normal approximation of a mean of
  terms not identically distributed, one of ``n`` (at the extreme, ``n - 1`` equal draws and one off by
  ``e``, the mean is off by ``e/n`` and its standard error is ``|e|/n``, so any ``q >= 1`` covers); the
  repeated intervals keep their level on that basis as before (``tests/test_density_shared.py``: coverage of
  exact negative masses and traces over many seeds with the first start taken).

Cost: at most ``n_v * min(m, d)`` HVPs (``budget``; ``(n_v - 1) * min(m, d)`` with a first start taken).
The grid and density are numpy arrays under ``grid`` and ``density`` (named in ``arrays``, for a sidecar
file); everything else is JSON-ready.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError
from ..linalg.device_draw import drawn_on_device, draws_elsewhere
from ..linalg.lanczos import lanczos
from ..linalg.ritz import ritz_pairs
from ..linalg.slq import SLQResult, slq_density
from ..linalg.space import VectorSpace
from ..linalg.vectors import device_generator, rademacher
from ..stats.sequential import repeated_t
from ._budget import check_rel_tol
from ._common import checked, half_width, resolve_generator, selective_fits
from .registry import register
from .shared import Reuse
from .spectrum import vector_device

__all__ = ["STATISTICS", "bulk_edge", "density"]


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


STATISTICS = ("negative_mass", "trace", "outliers_mass")


@dataclass(frozen=True)
class _Run:
    """One Lanczos run's quadrature (nodes ascending, float64 on the host) and what each statistic draws from it."""

    theta: np.ndarray
    weights: np.ndarray
    bounds: np.ndarray      # residual bound of each node
    neg: float              # quadrature mass below 0
    neg_lo: float           # Chebyshev-Markov-Stieltjes bounds on the run's true mass below 0
    neg_hi: float
    trace: float            # d * sum w theta = z^T H z for a Rademacher start
    steps: int
    matvecs: int
    received: bool = False  # another metric's run (module docstring), not spent here


def _run(r: Any, d: int, m: int) -> _Run:
    theta, w = r.ritz_values.double().cpu().numpy(), (r.U[0, :] ** 2).double().cpu().numpy()
    lo, hi = _negative_mass_bounds(theta, w, exact=r.steps < m or r.steps == d)
    return _Run(theta, w, r.bounds.double().cpu().numpy(), float(w[theta < 0].sum()), lo, hi,
                float(d * (w * theta).sum()), int(r.steps), int(r.matvecs))


def _taken_run(r: Any, m: int, d: int) -> _Run | None:
    """The first ``min(m, d)`` steps of another metric's Lanczos run as one of density's starts (module
    docstring, "First start"), or None when it stopped earlier without exhausting its Krylov space.

    The run's tridiagonal's leading ``n x n`` block and its ``n``-th ``beta`` are what an ``n``-step run from
    the same start computes, so the Gauss rule, residual bounds and exactness are those of :func:`_run` on
    density's own run from that start; no HVP."""
    if not (isinstance(getattr(r, "alpha", None), torch.Tensor) and isinstance(getattr(r, "beta", None), torch.Tensor)
            and isinstance(getattr(r, "steps", None), int) and r.steps >= 1 and not getattr(r, "restarts", 0)
            and len(r.alpha) == len(r.beta) == r.steps):
        raise ConfigurationError(
            f"density's first_run must be a plain Lanczos run of the Hessian (a LanczosResult of "
            f"geomprobe.linalg.lanczos without thick restarts) from a random start independent of density's "
            f"other starts; got {type(r).__name__}"
        )
    n = min(r.steps, m, d)
    alpha, beta = r.alpha[:n].tolist(), r.beta[:n].tolist()
    theta, U, bounds, exhausted = ritz_pairs((alpha, beta[:-1]), beta[-1], "residual", d)
    if n < min(m, d) and not exhausted:
        return None
    theta, w = theta.double().cpu().numpy(), (U[0, :] ** 2).double().cpu().numpy()
    lo, hi = _negative_mass_bounds(theta, w, exact=n < m or n == d)
    return _Run(theta, w, bounds.double().cpu().numpy(), float(w[theta < 0].sum()), lo, hi,
                float(d * (w * theta).sum()), n, 0, received=True)


def _interval(x: np.ndarray, q: float | None, lo: float = -math.inf, hi: float = math.inf
              ) -> tuple[float, float | None, float | None, float | None]:
    """Mean, standard error and the interval ``mean -/+ q se`` clipped to ``[lo, hi]`` (None without a spread)."""
    mean, se = _mean_se(x)
    if se is None or q is None:
        return mean, se, None, None
    return mean, se, max(lo, mean - q * se), min(hi, mean + q * se)


def _shape(runs: list[_Run], d: int, grid_size: int, sigma2: float | None, edge_threshold: float) -> dict:
    """The smoothed density, its bulk edge and each run's mass above it (``d`` times: eigenvalue counts)."""
    slq = SLQResult([torch.from_numpy(r.theta) for r in runs], [torch.from_numpy(r.weights) for r in runs],
                    sum(r.matvecs for r in runs))
    grid, phi, s2 = slq_density(slq, grid_size=grid_size, sigma2=sigma2)
    grid, phi = grid.numpy(), phi.numpy()
    t_med = _weighted_median(np.concatenate([r.theta for r in runs]), np.concatenate([r.weights for r in runs]))
    edge = bulk_edge(grid, phi, t_med, edge_threshold)
    return {"grid": grid, "phi": phi, "sigma2": float(s2), "edge": edge,
            "outliers_mass": np.array([d * r.weights[r.theta > edge].sum() for r in runs])}


def _mc_err(q: float | None, se: float | None, lo_se: float | None, hi_se: float | None) -> float | None:
    """The negative mass's Monte Carlo half-width: ``q`` times the larger of the value's standard error and the
    mean of its bounds' (the interval's own part; the value's, larger where nodes near 0 move from run to run)."""
    if q is None or se is None:
        return None
    return q * max(se, (lo_se + hi_se) / 2)


def _precision(runs: list[_Run], q: float, stop_on: tuple[str, ...], rel_tol: float, mass_tol: float,
               outliers_mass: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """Per statistic of ``stop_on``: (Monte Carlo half-width, the tolerance it must meet) (module docstring)."""
    out = {}
    if "negative_mass" in stop_on:
        lo, hi = np.array([r.neg_lo for r in runs]), np.array([r.neg_hi for r in runs])
        neg, se = _mean_se(np.array([r.neg for r in runs]))
        quad = float(hi.mean() - lo.mean()) / 2
        out["negative_mass"] = (_mc_err(q, se, _mean_se(lo)[1], _mean_se(hi)[1]), max(rel_tol * max(neg, quad), mass_tol))
    if "trace" in stop_on:
        tr, se = _mean_se(np.array([r.trace for r in runs]))
        out["trace"] = (q * se, rel_tol * abs(tr))
    if "outliers_mass" in stop_on:
        om, se = _mean_se(outliers_mass)
        out["outliers_mass"] = (q * se, rel_tol * abs(om))
    return out


def _check_options(n_v: Any, m: Any, grid_size: Any, edge_threshold: Any, min_n_v: Any, mass_tol: Any,
                   level: Any, stop_on: Any) -> tuple[str, ...]:
    def integer(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def real(x: Any) -> bool:
        return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)

    if not (integer(n_v) and integer(m) and integer(grid_size) and n_v >= 1 and m >= 1 and grid_size >= 2
            and real(edge_threshold) and 0 < edge_threshold < 1):
        raise ConfigurationError(
            f"density needs n_v >= 1, m >= 1, grid_size >= 2 and 0 < edge_threshold < 1; got n_v={n_v!r}, "
            f"m={m!r}, grid_size={grid_size!r}, edge_threshold={edge_threshold!r}"
        )
    if not (integer(min_n_v) and min_n_v >= 3):
        raise ConfigurationError(
            f"density needs an integer min_n_v >= 3 (the starts before the first look: fewer leave no usable "
            f"spread), got min_n_v={min_n_v!r}"
        )
    if not (real(mass_tol) and mass_tol >= 0):
        raise ConfigurationError(
            f"density needs a finite mass_tol >= 0 (the negative mass's absolute tolerance, a fraction of all "
            f"eigenvalues), got mass_tol={mass_tol!r}"
        )
    if not (real(level) and 0 < level < 1):
        raise ConfigurationError(f"density needs 0 < level < 1 (the intervals' confidence), got level={level!r}")
    names = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on) if isinstance(stop_on, (list, tuple)) else None
    if not names or any(s not in STATISTICS for s in names):
        raise ConfigurationError(
            f"density's stop_on names the statistics that must meet rel_tol, one or more of "
            f"{', '.join(STATISTICS)} (on the command line joined by +); got stop_on={stop_on!r}"
        )
    return tuple(dict.fromkeys(names))


@register("density", cost="at most n_v * m HVPs (10 x 80 = 800 by default; one start fewer when spectrum's Lanczos "
          "run of the same seed took m steps or more: its first start); after min_n_v (3) starts it may stop earlier "
          "once the stop_on statistics' Monte Carlo half-widths meet rel_tol (0.2)",
          after=("spectrum", "saddle", "precond"))
def density(
    land: Any,
    *,
    n_v: int = 10,
    m: int = 80,
    rel_tol: float = 0.2,
    mass_tol: float = 0.01,
    min_n_v: int = 3,
    stop_on: str | Sequence[str] = "negative_mass",
    level: float = 0.95,
    grid_size: int = 10_000,
    sigma2: float | None = None,
    edge_threshold: float = 1e-4,
    tol: float = 1e-3,
    seed: int = 0,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
    first_run: Any = None,
) -> dict:
    """SLQ spectral density with negative mass, |lambda_min|/lambda_max and the outliers above the bulk.

    Args:
        land: the Landscape.
        n_v: Lanczos runs (random starts), at most; errors shrink as 1/sqrt(runs).
        m: steps per run (moments up to 2m - 1 match); capped at ``d``.
        rel_tol: stop at the first look (module docstring, "Stopping") where every ``stop_on`` statistic's
            Monte Carlo half-width is at most ``rel_tol`` times its value (or its quadrature half-gap); 0 runs
            all ``n_v``. The default 0.2 resolves a 1.5x change ((1 + 0.2) / (1 - 0.2)) between two probes,
            the scale on which a negative mass or outlier mass moves along training.
        mass_tol: the negative mass's tolerance is never below this absolute one (a fraction of all
            eigenvalues), so a mass near 0 can stop too.
        min_n_v: starts before the first look (>= 3).
        stop_on: which of ``negative_mass``, ``trace``, ``outliers_mass`` must meet ``rel_tol`` (one name or a
            list). The trace's single-start spread on network Hessians is of the order of the trace itself
            (outliers dominate ``||H||_F``), so asking for it usually runs all ``n_v``; the ``trace`` metric
            measures it for fewer HVPs.
        level: confidence of the reported intervals.
        grid_size, sigma2: the density grid and the Gaussian smoothing variance (the default of
            docs/metrics.md#density if None).
        edge_threshold: relative density below which the bulk ends (module docstring).
        tol: relative residual bound under which the extremes count as converged.
        seed, generator: the randomness (Rademacher starts; the first one Gaussian after a run from the seed).
        basis_device: where the Lanczos basis lives (``"cpu"``: host memory; see krylov.lanczos).
        first_run: a :class:`~geomprobe.linalg.lanczos.LanczosResult` whose first ``min(m, d)`` steps are
            the first start (module docstring, "First start"), as density takes spectrum's run of the same seed
            from the Landscape by itself; it must have taken that many steps (or exhausted its Krylov space),
            and the caller answers for its start being random, cold and independent of the seed's numbers
            after the first (which seed the other starts). None: the run kept on the Landscape, if any.

    Returns the keys of the module docstring: ``grid``, ``density`` (numpy), ``arrays``, ``sigma2``,
    ``negative_mass(_err, _se, _lo, _hi, _mc_err, _quad_err)``, ``lambda_max(_err)``, ``lambda_min(_err)``,
    ``abs_ratio(_err)``, ``bulk_edge``, ``outliers``, ``outlier_values``, ``outliers_mass(_err, _lo, _hi)``,
    ``trace(_err, _lo, _hi)``, ``converged``, ``extremes_converged``, ``precision_met``, ``stopped_early``,
    ``n_v``, ``n_v_max``, ``m``, ``hvps``, ``budget``, ``interval_q``, ``stop_on``; ``first_start``
    (``"taken"`` or ``"rerun"``) where the first start is another run's, and ``shared``/``shared_hvps`` where
    it was taken from the Landscape.

    Cost: at most ``n_v * min(m, d)`` HVPs, ``min(m, d)`` per start used, none for a first start taken.
    Errors: the intervals cover at ``level`` (at the stop too, by their widening for the looks) as far as the
    runs' spread is that of normal draws; the negative mass's adds the quadrature's deterministic bounds.

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> model = nn.Linear(4, 1, bias=False).double()
    >>> X = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(4, 1, dtype=torch.float64)))
    >>> out = density(land, n_v=4, grid_size=500)   # H = diag(0.5, 2, 4.5, 8), recovered exactly (m >= d)
    >>> round(out["lambda_max"], 9), round(out["lambda_min"], 9), out["negative_mass"], out["hvps"]
    (8.0, 0.5, 0.0, 12)
    >>> out["n_v"], out["stopped_early"], out["budget"]   # every start draws the same mass: 3 are enough
    (3, True, 16)
    >>> out["density"].shape, round(out["trace"], 9)                 # tr H = 15
    ((500,), 15.0)
    """
    stop_on = _check_options(n_v, m, grid_size, edge_threshold, min_n_v, mass_tol, level, stop_on)
    rel_tol = check_rel_tol("density", rel_tol)
    gen = resolve_generator(seed, generator)
    mv = checked(land.hvp)
    d = land.dim
    reuse = Reuse(land, "density")
    runs: list[_Run] = []
    first, first_start = None, ""
    if first_run is not None:
        first = _taken_run(first_run, m, d)
        if first is None:
            raise ConfigurationError(
                f"density's first_run took {first_run.steps} steps, fewer than m={m}, and did not exhaust its "
                f"Krylov space: run it to m steps (lanczos(..., tol=0, max_iter=m)) or leave first_run out"
            )
    elif generator is None and getattr(land, "vector_space", None) is None:
        key = reuse.longest_from(seed)  # a seeded cold run from this seed's start (spectrum's), if any
        if key is not None:
            first = _taken_run(reuse.held(key), m, d)
            if first is not None:
                reuse.find(key)  # received: its metric paid for it
            else:  # it stopped short of m: the same start, run here (module docstring, "Same rule")
                # drawn as spectrum's start is drawn (krylov_start.start_basis: host vectors on the model's
                # accelerator, else a large host vector by threads, VectorSpace)
                where = vector_device(land)
                u = (drawn_on_device(d, gen, land.dtype, land.device, unit=True) if draws_elsewhere(where, land.device)
                     else VectorSpace(d).gaussian(gen, land.dtype, where))
                r = lanczos(mv, d, tol=0.0, max_iter=m, v0=u.to(land.device), dtype=land.dtype, device=land.device,
                            basis_device=basis_device, selective=selective_fits(land))
                del u
                runs.append(_run(r, d, m))
                first_start = "rerun"
    if first is not None:
        runs.append(first)
        first_start = "taken"
        device_generator(gen)  # the number that seeded the run's start: the other starts use the next ones
    # the looks, and each look's multiplier of the standard error: repeated intervals when the runs may stop
    looks = tuple(range(min(min_n_v, n_v), n_v + 1)) if rel_tol > 0 else (n_v,)
    qs = repeated_t(looks, level) if looks[0] >= 2 else {}
    met = rel_tol == 0
    while True:
        n = len(runs)
        if rel_tol > 0 and n in qs:
            om = (_shape(runs, d, grid_size, sigma2, edge_threshold)["outliers_mass"]
                  if "outliers_mass" in stop_on else None)
            met = all(e <= target for e, target in _precision(runs, qs[n], stop_on, rel_tol, mass_tol, om).values())
            if met:
                break
        if n >= n_v:
            break
        z = rademacher(d, gen, land.dtype, land.device)
        r = lanczos(mv, d, tol=0.0, max_iter=m, v0=z, dtype=land.dtype, device=land.device, basis_device=basis_device,
                    selective=selective_fits(land))
        runs.append(_run(r, d, m))
    n = len(runs)
    own = [r for r in runs if not r.received]
    q = qs.get(n)
    shape = _shape(runs, d, grid_size, sigma2, edge_threshold)
    th = [r.theta for r in runs]

    neg, neg_se = _mean_se(np.array([r.neg for r in runs]))
    lo_b, hi_b = np.array([r.neg_lo for r in runs]), np.array([r.neg_hi for r in runs])
    gap = max(neg - float(lo_b.mean()), float(hi_b.mean()) - neg)
    _, lo_se, neg_lo, _ = _interval(lo_b, q, lo=0.0)
    _, hi_se, _, neg_hi = _interval(hi_b, q, hi=1.0)
    neg_lo, neg_hi = (0.0 if neg_lo is None else neg_lo), (1.0 if neg_hi is None else neg_hi)
    mc_err = _mc_err(q, neg_se, lo_se, hi_se)
    tr, tr_err, tr_lo, tr_hi = _interval(np.array([r.trace for r in runs]), q)
    om, om_err, om_lo, om_hi = _interval(shape["outliers_mass"], q, lo=0.0)

    l_hi = max(range(n), key=lambda i: th[i][-1])
    l_lo = min(range(n), key=lambda i: th[i][0])
    lmax, lmax_err = float(th[l_hi][-1]), float(runs[l_hi].bounds[-1])
    lmin, lmin_err = float(th[l_lo][0]), float(runs[l_lo].bounds[0])
    spread = lmax - lmin
    extremes = all(e <= tol * max(abs(v), spread) for v, e in ((lmax, lmax_err), (lmin, lmin_err)))
    ratio = ratio_err = None
    if lmax > 0:
        ratio = abs(lmin) / lmax
        if lmax - lmax_err > 0:
            lo = max(0.0, abs(lmin) - lmin_err) / (lmax + lmax_err)
            hi = (abs(lmin) + lmin_err) / (lmax - lmax_err)
            ratio_err = half_width(ratio, lo, hi)

    edge = shape["edge"]
    counts = [int((t > edge).sum()) for t in th]
    best = int(np.argmax(counts))
    steps = min(m, d)
    return {
        "grid": shape["grid"],
        "density": shape["phi"],
        "arrays": ["grid", "density"],
        "sigma2": shape["sigma2"],
        "negative_mass": neg,
        "negative_mass_err": gap + (neg_se or 0.0),
        "negative_mass_se": neg_se,
        "negative_mass_lo": neg_lo,
        "negative_mass_hi": neg_hi,
        "negative_mass_mc_err": mc_err,
        "negative_mass_quad_err": float(hi_b.mean() - lo_b.mean()) / 2,
        "lambda_max": lmax,
        "lambda_max_err": lmax_err,
        "lambda_min": lmin,
        "lambda_min_err": lmin_err,
        "abs_ratio": ratio,
        "abs_ratio_err": ratio_err,
        "bulk_edge": edge,
        "outliers": counts[best],
        "outlier_values": [float(v) for v in th[best][th[best] > edge][::-1]],
        "outliers_mass": om,
        "outliers_mass_err": om_err,
        "outliers_mass_lo": om_lo,
        "outliers_mass_hi": om_hi,
        "trace": tr,
        "trace_err": tr_err,
        "trace_lo": tr_lo,
        "trace_hi": tr_hi,
        "converged": bool(extremes and met),
        "extremes_converged": bool(extremes),
        "precision_met": bool(met),
        "stopped_early": bool(met and rel_tol > 0 and n < n_v),
        "stop_on": list(stop_on),
        "interval_q": q,
        "n_v": n,
        "n_v_max": int(n_v),
        "m": int(max(r.steps for r in own)) if own else steps,
        "hvps": int(sum(r.matvecs for r in own)),
        "budget": int((n_v - (len(runs) - len(own))) * steps),
        **({"first_start": first_start} if first_start else {}),
        **reuse.fields(),
    }
