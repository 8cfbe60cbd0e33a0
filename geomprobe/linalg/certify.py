"""Certifying that a Lanczos run's extreme Ritz values are the extreme eigenvalues, not merely eigenvalues.

A residual bound ``||H y - theta y|| <= r`` says that *some* eigenvalue lies within ``r`` of ``theta``; it
cannot say that no eigenvalue lies beyond ``theta_max``, because an eigenvector the Krylov space has barely
seen leaves no trace in the residuals. What can be bounded is how much of the start vector an unseen
eigenvalue may hold, and a random start holds a share of every eigenvector that is unlikely to be tiny.

**The mass bound.** Let ``mu`` be the spectral measure of ``H`` seen from the unit start ``v_1`` (an atom
of mass ``||P_lambda v_1||^2`` at each eigenvalue). The basis vectors are ``v_i = phi_i(H) v_1`` for
polynomials ``phi_i`` orthonormal in ``L^2(mu)``, so by Cauchy-Schwarz every atom obeys
``mu({lambda}) <= 1 / K(lambda)`` with the Christoffel sum ``K(lambda) = sum_i phi_i(lambda)^2``. From the
decomposition ``H V = V S + beta v_{p+1} e_p^T`` (plain or thick-restarted) the sum has the closed form

    K(lambda) = psi(lambda)^2 (1 + sum_i r_i^2 / (lambda - theta_i)^2),
    psi(lambda) = prod_i (lambda - theta_i) * prod_{discarded} (lambda - theta_d) / prod_steps beta_j,

with ``theta_i`` the current Ritz values, ``r_i`` their residual norms, ``theta_d`` the Ritz values a thick
restart discarded and ``beta_j`` every step's residual norm (``psi`` is the polynomial of the residual
direction ``v_{p+1}``; the restart identity is the Schur complement of ``lambda - S``). Above every Ritz
value ever computed (and below) ``K`` grows monotonically, so ``U = min{lambda >= theta_max : K(lambda) >= 1/t}``
bounds every eigenvalue that holds mass ``>= t``. It needs no matvec: only the scalars of the run.

**The probability.** For a start drawn uniformly on the sphere (a normalized Gaussian) the component
``c = v_1^T q`` along a fixed unit vector ``q`` has density at most ``c_n = Gamma(n/2) / (sqrt(pi)
Gamma((n-1)/2))``, so ``P(c^2 < t) <= 2 sqrt(t) c_n``. Taking ``q`` the top eigenvector, ``lambda_max``
holds mass ``>= c^2``; choosing ``t`` with ``2 sqrt(t) c_n = risk`` gives ``P(lambda_max > U) <= risk``,
whatever ``H`` is (``H`` must not depend on the start). A start ``v_0 = a + s z / ||z||`` with a fixed part
``a`` and an independent random unit part of weight ``s`` (the warm start) has ``c`` with density at most
``c_n / s`` and norm at most ``||a|| + s``, so ``t`` shrinks by ``(s / (||a|| + s))^2``. The rule is the
a-posteriori form of the Kuczynski-Wozniakowski bound: it uses the run's own coefficients, so an
isolated eigenvalue is certified in a few steps and a dense bulk edge only as closely as the run resolves it.

Limits: one start vector sees one direction per eigenspace, so a repeated eigenvalue looks simple and the
``k``-th value (``k >= 2``) cannot be certified this way; the bound is exact up to the matvec's rounding
(the run's ``asymmetry``), like the residual bounds.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigurationError

__all__ = ["DEFAULT_RISK", "extreme_errors", "log_christoffel", "log_mass_threshold", "rounding_level", "start_threshold"]

# per end: the chance that a certified extreme is wrong. Each factor 10 asks K to grow by 100 more: on the
# tanh family of tests/test_spectrum_certified.py the certificate costs a median 6 extra HVPs at 1e-2,
# 9 at 1e-3 and 2 at 1e-1 (tol 1e-3).
DEFAULT_RISK = 1e-2


def log_mass_threshold(dim: int, risk: float, random_share: float = 1.0, fixed_norm: float = 0.0) -> float:
    """``log t``: with probability ``>= 1 - risk`` a fixed unit vector holds at least ``t`` of the start's mass.

    ``random_share`` is the weight ``s`` of the independent uniformly random unit component of the start
    vector, ``fixed_norm`` the norm of the rest (0 and 1 for a cold Gaussian start). Costs nothing.
    """
    if not (isinstance(risk, (int, float)) and 0.0 < risk < 1.0):
        raise ConfigurationError(f"risk must lie in (0, 1), the chance a certified extreme is wrong; got {risk!r}")
    if not 0.0 < random_share <= 1.0 or fixed_norm < 0:
        raise ConfigurationError(f"random_share must lie in (0, 1], got {random_share!r}")
    if dim < 3:
        c_n = 1.0  # n <= 2: P(|c| < s) <= (2/pi) arcsin(s) <= 2s on the circle, and |c| = 1 for n = 1
    else:
        c_n = math.exp(math.lgamma(dim / 2) - math.lgamma((dim - 1) / 2)) / math.sqrt(math.pi)
    s = risk * random_share / (2.0 * c_n * (fixed_norm + random_share))
    return 2.0 * math.log(s)


def rounding_level(dtype, norm: float) -> float:
    """``4 eps ||H||``: below this distance a Ritz value and an eigenvalue are the same number to the run
    (``eps`` of float32 for half-precision vectors, whose products accumulate in float32; their own
    rounding is larger and shows in the run's ``asymmetry``)."""
    import torch

    eps = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps
    return 4.0 * eps * max(norm, 0.0)


def start_threshold(dim: int, risk: float | None, cold: bool, v0_random: float) -> float | None:
    """``log t`` for a Lanczos start: a cold Gaussian start (``cold``), or a given one whose independent random
    unit part has weight ``v0_random`` beside a fixed part of norm ``<= 1``; None when nothing can be certified
    (``risk`` None, or a given start with no random part)."""
    if risk is None:
        return None
    if cold:
        return log_mass_threshold(dim, risk)
    if not (isinstance(v0_random, (int, float)) and 0.0 <= v0_random <= 1.0):
        raise ConfigurationError(f"v0_random must lie in [0, 1], the weight of v0's random unit part; got {v0_random!r}")
    if v0_random == 0:
        return None
    return log_mass_threshold(dim, risk, v0_random, 1.0)


def _log_k(lam: np.ndarray, theta: np.ndarray, resid: np.ndarray, discarded: np.ndarray, log_beta: float) -> np.ndarray:
    """``log K(lambda)`` for an array of ``lambda`` outside the hull of ``theta`` and ``discarded``."""
    with np.errstate(divide="ignore"):
        L = np.log(np.abs(lam[:, None] - theta[None, :]))  # (q, p), -inf where lambda is a Ritz value
        log_r = np.log(resid)
        D = np.log(np.abs(lam[:, None] - discarded[None, :])).sum(1) if discarded.size else np.zeros(len(lam))
    hit = np.isinf(L)
    Lf = np.where(hit, 0.0, L)
    Sf = Lf.sum(1)
    others_hit = hit.sum(1)[:, None] - hit  # hits among j != i
    # prod (lam - theta)^2 + sum_i r_i^2 prod_{j != i} (lam - theta_j)^2, in logs: a factor 0 drops its term
    term0 = np.where(hit.any(1), -np.inf, 2 * Sf)
    terms_i = np.where(others_hit == 0, 2 * log_r[None, :] + 2 * (Sf[:, None] - Lf), -np.inf)
    terms = np.concatenate([term0[:, None], terms_i], axis=1)
    return np.logaddexp.reduce(terms, axis=1) + 2 * D - 2 * log_beta


def _one_end(theta: np.ndarray, resid: np.ndarray, discarded: np.ndarray, log_beta: float, log_t: float,
             rho: float, limit: float = math.inf) -> float:
    """Certified distance from ``theta[-1]`` up to every eigenvalue holding mass ``>= t``; ``inf`` when the
    run's own data say the start holds less than ``t`` of the extreme (then no claim is made).

    ``K`` is evaluated only ``rho`` (rounding) or further from the Ritz values: closer, the residual of a
    converged Ritz value has no relative accuracy left and ``K`` is noise; ``rho`` is added to the result.
    ``limit``: only whether the distance is at most this matters (a stopping test): ``inf`` beyond it.
    """
    top = float(theta[-1])
    edge = max(top, float(discarded.max())) if discarded.size else top
    scale = max(float(theta[-1] - theta[0]), abs(top), float(resid.max()), 1e-300)
    target = -log_t
    # K at the outermost Ritz value is trustworthy while its residual is far above rounding: even an
    # eigenvalue there would hold less than t, so the start met the unlikely event the certificate excludes
    if resid[-1] > 1e3 * rho and _log_k(np.array([edge]), theta, resid, discarded, log_beta)[0] >= target:
        return math.inf
    base = edge + rho
    if _log_k(np.array([base]), theta, resid, discarded, log_beta)[0] >= target:
        return base - top + rho
    reach = limit - (base - top + rho)
    if reach <= 0 or (math.isfinite(reach) and _log_k(np.array([base + reach]), theta, resid, discarded,
                                                      log_beta)[0] < target):
        return math.inf  # K is monotone: nothing within the limit is certified
    # K is monotone above the edge: a geometric bracket, then a refinement
    steps = scale * 2.0 ** np.arange(-50, 40)
    vals = _log_k(base + steps, theta, resid, discarded, log_beta)
    above = np.nonzero(vals >= target)[0]
    if not above.size:
        return math.inf
    j = int(above[0])
    lo, hi = (0.0 if j == 0 else float(steps[j - 1])), float(steps[j])
    # three vectorized subdivisions: the upper end of the bracket, within 1/32^3 of its width (rounded up)
    for _ in range(3):
        grid = np.linspace(lo, hi, 33)[1:]
        ok = np.nonzero(_log_k(base + grid, theta, resid, discarded, log_beta) >= target)[0]
        first = int(ok[0]) if ok.size else len(grid) - 1
        lo, hi = (lo if first == 0 else float(grid[first - 1])), float(grid[first])
    return base - top + hi + rho


def extreme_errors(theta, resid, log_beta: float, log_t: float, *, discarded=None, exhausted: bool = False,
                   rounding: float = 0.0, which: str = "both",
                   limits: tuple[float, float] = (math.inf, math.inf)) -> tuple[float, float]:
    """``(e_min, e_max)``: ``lambda_min`` lies in ``[theta_min - e_min, theta_min]`` and ``lambda_max`` in
    ``[theta_max, theta_max + e_max]``, each with probability ``>= 1 - risk`` (``log_t`` from
    :func:`log_mass_threshold`); the other side of each interval is certain (Ritz values lie inside the
    spectrum).

    ``theta``: Ritz values (ascending), ``resid``: their residual norms ``beta |u_{p,i}|``, ``log_beta``: the
    sum of ``log beta_j`` over every step of the run, ``discarded``: Ritz values dropped at thick restarts.
    ``exhausted``: the Krylov space is invariant (or spans everything), so the extremes are Ritz values
    (``rounding``, ``rounding``). ``rounding``: the run's rounding level (:func:`rounding_level`), kept as a
    floor: the relations behind ``K`` hold for a matrix that far from ``H``.
    An end is ``inf`` (not certified) when its bound cannot be found or when even an eigenvalue at the
    outermost Ritz value would hold less than ``t``: the start is then visibly one of the unlucky ones,
    which keeps ``P(certified and wrong) <= risk``. ``which="largest"``/``"smallest"`` computes that end only
    (the other is ``inf``), and ``limits`` (``(l_min, l_max)``) answers only whether each end is within its
    limit (``inf`` when not), in one evaluation of ``K``: as a stopping test needs.
    Cost: no matvec; about a hundred evaluations of ``K`` over ``p`` values.
    """
    if exhausted:
        return rounding, rounding
    th = np.asarray(theta, dtype=np.float64).reshape(-1)
    r = np.asarray(resid, dtype=np.float64).reshape(-1)
    d = np.asarray(discarded if discarded is not None else [], dtype=np.float64).reshape(-1)
    if not (np.isfinite(th).all() and np.isfinite(r).all() and math.isfinite(log_beta)):
        return math.inf, math.inf
    e_max = _one_end(th, r, d, log_beta, log_t, rounding, limits[1]) if which != "smallest" else math.inf
    e_min = _one_end(-th[::-1], r[::-1], -d, log_beta, log_t, rounding, limits[0]) if which != "largest" else math.inf
    return e_min, e_max


def log_christoffel(result, lam) -> np.ndarray:
    """``log K(lambda)`` of a finished run (:class:`~geomprobe.linalg.ritz.LanczosResult`) at each ``lam``: an
    eigenvalue at ``lam`` holds at most ``1 / K(lam)`` of the start vector's mass (up to rounding within
    :func:`rounding_level` of a Ritz value). Costs no matvec."""
    if result.resid is None or not math.isfinite(result.log_beta):
        raise ConfigurationError("log_christoffel needs a Lanczos run with a finite residual (not exhausted)")
    return _log_k(np.atleast_1d(np.asarray(lam, dtype=np.float64)), result.ritz_values.double().numpy(),
                  result.resid.double().numpy(), np.asarray(result.discarded, dtype=np.float64),
                  float(result.log_beta))
