"""Repeated confidence intervals: intervals that keep their level at whichever look a sequential estimator
stops (Jennison & Turnbull, "Interim analyses: the repeated confidence interval approach", JRSS B 1989).

An estimator that looks at its running mean after ``n_1 < n_2 < ... < n_K`` independent draws and stops once
the interval is tight enough picks the look where the draws happened to agree: a plain Student-t interval at
that look covers less than its level (with looks at every draw from 3 to 10 and a relative tolerance, 0.91
for normal draws and 0.86 for skewed ones, at a nominal 0.95; ``benchmarks/RESULTS.md`` §6). The fix used
here widens every look's interval to the constant ``c`` with

    P( max_k |S_{n_k}| / sqrt(n_k) <= c ) = level,    S_n a random walk of standard normal steps,

so that the intervals hold *simultaneously* at all looks with probability ``level`` and hence at any stop,
whatever rule chose it. With an unknown variance each look uses the Student-t quantile of the same nominal
tail probability ``2 (1 - Phi(c))`` at ``n_k - 1`` degrees of freedom (their section 3). One look gives the
plain interval. The probability is computed by integrating the walk's density look to look on a grid
(Armitage, McPherson, Rowe 1969) and ``c`` by bisection: pure numbers, no draws.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigurationError
from .student import t_quantile

__all__ = ["repeated_t", "repeated_z"]

_GRID = 401  # points per look: the probability is exact to ~1e-6, far below what moves c's third digit


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _inside(looks: tuple[int, ...], c: float) -> float:
    """``P(|S_{n_k}| <= c sqrt(n_k) for every look k)`` by the look-to-look recursion on a grid."""
    x = np.linspace(-c * math.sqrt(looks[0]), c * math.sqrt(looks[0]), _GRID)
    f = np.exp(-x * x / (2 * looks[0])) / math.sqrt(2 * math.pi * looks[0])
    for prev, n in itertools.pairwise(looks):
        w = np.full(_GRID, x[1] - x[0])  # trapezoid weights of the previous grid
        w[[0, -1]] *= 0.5
        y = np.linspace(-c * math.sqrt(n), c * math.sqrt(n), _GRID)
        step = n - prev
        kernel = np.exp(-(y[:, None] - x[None, :]) ** 2 / (2 * step)) / math.sqrt(2 * math.pi * step)
        f, x = kernel @ (w * f), y
    w = np.full(_GRID, x[1] - x[0])
    w[[0, -1]] *= 0.5
    return float(w @ f)


@functools.lru_cache(maxsize=256)
def _repeated_z(looks: tuple[int, ...], level: float) -> float:
    if len(looks) == 1:
        return math.sqrt(2.0) * _erfinv(level)
    lo = math.sqrt(2.0) * _erfinv(level)                               # one look
    hi = math.sqrt(2.0) * _erfinv(1 - (1 - level) / len(looks))         # Bonferroni over all looks
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _inside(looks, mid) < level else (lo, mid)
        if hi - lo < 1e-7:
            break
    return 0.5 * (lo + hi)


def _erfinv(p: float) -> float:
    """``erf^{-1}(p)`` for ``0 < p < 1`` by bisection on ``math.erf`` (no scipy)."""
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _check(looks: Sequence[int], level: float) -> tuple[int, ...]:
    ok = (len(looks) >= 1 and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in looks)
          and all(int(a) < int(b) for a, b in itertools.pairwise(looks)) and int(looks[0]) >= 1)
    if not ok or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ConfigurationError(
            f"repeated intervals need strictly increasing positive integer looks and 0 < level < 1; got "
            f"looks={list(looks)!r}, level={level!r}"
        )
    return tuple(int(n) for n in looks)


def repeated_z(looks: Sequence[int], level: float = 0.95) -> float:
    """The constant ``c`` of normal repeated confidence intervals at sample sizes ``looks`` (module docstring).

    Cost: ``O(len(looks) * 401^2)`` flops per bisection step, cached per (looks, level). Error: ``c`` to 1e-6.

    >>> round(repeated_z([10]), 3), round(repeated_z([5, 10]), 3)   # one look; Pocock's constant for two
    (1.96, 2.178)
    """
    return _repeated_z(_check(looks, level), float(level))


def repeated_t(looks: Sequence[int], level: float = 0.95) -> dict[int, float]:
    """Per look ``n``, the multiplier of the standard error ``s / sqrt(n)`` of the mean of ``n`` draws: the
    Student-t quantile (``n - 1`` degrees of freedom) of the nominal tail probability of :func:`repeated_z`.

    One look gives the plain Student-t quantile. Looks of a single draw have no standard error and are refused.

    >>> q = repeated_t([3, 4, 5, 6, 7, 8, 9, 10])
    >>> round(q[10], 2), round(repeated_t([10])[10], 2)   # the last look's interval is 1.33x the plain one
    (3.01, 2.26)
    """
    looks = _check(looks, level)
    if looks[0] < 2:
        raise ConfigurationError(f"repeated t intervals need at least 2 draws at every look, got looks={list(looks)}")
    c = _repeated_z(looks, float(level))
    tail = 1.0 - _phi(c)  # one side's nominal tail probability at every look
    return {n: t_quantile(1.0 - tail, n - 1) for n in looks}
