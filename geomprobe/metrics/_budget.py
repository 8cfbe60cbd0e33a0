"""How a budget of HVPs is split across parameter blocks by ``rmed`` and ``diagshare`` (docs/metrics.md#rmed,
docs/metrics.md#diagshare).

Private to the metrics. Pure arithmetic on block sizes: the rules live here, in one place, so that the
planned cost of a metric can be stated before any HVP is spent and tested against what it spends.

``rmed`` (:func:`plan_rmed`), in order of preference:

1. **exact**: the per-block layout of docs/metrics.md#rmed (every coordinate of a block up to ``exact_threshold``; ``k``
   sampled + ``top`` screened coordinates of a larger one; ``screen_samples`` Bekas probes shared) when its
   cost fits the budget, else ``k`` and ``top`` scaled down together, every block larger than ``k + top``
   sampled (``exact_threshold`` gives way), while that still buys at least ``min_k`` exact coordinates per
   sampled block. Every read entry is exact. Exact entries are preferred because packed reads of small
   networks are heavily contaminated (``benchmarks/packed_diagonal.py``): at the default budget this keeps
   models of up to ~35 blocks exact.
2. **packed**: otherwise. ``screen_samples`` HVPs go to the Bekas screen (if ``top > 0``), the rest to
   ``rows = (budget - screen) // signs`` rows read under ``signs`` sign patterns each; a row carries one
   coordinate of *every* block, so every block gets ``min(n_l, rows_sample)`` sampled coordinates and up to
   ``rows_cand`` screened candidates whatever the number of blocks. Rows are split between sampling and
   candidates in the ratio ``k : top``; when the rows can hold the largest block whole, every coordinate is
   read and neither screen nor candidates are needed. The first ``pilot`` (8) sampled rows are a **pilot**
   (``geomprobe.metrics._pilot``): read before the rest of the budget is committed, they measure the
   contamination; when it would leave most blocks' median intervals unbounded, the rest of the budget goes
   to the plan's ``fallback`` instead, else the packed reads continue from the pilot's rows.
3. **fallback** (:func:`plan_fallback`): the exact layout of 1. scaled down to what the pilot left, with as
   few as ``FALLBACK_MIN_K`` (6) exact coordinates per sampled block: the fewest for which a two-sided 95 %
   order-statistic interval of the median exists (``2 * 0.5**6 < 0.05``). The screen stays (it is what
   bounds the max) even when the scaled ``top`` rounds to 0, and what the layout leaves is a ``pool`` of
   candidates chosen across all sampled blocks by their screened upper bound.

``diagshare`` (:func:`plan_columns`): ``k_l = min(n_l, k, c)`` exact columns per block with the cap ``c``
the largest that fits the budget (water-filling: small blocks are taken whole, the rest share equally), the
columns left by rounding given one each to the largest unfinished blocks. Equal shares give every block's own
interval the same footing; the whole-model estimate weighs each stratum by ``n_l / k_l``.

Rounds (``rel_tol > 0``: stop once the whole-model interval is tight). ``diagshare`` then spends its plan in
*looks*, each a fixed amount of work whatever the budget, so that stopping at a look is the same estimator as
a budget that ends there (the budget only caps the last look): look ``j`` holds ``plan_columns(budget=B_j)``
columns per block (:func:`column_looks`), with ``B_1 = max(6 m, 64)`` (``m`` blocks: six columns each, below
which the intervals are known to undercover, docs/metrics.md#diagshare, so that no stop rests on them) and
steps of ``max(m, 64)``. The water-filling is monotone in the budget, so every look extends the previous one
in every block, and the split between blocks is the plan's at every look. (``rmed`` spends its whole plan: its
reads are shared with ``precond``, and on real networks its packed interval never met a tolerance early.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..errors import ConfigurationError

__all__ = ["FALLBACK_MIN_K", "MIN_COLUMNS", "ROUND_HVPS", "RmedPlan", "check_rel_tol", "column_looks",
           "fallback_budget", "plan_columns", "plan_fallback", "plan_rmed", "scaled_candidates_hvps"]

ROUND_HVPS = 64  # at least this many columns per look of diagshare's rounds
MIN_COLUMNS = 6  # columns per block at diagshare's first look: below it the intervals undercover
FALLBACK_MIN_K = 6  # exact entries per sampled block of rmed's fallback: the fewest with a 95 % median interval


@dataclass(frozen=True)
class RmedPlan:
    """What ``rmed`` will compute: the mode, its per-block sizes and the most HVPs it may spend (``hvps``).

    A packed plan with a ``fallback`` spends either ``packed_hvps`` (the pilot's rows are its first sampled
    rows) or ``signs * pilot + fallback.hvps``, as its pilot decides; ``hvps`` is the larger."""

    mode: str                 # "exact" or "packed"
    exact_blocks: tuple[bool, ...]
    k: int                    # exact mode: sampled coordinates per large block
    top: int                  # exact mode: screened candidates per large block
    rows_sample: int = 0      # packed mode: rows of sampled coordinates (one per block per row)
    rows_cand: int = 0        # packed mode: rows of screened candidates
    screen: int = 0           # Bekas probes
    signs: int = 2
    hvps: int = 0
    threshold: int = -1       # exact mode: blocks up to max(threshold, k + top) are read whole (-1: exact_threshold)
    pool: int = 0             # exact mode: candidates chosen across all sampled blocks (the fallback's leftover)
    pilot: int = 0            # packed mode: the first sampled rows, read before the rest is committed
    fallback: RmedPlan | None = None  # packed mode: the exact plan of the budget the pilot leaves
    packed_hvps: int = 0      # packed mode: what the packed reads spend, pilot included


def _exact_cost(sizes: Sequence[int], small: Sequence[bool], k: int, top: int, screen_samples: int) -> int:
    n_large = sum(1 for s in small if not s)
    screen = screen_samples if n_large and top > 0 else 0
    return sum(n for n, s in zip(sizes, small) if s) + n_large * (k + top) + screen


def plan_rmed(sizes: Sequence[int], *, budget: int, exact_threshold: int, k: int, top: int, screen_samples: int,
              signs: int, min_k: int, pilot: int = 0) -> RmedPlan:
    """The cheapest faithful plan for blocks of ``sizes`` within ``budget`` HVPs (module docstring)."""
    small = tuple(n <= max(exact_threshold, k + top) for n in sizes)
    cost = _exact_cost(sizes, small, k, top, screen_samples)
    if cost <= budget:
        return RmedPlan("exact", small, k, top, screen=screen_samples if not all(small) and top > 0 else 0,
                        signs=signs, hvps=cost)
    # Scale k and top together and sample every block larger than the scaled layout (exact_threshold gives
    # way: whole small blocks are a luxury the budget no longer buys).
    def scaled(f: float) -> tuple[int, int, tuple[bool, ...], int]:
        kf, tf = max(3, int(k * f)), int(top * f)
        sm = tuple(n <= kf + tf for n in sizes)
        return kf, tf, sm, _exact_cost(sizes, sm, kf, tf, screen_samples)

    lo, hi = 0.0, 1.0
    for _ in range(40):
        f = (lo + hi) / 2
        lo, hi = (f, hi) if scaled(f)[3] <= budget else (lo, f)
    kf, tf, sm, cost = scaled(lo)
    if (kf >= min_k or all(sm)) and cost <= budget:
        return RmedPlan("exact", sm, kf, tf, screen=screen_samples if not all(sm) and tf > 0 else 0, signs=signs,
                        hvps=cost, threshold=0)
    screen = screen_samples if top > 0 else 0
    rows = (budget - screen) // signs
    if rows < 3:
        raise ConfigurationError(
            f"rmed's budget hvps={budget} buys fewer than 3 packed rows after {screen} screening probes at "
            f"signs={signs}; raise hvps to at least {screen + 3 * signs}, or lower screen_samples or signs"
        )
    largest = max(sizes)
    if largest <= rows:
        # every coordinate of every block fits in the rows: read them all, nothing is left to screen
        packed = RmedPlan("packed", tuple(False for _ in sizes), 0, 0, largest, 0, 0, signs, signs * largest)
    else:
        rows_cand = min(max(1, round(rows * top / (k + top))), rows - 3) if top > 0 else 0
        rows_sample = min(rows - rows_cand, largest)
        packed = RmedPlan("packed", tuple(False for _ in sizes), 0, 0, rows_sample, rows_cand, screen, signs,
                          screen + signs * (rows_sample + rows_cand))
    n_pilot = min(pilot, packed.rows_sample)
    fallback = (plan_fallback(sizes, budget=budget - signs * n_pilot, k=k, top=top, screen_samples=screen_samples)
                if n_pilot else None)
    most = max(packed.hvps, signs * n_pilot + (fallback.hvps if fallback else 0))
    return replace(packed, pilot=n_pilot, fallback=fallback, packed_hvps=packed.hvps, hvps=most)


def plan_fallback(sizes: Sequence[int], *, budget: int, k: int, top: int, screen_samples: int,
                  min_k: int = FALLBACK_MIN_K) -> RmedPlan | None:
    """The exact plan of rmed's fallback within ``budget`` (module docstring, 3.), or None when it cannot buy
    ``min_k`` exact entries per sampled block.

    ``k`` and ``top`` are scaled together as in the exact plan, every block larger than the scaled
    ``k + top`` sampled; the screen is kept whenever a block is sampled and ``top > 0`` (without it nothing
    bounds a sampled block's max), and the HVPs the layout leaves become the ``pool``."""
    def cost(f: float) -> tuple[int, int, tuple[bool, ...], int]:
        kf, tf = max(3, int(k * f)), int(top * f)
        sm = tuple(n <= kf + tf for n in sizes)
        sampled = not all(sm)
        c = sum(n for n, s in zip(sizes, sm) if s) + (len(sizes) - sum(sm)) * (kf + tf)
        return kf, tf, sm, c + (screen_samples if sampled and top > 0 else 0)

    lo, hi = 0.0, 1.0
    for _ in range(40):
        f = (lo + hi) / 2
        lo, hi = (f, hi) if cost(f)[3] <= budget else (lo, f)
    kf, tf, sm, c = cost(lo)
    if c > budget or (kf < min_k and not all(sm)):
        return None
    screened = not all(sm) and top > 0
    pool = budget - c if screened else 0
    return RmedPlan("exact", sm, kf, tf, screen=screen_samples if screened else 0, hvps=c + pool, threshold=0,
                    pool=pool)


def fallback_budget(sizes: Sequence[int], *, k: int, top: int, screen_samples: int, signs: int, pilot: int,
                    min_k: int = FALLBACK_MIN_K) -> int:
    """The smallest budget whose fallback buys ``min_k`` exact entries per sampled block after a pilot of
    ``pilot`` rows (what to raise ``hvps`` to when the fallback does not fit)."""
    f = min_k / k
    kf, tf = max(3, int(k * f)), int(top * f)
    while kf < min_k:  # int() rounding
        f *= 1.01
        kf, tf = max(3, int(k * f)), int(top * f)
    sampled = [n for n in sizes if n > kf + tf]
    whole = sum(n for n in sizes if n <= kf + tf)
    return signs * pilot + whole + len(sampled) * (kf + tf) + (screen_samples if sampled and top > 0 else 0)


def scaled_candidates_hvps(plan: RmedPlan, sizes: Sequence[int]) -> int:
    """The most HVPs ``precond`` spends beyond rmed's reads (``plan``) on the candidates a scaled diagonal needs
    for its max: ``min(top, n_l - k)`` exact entries per screened block plus the ``pool``, or ``signs *
    rows_cand`` packed rows (the larger of that and the fallback's, when a pilot may switch); none without a
    screen."""
    if plan.mode == "packed":
        packed = plan.signs * plan.rows_cand if plan.screen else 0
        return max(packed, scaled_candidates_hvps(plan.fallback, sizes)) if plan.fallback else packed
    if plan.screen == 0:
        return 0
    return sum(min(plan.top, n - plan.k) for n, small in zip(sizes, plan.exact_blocks) if not small) + plan.pool


def plan_columns(sizes: Sequence[int], *, budget: int, k: int) -> list[int]:
    """Columns per block: ``min(n_l, k, c)`` with the largest cap ``c`` that fits ``budget`` (module docstring).

    Raises ConfigurationError when the budget cannot give every block one column.
    """
    if budget < len(sizes):
        raise ConfigurationError(
            f"diagshare's budget hvps={budget} cannot give each of the {len(sizes)} selected blocks one column; "
            f"raise hvps to at least {len(sizes)} or select fewer blocks with blocks="
        )
    want = [min(n, k) for n in sizes]
    if sum(want) <= budget:
        return want
    lo, hi = 1, max(want)
    while lo < hi:  # the largest cap c with sum min(want, c) <= budget
        c = (lo + hi + 1) // 2
        lo, hi = (c, hi) if sum(min(w, c) for w in want) <= budget else (lo, c - 1)
    cols = [min(w, lo) for w in want]
    left = budget - sum(cols)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if left == 0:
            break
        if cols[i] < want[i]:
            cols[i] += 1
            left -= 1
    return cols


def check_rel_tol(metric: str, rel_tol: float) -> float:
    """``rel_tol`` as a float, or one ConfigurationError saying what a valid one is."""
    ok = not isinstance(rel_tol, bool) and isinstance(rel_tol, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(rel_tol)) or rel_tol < 0:
        raise ConfigurationError(
            f"{metric} needs a finite rel_tol >= 0 (the whole-model interval's half-width over the value at "
            f"which to stop; 0 spends the whole budget), got rel_tol={rel_tol!r}"
        )
    return float(rel_tol)


def column_looks(sizes: Sequence[int], *, budget: int, k: int) -> list[list[int]]:
    """Cumulative columns per block at each look of diagshare's rounds (module docstring); the last is
    ``plan_columns(sizes, budget=budget, k=k)``."""
    final = plan_columns(sizes, budget=budget, k=k)
    total = sum(final)
    m = len(sizes)
    first, step = max(MIN_COLUMNS * m, ROUND_HVPS), max(m, ROUND_HVPS)
    looks = [plan_columns(sizes, budget=b, k=k) for b in range(first, total, step)]
    looks = [cols for cols in looks if sum(cols) < total]
    return looks + [final]
