"""rmed's pilot: how contaminated packed diagonal reads are on this model, measured before relying on them
(docs/metrics.md#rmed).

Private to the metrics. A packed read of entry ``i`` is ``h_i`` plus the Hessian entries between the
coordinates read with it; the reported interval of a block's median is widened downward by ``z`` times the
RMS contamination of the values near it (:mod:`geomprobe.metrics.rmed`). So once that RMS reaches ``1/z`` of
the block's median ``|h|``, the median's lower bound is 0 and the block's R_med interval is unbounded: the
packed reads bought nothing for it.

The pilot reads the plan's first ``pilot`` sampled rows (``signs * pilot`` HVPs, 16 at the defaults) and,
per block, takes

    ``c_l = RMS(error of the pilot's reads) / median |pilot's reads|``

**Rule**: a block is *contaminated* when ``z * c_l >= 1/4`` (``LOST``): its median interval would lose a
quarter of the median or more to contamination, or reach 0. When more than half of the blocks are (and the
budget left buys the exact fallback, ``_budget.plan_fallback``), the rest of the budget goes to exact
entries; otherwise the packed reads continue, the pilot's rows being their first rows.

Why a quarter, not "the interval reaches 0": the max's bracket widens by the same contamination, so a block
whose median merely stays above 0 still has a useless ratio. Measured (median ``c`` per block, 100 pilots):
digits MLP 0.12-0.15, where the packed R_med interval at 256 HVPs was [0.41, 94] against [3.9, 10.7] from
the exact fallback (truth 4.30); digits CNN 0.21-0.96 (packed: unbounded; fallback [55.9, 84.1], truth 68.0);
a 150-block low-rank-coupled matrix 1.43. The rule does not weigh how few exact entries the fallback buys:
at six per block a packed plan with ``z c`` between 1/4 and ~1/2 might bound the median tighter (the digits
MLP sits at ``z c`` ~0.5, but its fallback buys ~50 entries per block at 256 HVPs, and was far tighter).

Error of ``c_l``: from ``pilot`` reads (``signs - 1`` degrees of freedom each) its RMS part is within about
``1/sqrt(2 pilot)`` relative (25 % at 8 rows), and its median part is a sample median of ``pilot`` values.
Where contamination dominates, ``|read|`` is itself mostly contamination and ``c_l`` saturates near 1.5
(Gaussian contamination, two signs; 1.43 measured) instead of growing: about 23 times the threshold at
``z = 4``. Near the threshold either decision is defensible (the digits MLP switches in most pilots, not
all), and the intervals of both plans state what they bought.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LOST", "UNBOUNDED_SHARE", "block_contamination", "judge_pilot"]

UNBOUNDED_SHARE = 0.5  # switch to exact entries when more than this share of blocks is contaminated
LOST = 0.25  # a block is contaminated when z times its contamination is this share of its median or more


def _finite(x: float) -> float | None:
    """``x``, or None where it is not finite (JSON has no inf)."""
    return x if np.isfinite(x) else None


def block_contamination(est: np.ndarray, err: np.ndarray) -> float:
    """``RMS(err) / median |est|`` of one block's pilot reads; 0 when both are 0 (nothing to contaminate),
    ``inf`` when only the median is."""
    rms = float(np.sqrt(np.mean(np.square(err)))) if err.size else 0.0
    med = float(np.median(np.abs(est))) if est.size else 0.0
    if med > 0:
        return rms / med
    return 0.0 if rms == 0 else float("inf")


def judge_pilot(blocks: Sequence[Any], est: np.ndarray, err: np.ndarray, *, z: float, signs: int,
                fallback: bool, fallback_hvps: int | None = None) -> dict:
    """The pilot's record and decision from its ``(rows, blocks)`` reads ``est`` and their errors ``err``.

    ``fallback`` says whether the budget left buys the exact fallback (``fallback_hvps``: the budget at which
    it would, quoted when it does not). Returns ``rows``, ``hvps`` (``signs * rows``), ``threshold``
    (``1/z``), per-block ``contamination``, ``median_contamination``, ``contaminated`` (blocks at or above the
    threshold), ``blocks``, ``decision`` (``"exact"`` or ``"packed"``) and ``why``. Costs no HVP."""
    rows = int(est.shape[0])
    c = {b.name: block_contamination(est[:, j], err[:, j]) for j, b in enumerate(blocks)}
    values = np.array(list(c.values()), dtype=float)
    threshold = LOST / z
    bad = int(np.sum(values >= threshold))
    m = len(blocks)
    share = bad / m if m else 0.0
    finite = {k: _finite(v) for k, v in c.items()}
    say = (f"{bad} of {m} blocks have packed contamination >= {LOST:g}/z = {threshold:.3g} of their median |h| "
           f"(z = {z:g}): it would take their median interval's lower end below {LOST:g} of the median, or to 0")
    if share > UNBOUNDED_SHARE and fallback:
        decision, why = "exact", say + "; the rest of the budget reads exact entries instead"
    elif share > UNBOUNDED_SHARE:
        need = f" (hvps >= {fallback_hvps} would)" if fallback_hvps else ""
        decision, why = "packed", say + (f"; the budget left buys fewer than the fallback's exact entries per "
                                         f"block{need}, so the packed reads continue")
    else:
        decision, why = "packed", say + f"; at most {UNBOUNDED_SHARE:.0%} of blocks: the packed reads continue"
    med = float(np.median(values)) if m else math.nan
    return {"rows": rows, "hvps": signs * rows, "threshold": threshold, "contamination": finite,
            "median_contamination": _finite(med), "contaminated": bad, "blocks": m, "decision": decision,
            "why": why}
