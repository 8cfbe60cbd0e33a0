"""R_med: the diagonal analogue of a condition number, per parameter block and for the whole model
(docs/metrics.md#rmed).

For a block ``l`` with Hessian diagonal ``h = diag(H_ll)``::

    R_med,l = max_i |h_i| / median_i |h_i|          R_q99,l = q_0.99 |h_i| / median_i |h_i|

Absolute values throughout (a diagonal entry of an indefinite Hessian may be negative; the statistic is
about the spread of curvature scales). The whole-model values use the diagonal of every selected block
pooled into one vector. Reference: Jiang, Malik, Li, "How Does Adaptive Optimization Impact Local Neural
Network Geometry?".

How the diagonal is obtained: within a budget of ``hvps`` HVPs (default 1,024) for all blocks together,
whatever the model's size, every block included. The plan (``geomprobe.metrics._budget.plan_rmed``) prefers
exact entries and packs reads only when exact ones cannot reach every block:

* **exact plan**, when it fits the budget (the result's ``mode`` is ``"exact"``). Per block of ``n``
  coordinates:

  - ``n <= max(exact_threshold, k + top)``: every ``h_i = e_i^T H e_i`` exactly, one HVP each. Errors are 0
    (up to rounding).
  - larger blocks: the **median** and ``q_0.99`` from ``k`` coordinates drawn uniformly without replacement
    (the first ``k`` of the block's random order, ``geomprobe.metrics._columns.block_order``) and computed exactly, with distribution-free order-statistic intervals at ``level``; the **max** by
    screening: a Bekas estimate ``h_hat`` with per-entry standard error ``se`` (``screen_samples`` HVPs,
    shared by all blocks), then the ``top`` unknown coordinates with the largest upper bound
    ``|h_hat_i| + z se_i`` recomputed exactly. The reported max is the largest exactly known ``|h_i|``, so it
    never exceeds the truth; ``max_upper = max(max, max over the rest of |h_hat_i| + z se_i)`` bounds it
    from above, and ``max_certified`` says the screen rules out a larger entry (``max_upper == max``).

  When the full layout exceeds the budget, ``k`` and ``top`` are scaled down together, and every block
  larger than the scaled ``k + top`` sampled, while that still buys ``min_k`` (24) exact coordinates per
  sampled block: at the default budget, models of up to ~35 blocks stay exact.
* **packed plan** otherwise (``mode == "packed"``): a row of coordinates, one from *every* block, is read by
  one HVP with random signs ``z`` on the row: entry ``i`` of ``z (.) Hz`` is ``h_i`` plus the Hessian entries
  between the row's coordinates, zero in mean over the signs. Each row is read under ``signs`` sign patterns;
  the mean is the estimate and the spread over the patterns its standard error (the contamination's, whose
  law it shares exactly for two patterns). ``(hvps - screen_samples) // signs`` rows are split ``k : top``
  between a uniform sample (median, q99) and the screen's candidates (max), so every block gets up to ~450
  sampled coordinates at the default budget whatever the number of blocks. Contamination is *not*
  negligible on small networks (measured by ``benchmarks/packed_diagonal.py`` with 128 rows, relative to
  the block's median ``|h|``, 95th percentile: MLP 3.5k parameters 1.4, 85k 1.4, CNN 3.8k 3.1, transformer
  18k 32), so the intervals include it: each read entry is bracketed by ``+- z s_i`` with ``s_i`` its standard
  error floored by the RMS over its group (a single entry's error has ``signs - 1`` degrees of freedom); the
  median and q99 order-statistic intervals are widened by ``z`` times the RMS contamination of the values
  inside them; the max lies in ``[max_lower, max_upper]``, the union of each read entry's own bracket and
  its screen bracket, and the screen bound of the unread entries. ``max_certified`` says no unread entry can
  exceed ``max_lower``. Each block reports ``contamination``: the RMS error of its reads over its median, what
  the budget bought. The ratio of two raw Hutchinson/Bekas entries is never reported (biased: a true 16 reads
  6 from one probe).
* **the pilot** decides between the two before the budget is committed (``geomprobe.metrics._pilot``): the
  packed plan's first ``pilot`` (8) rows are read (``signs * pilot`` HVPs) and each block's contamination
  ``c = RMS error / median |read|`` measured. A block is *contaminated* when ``z c >= 1/4`` (its median
  interval would lose a quarter of the median or more to contamination, or reach 0); when more than half of
  the blocks are, the rest of the budget goes to an exact plan with as few as 6 exact entries per sampled
  block (``_budget.plan_fallback``; six is the fewest with a two-sided 95 % order-statistic median interval,
  and from six the q99 ratio has no finite upper end: its interval is reported as ``[0, None]``), the
  screen kept and what the layout leaves read as a pool of candidates across blocks; otherwise the packed
  reads continue, the pilot's rows being their first rows (read once). The result's ``pilot`` records the
  rows, HVPs, per-block contamination, the count of contaminated blocks, the decision and why; ``mode`` is the
  plan followed. Measured ``c`` (median over blocks): digits MLP 0.13, digits CNN 0.2-0.96, a 150-block
  low-rank-coupled matrix 1.43 (where contamination dominates, ``c`` saturates near 1.5); at ``c`` = 0.13
  the packed R_med interval of the digits MLP at 256 HVPs was [0.41, 94] against [3.9, 10.7] from the
  exact fallback (truth 4.30).

Errors: ``rmed_ci = [max_lower / median_hi, max_upper / median_lo]`` (``max_lower = max`` on the exact plan)
with ``median_lo/hi`` the ``level`` interval of the median; ``rmed_err`` is its half-width about ``rmed``
(``None`` when the interval is unbounded because ``median_lo`` is 0). ``rmed_q99_ci`` combines the q99 and
median intervals at ``1 - (1 - level)/2`` each (Bonferroni, so jointly at least ``level``). The whole-model
median of a partly sampled model is the weighted median of the strata (sampled coordinates weigh ``n/k``),
its interval a stratified percentile bootstrap (widened by the contamination on the packed plan). An
undefined ratio (a zero median) is ``None``. Coverage over seeds on a digits MLP forced to the packed plan:
``tests/test_budgeted_diagonal.py``.

Cost in HVPs: at most ``hvps``. Exact plan: ``sum_small n + sum_large (k + top) + screen_samples`` (the last
only if a block is large); packed plan: ``screen_samples + signs * rows`` (the pilot's rows among them), or
``signs * pilot`` plus the fallback's exact plan (``<= hvps - signs * pilot``) when the pilot switches.
Exact entries are the HVPs ``H e_j``: Hessian columns, kept on the Landscape and shared with ``diagshare``,
whose columns are prefixes of the same per-block orders (``geomprobe.metrics._columns``; docs/metrics.md#shared_work).
Those it read are not read again (``hvps`` counts the rest, ``shared_hvps`` the columns received), and the
estimate is the solo one: the orders alone decide which entries are used.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigurationError
from ..linalg.vectors import Matvec, default_generator
from ..stats.bootstrap import stratified_bootstrap_quantiles
from ._budget import RmedPlan, fallback_budget, plan_rmed
from ._columns import COLUMNS, ColumnReader, draw_order_seed
from ._common import (
    checked,
    half_width,
    numpy_rng,
    quantile_ci,
    ratio,
    resolve_generator,
    select_blocks,
    stratified_quantile_ci,
    weighted_quantile,
)
from ._pilot import judge_pilot
from ._reads import BlockDiag, DiagonalReads, read_exact, read_packed, read_pilot
from ._screen import ScreenFacts, screen_facts
from .registry import register
from .shared import RAW_DIAGONAL, Reuse, diagonal_key

__all__ = ["rmed", "diagonal_ratios", "read_diagonal", "diagonal_statistics", "shared_diagonal", "READ_OPTIONS"]


def _check_options(exact_threshold: int, k: int, top: int, screen_samples: int, z: float, level: float,
                   bootstrap: int, hvps: int, signs: int, min_k: int, pilot: int = 0) -> None:
    if exact_threshold < 0 or k < 3 or top < 0 or screen_samples < 2 or bootstrap < 10:
        raise ConfigurationError(
            "rmed needs exact_threshold >= 0, k >= 3, top >= 0, screen_samples >= 2 and bootstrap >= 10; got "
            f"exact_threshold={exact_threshold}, k={k}, top={top}, screen_samples={screen_samples}, "
            f"bootstrap={bootstrap}"
        )
    if not 0.0 < level < 1.0 or z <= 0:
        raise ConfigurationError(f"rmed needs 0 < level < 1 and z > 0, got level={level}, z={z}")
    for name, v, least in (("hvps", hvps, 1), ("signs", signs, 2), ("min_k", min_k, 3), ("pilot", pilot, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise ConfigurationError(f"rmed needs an integer {name} >= {least}, got {name}={v!r}")


def _noise_scale(err: np.ndarray) -> np.ndarray:
    """Per-entry contamination scale: its own standard error, floored by the group's RMS.

    With two sign patterns a single entry's error has one degree of freedom and can read near 0 by chance;
    the RMS over the group (the block's samples, or its candidates) is the stable part."""
    if err.size == 0:
        return err
    return np.maximum(err, float(np.sqrt(np.mean(err**2))))


def _widen(ci: tuple[float, float], values: np.ndarray, scale: np.ndarray, z: float) -> tuple[float, float]:
    """Widen a quantile interval of contaminated values by ``z`` times the contamination near it.

    The noise that moves a quantile is that of the entries around it: the RMS scale of the values inside the
    interval (all values if none)."""
    lo, hi = ci
    near = (values >= lo) & (values <= hi)
    s = scale[near] if near.any() else scale
    w = z * float(np.sqrt(np.mean(s**2)))
    return max(lo - w, 0.0), hi + w


def _union(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), max(a[1], b[1])


def _lower(num: float, den: float) -> float | None:
    """A ratio interval's lower end: 0 when the denominator has no finite upper bound (a median from as few
    as six entries at the Bonferroni level), else ``num / den`` (None where undefined)."""
    if math.isinf(den) and math.isfinite(num):
        return 0.0
    return ratio(num, den)


def _ratio_stats(mx: float, mx_upper: float, med: float, med_ci: tuple[float, float], q99: float,
                 q99_ci: tuple[float, float], med_ci_bonf: tuple[float, float], mx_lower: float | None = None) -> dict:
    r = ratio(mx, med)
    lo, hi = _lower(mx if mx_lower is None else mx_lower, med_ci[1]), ratio(mx_upper, med_ci[0])
    rq = ratio(q99, med)
    qlo, qhi = _lower(q99_ci[0], med_ci_bonf[1]), ratio(q99_ci[1], med_ci_bonf[0])
    return {
        "rmed": r, "rmed_err": half_width(r, lo, hi), "rmed_ci": [lo, hi],
        "rmed_q99": rq, "rmed_q99_err": half_width(rq, qlo, qhi), "rmed_q99_ci": [qlo, qhi],
    }


def _block_result(p: BlockDiag, f: ScreenFacts, z: float, level: float) -> tuple[dict, dict]:
    """The block's result dict and the raw material (scaled |h| values) the whole-model pooling needs.

    ``f``: what the statistics need of the screen and the scaling at this block (:func:`._screen.screen_facts`:
    ``|s|`` at the read coordinates, the screen there, the bound of the unread ones). Cost: no HVP; host work
    of order the block's reads."""
    b = p.block
    samp = np.abs(p.sample_h) * (1.0 if f.sc_sample is None else f.sc_sample)
    if p.exact:
        med, q99, mx = float(np.median(samp)), float(np.quantile(samp, 0.99)), float(samp.max())
        out = {"max": mx, "max_upper": mx, "max_certified": True, "median": med, "median_ci": [med, med],
               "q99": q99, "exact": True, "size": b.size, "computed": b.size}
        out.update(_ratio_stats(mx, mx, med, (med, med), q99, (q99, q99), (med, med)))
        return out, {"values": samp, "weights": np.ones(len(samp)), "exact": True, "mx": mx, "mx_upper": mx,
                     "mx_lower": mx, "computed": b.size, "size": b.size, "scale": np.zeros(len(samp))}
    packed = p.sample_err is not None
    sc_samp = 1.0 if f.sc_sample is None else f.sc_sample
    sc_cand = 1.0 if f.sc_cand is None else f.sc_cand
    cand = np.abs(p.cand_h) * sc_cand
    # Contamination scales of packed reads (0 for exact entries): they bracket each read entry by +- z scale.
    s_samp = _noise_scale(p.sample_err * sc_samp) if packed else np.zeros(len(samp))
    s_cand = _noise_scale(p.cand_err * sc_cand) if packed else np.zeros(len(cand))
    read, read_s = np.concatenate([samp, cand]), np.concatenate([s_samp, s_cand])
    mx = float(read.max())
    lower, upper = np.maximum(read - z * read_s, 0.0), read + z * read_s
    if packed and p.screen is not None:
        # A read's own error has few degrees of freedom and reads 0 whenever the sign patterns happen to
        # agree on a coupled pair; the screen's bracket (many probes) is independent of it. Either one holding
        # is enough for the union of the two brackets, which is what bounds the max.
        sc_at = 1.0 if f.sc_sample is None else np.concatenate([f.sc_sample, f.sc_cand])
        lower = np.minimum(lower, np.maximum(np.abs(f.mean_at) - z * f.se_at, 0.0) * sc_at)
        upper = np.maximum(upper, (np.abs(f.mean_at) + z * f.se_at) * sc_at)
    mx_lower, mx_read_upper = float(lower.max()), float(upper.max())
    # the unread entries' bound, taken where the screen lives (inf with none: nothing bounds them)
    screen_upper = f.unread_upper
    mx_upper = max(mx_read_upper, screen_upper)
    med, q99 = float(np.median(samp)), float(np.quantile(samp, 0.99))
    bonf = 1 - (1 - level) / 2
    whole = len(p.sample) == b.size  # every coordinate read: the quantiles are the sample's, up to contamination
    med_ci = (med, med) if whole else quantile_ci(samp, 0.5, level)
    med_bonf = (med, med) if whole else quantile_ci(samp, 0.5, bonf)
    ceiling = mx_upper if np.isfinite(mx_upper) else None
    q99_ci = (q99, q99) if whole else quantile_ci(samp, 0.99, bonf, ceiling=ceiling)
    if packed:
        med_ci, med_bonf = _widen(med_ci, samp, s_samp, z), _widen(med_bonf, samp, s_samp, z)
        q99_ci = _widen(q99_ci, samp, s_samp, z)
        q99_ci = (q99_ci[0], min(q99_ci[1], mx_upper))
    certified = bool(screen_upper <= mx_lower) if packed else bool(mx_upper <= mx)
    out = {"max": mx, "max_upper": mx_upper if np.isfinite(mx_upper) else None, "max_certified": certified,
           "median": med, "median_ci": list(med_ci), "q99": q99, "exact": False, "size": b.size,
           "computed": int(len(p.sample) + len(p.cand))}
    if packed:
        out.update({"max_lower": mx_lower, "packed": True,
                    "contamination": float(np.sqrt(np.mean(s_samp**2)) / med) if med > 0 else None})
    out.update(_ratio_stats(mx, mx_upper, med, med_ci, q99, q99_ci, med_bonf, mx_lower))
    return out, {"values": samp, "weights": np.full(len(samp), b.size / len(samp)), "exact": False,
                 "mx": mx, "mx_upper": mx_upper, "mx_lower": mx_lower, "computed": out["computed"],
                 "size": b.size, "scale": s_samp, "certified": certified}


def _pooled(pieces: list[dict], level: float, bootstrap: int, rng: np.random.Generator, z: float) -> dict:
    """Whole-model statistics from per-block pieces: exact when every block is, else weighted + bootstrap."""
    mx = max(pc["mx"] for pc in pieces)
    mx_upper = max(pc["mx_upper"] for pc in pieces)
    mx_lower = max(pc["mx_lower"] for pc in pieces)
    size = sum(pc["size"] for pc in pieces)
    computed = sum(pc["computed"] for pc in pieces)
    if all(pc["exact"] for pc in pieces):
        allv = np.concatenate([pc["values"] for pc in pieces])
        med, q99 = float(np.median(allv)), float(np.quantile(allv, 0.99))
        out = {"max": mx, "max_upper": mx, "max_certified": True, "median": med, "median_ci": [med, med],
               "q99": q99, "exact": True, "size": size, "computed": computed}
        out.update(_ratio_stats(mx, mx, med, (med, med), q99, (q99, q99), (med, med)))
        return out
    vals = np.concatenate([pc["values"] for pc in pieces])
    wts = np.concatenate([pc["weights"] for pc in pieces])
    med, q99 = weighted_quantile(vals, wts, 0.5), weighted_quantile(vals, wts, 0.99)
    fixed = [pc for pc in pieces if pc["exact"]]
    fixed_v = np.concatenate([pc["values"] for pc in fixed]) if fixed else np.empty(0)
    # each sampled block resampled with replacement, its values weighing size / sampled (constant per block)
    strata = [(pc["values"], pc["size"] / len(pc["values"])) for pc in pieces if not pc["exact"]]
    boot_med, boot_q = stratified_bootstrap_quantiles(fixed_v, strata, [0.5, 0.99], bootstrap, rng)
    a = 1 - level
    med_ci = (float(np.quantile(boot_med, a / 2)), float(np.quantile(boot_med, 1 - a / 2)))
    med_bonf = (float(np.quantile(boot_med, a / 4)), float(np.quantile(boot_med, 1 - a / 4)))
    q_ci = (float(np.quantile(boot_q, a / 4)), float(np.quantile(boot_q, 1 - a / 4)))
    # The bootstrap alone undercovers when strata hold a few dozen values (q99 0.78 of 60 seeds at ~30 per
    # block on a digits MLP): the wider of it and the stratified test inversion.
    strata = [(pc["values"], pc["size"], pc["exact"]) for pc in pieces]
    ceil = mx_upper if np.isfinite(mx_upper) else math.inf
    bonf = 1 - a / 2
    med_ci, med_bonf, q_ci = (
        _union(ci, stratified_quantile_ci(strata, q, lv, ceiling=ceil))
        for ci, q, lv in ((med_ci, 0.5, level), (med_bonf, 0.5, bonf), (q_ci, 0.99, bonf))
    )
    scale = np.concatenate([pc["scale"] for pc in pieces])
    packed = bool(scale.any())
    if packed:
        med_ci, med_bonf, q_ci = (_widen(c, vals, scale, z) for c in (med_ci, med_bonf, q_ci))
    q_ci = (q_ci[0], min(q_ci[1], mx_upper))
    certified = all(pc.get("certified", pc["mx_upper"] <= pc["mx"]) for pc in pieces)
    out = {"max": mx, "max_upper": mx_upper if np.isfinite(mx_upper) else None,
           "max_certified": bool(mx_upper <= mx) if not packed else certified, "median": med,
           "median_ci": list(med_ci), "q99": q99, "exact": False, "size": size, "computed": computed}
    if packed:
        out.update({"max_lower": mx_lower, "packed": True})
    out.update(_ratio_stats(mx, mx_upper, med, med_ci, q99, q_ci, med_bonf, mx_lower))
    return out


READ_OPTIONS = ("exact_threshold", "k", "top", "screen_samples", "z", "hvps", "signs", "min_k", "pilot")


def read_diagonal(
    matvec: Matvec,
    dim: int,
    blocks: Sequence[Any],
    *,
    scalings: Sequence[torch.Tensor | None] = (None,),
    exact_threshold: int = 1024,
    k: int = 512,
    top: int = 64,
    screen_samples: int = 32,
    z: float = 4.0,
    hvps: int = 1024,
    signs: int = 2,
    min_k: int = 24,
    pilot: int = 8,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
    batch: int = 16,
    columns: ColumnReader | None = None,
) -> DiagonalReads:
    """One pass of diagonal reads within ``hvps`` HVPs (the plan of the module docstring), its screening
    candidates the union over ``scalings``; ``generator`` is left where the statistics continue from.

    A packed plan first reads its pilot (``pilot`` rows, ``signs * pilot`` HVPs) and follows its decision
    (:mod:`._pilot`): exact entries within the budget left, or the packed reads from the pilot's rows on. The
    reads' ``plan`` is the one followed, their ``pilot`` the pilot's record, their ``hvps`` everything spent.

    Exact entries are columns ``H e_j`` read through ``columns`` (:mod:`._columns`; default a private reader
    of ``matvec``): with the Landscape's store, those ``diagshare`` already read cost nothing, and the sampled
    coordinates are the prefixes of the per-block orders drawn from the generator's first draw, as
    ``diagshare``'s columns are (same seed: nested samples)."""
    blocks = list(blocks)
    sizes = [b.size for b in blocks]
    plan = plan_rmed(sizes, budget=hvps, exact_threshold=exact_threshold, k=k, top=top,
                     screen_samples=screen_samples, signs=signs, min_k=min_k, pilot=pilot)
    mv = checked(matvec)
    order_seed = draw_order_seed(generator)
    columns = columns or ColumnReader(mv, dim, metric="rmed", batch=batch, dtype=dtype, device=device)
    record = None
    if plan.mode == "packed":
        first = read_pilot(mv, dim, blocks, plan, generator=generator, dtype=dtype, device=device, batch=batch)
        if plan.pilot:
            need = None if plan.fallback else fallback_budget(sizes, k=k, top=top, screen_samples=screen_samples,
                                                              signs=signs, pilot=plan.pilot)
            record = judge_pilot(blocks, first.est, first.err, z=z, signs=signs, fallback=plan.fallback is not None,
                                 fallback_hvps=need)
        if record is not None and record["decision"] == "exact":
            plan = plan.fallback
        else:
            parts, spent = read_packed(mv, dim, blocks, scalings, plan, z=z, generator=generator, dtype=dtype,
                                       device=device, batch=batch, pilot=first)
            return DiagonalReads(tuple(parts), plan, first.hvps + spent, generator.get_state(), record)
    threshold = exact_threshold if plan.threshold < 0 else plan.threshold
    parts, spent = read_exact(mv, dim, blocks, scalings, exact_threshold=threshold, k=plan.k, top=plan.top,
                              screen_samples=plan.screen, z=z, generator=generator, dtype=dtype, device=device,
                              batch=batch, pool=plan.pool, order_seed=order_seed, columns=columns)
    spent += record["hvps"] if record else 0
    return DiagonalReads(tuple(parts), plan, spent, generator.get_state(), record)


def diagonal_statistics(parts: Sequence[BlockDiag], plan: RmedPlan, scalings: Sequence[torch.Tensor | None], *,
                        z: float, level: float, bootstrap: int, budget: int, generator: torch.Generator,
                        pilot: dict | None = None) -> list[dict]:
    """R_med and R_q99 with their intervals, whole model and per block, of ``diag(S H S)`` for each scaling,
    from reads already made (no HVP; the bootstrap draws from ``generator``); ``pilot``, the reads' pilot
    record, is reported under ``pilot``."""
    rng = numpy_rng(generator)
    results = []
    # one pass over the screen per scaling, one device->host copy in all, whatever the number of blocks
    for facts in screen_facts(parts, scalings, z):
        per_block, pieces = {}, []
        for p, f in zip(parts, facts):
            res, piece = _block_result(p, f, z, level)
            per_block[p.block.name] = res
            pieces.append(piece)
        whole = _pooled(pieces, level, bootstrap, rng, z)
        whole.update({"blocks": per_block, "mode": plan.mode, "budget": budget})
        if pilot is not None:
            whole["pilot"] = pilot
        results.append(whole)
    return results


def diagonal_ratios(
    matvec: Matvec,
    dim: int,
    blocks: Sequence[Any],
    *,
    scalings: Sequence[torch.Tensor | None] = (None,),
    exact_threshold: int = 1024,
    k: int = 512,
    top: int = 64,
    screen_samples: int = 32,
    z: float = 4.0,
    level: float = 0.95,
    bootstrap: int = 400,
    hvps: int = 1024,
    signs: int = 2,
    min_k: int = 24,
    pilot: int = 8,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
    batch: int = 16,
) -> tuple[list[dict], int]:
    """R_med and R_q99 of ``diag(S H S)`` for each ``S = diag(s)`` in ``scalings`` (``None`` = identity).

    The kernel behind :func:`rmed`: since ``(S H S)_ii = s_i^2 H_ii``, one set of exact diagonal entries
    serves every scaling; pass ``s^2`` (e.g. a preconditioner ``P``) as the scaling. The screening candidates
    are the union over scalings. ``blocks`` are objects with ``name``, ``start``, ``stop`` and ``size``. Returns
    one result dict per scaling (the whole-model values plus ``blocks``, ``mode`` and ``budget``) and the HVPs
    spent, never more than ``hvps``. See the module docstring for the plan, the estimators and their errors.
    """
    _check_options(exact_threshold, k, top, screen_samples, z, level, bootstrap, hvps, signs, min_k, pilot)
    generator = generator or default_generator(0)
    reads = read_diagonal(matvec, dim, blocks, scalings=scalings, exact_threshold=exact_threshold, k=k, top=top,
                          screen_samples=screen_samples, z=z, hvps=hvps, signs=signs, min_k=min_k, pilot=pilot,
                          generator=generator, dtype=dtype, device=device, batch=batch)
    results = diagonal_statistics(reads.parts, reads.plan, scalings, z=z, level=level, bootstrap=bootstrap,
                                  budget=hvps, generator=generator, pilot=reads.pilot)
    return results, reads.hvps


def shared_diagonal(land: Any, blocks: Sequence[Any], reuse: Reuse, *, seed: int, generator: torch.Generator | None,
                    columns: bool = False, **options: Any) -> tuple[DiagonalReads, torch.Generator, int]:
    """rmed's raw diagonal reads of ``land`` with the read ``options`` (:data:`READ_OPTIONS`), a shared product
    (:mod:`.shared`): kept under its options and seed, so ``rmed`` and ``precond``'s raw R_med read once.

    With ``columns``, the exact entries go through the Landscape's column store (:mod:`._columns`): the
    columns ``diagshare`` read are not read again, those read here serve ``diagshare``, and what was received
    is noted on ``reuse`` (``"hessian columns"``). Column values do not depend on who read them, so this changes
    no estimate (beyond the rounding of HVPs batched otherwise).

    Returns the reads, a generator positioned right after them (restored from the reads when they were kept
    by another metric, so everything drawn next is what reading again would have drawn) and the HVPs this call
    spent (0 when it received them). A call with its own ``generator`` shares no reads (no key names it); its
    columns are still shared, their values being free of any randomness.
    """
    key = diagonal_key(blocks, seed=seed, **options)
    if generator is None:
        kept = reuse.find(key)
        if kept is not None:
            gen = torch.Generator()
            gen.set_state(kept.state)
            return kept, gen, 0
    gen = resolve_generator(seed, generator)
    reader = ColumnReader.on(land, reuse.metric, checked(land.hvp)) if columns else None
    reads = read_diagonal(land.hvp, land.dim, blocks, generator=gen, dtype=land.dtype, device=land.device,
                          batch=getattr(land, "chunk_size", 16), columns=reader, **options)
    if reader is not None:
        for source, n in reader.received.items():
            reuse.note(COLUMNS, source, n)
    if generator is None:
        reuse.keep(key, RAW_DIAGONAL, reads, reads.hvps)
    return reads, gen, reads.hvps


@register(
    "rmed",
    cost="at most hvps (1024) whatever the model: exact entries (one HVP each) for blocks up to exact_threshold "
    "(1024) and k + top (576) per larger block, plus screen_samples (32), when that fits, k and top scaled down "
    "while >= min_k (24); else screen_samples + signs (2) HVPs per packed row reading one coordinate of every block, "
    "the first pilot (8) rows read first: when their contamination would leave most blocks' median intervals "
    "unbounded, the rest of the budget reads >= 6 exact entries per block instead",
)
def rmed(
    land: Any,
    *,
    blocks: str | Sequence[str] | None = None,
    exact_threshold: int = 1024,
    k: int = 512,
    top: int = 64,
    screen_samples: int = 32,
    z: float = 4.0,
    level: float = 0.95,
    bootstrap: int = 400,
    hvps: int = 1024,
    signs: int = 2,
    min_k: int = 24,
    pilot: int = 8,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> dict:
    """R_med = max|h|/median|h| and R_q99 = q0.99|h|/median|h| of the Hessian diagonal, whole model and per block.

    Args:
        land: the Landscape.
        blocks: glob patterns of block names to include (default all); the whole-model value pools these.
        exact_threshold: blocks up to this size (or up to ``k + top``) get their exact diagonal.
        k: exactly computed sample coordinates per larger block (median and q99).
        top: screening candidates recomputed exactly per larger block (max).
        screen_samples: Rademacher probes of the Bekas screen (shared by all blocks).
        z: standard errors of the screen above which an unseen entry is ruled out as the max.
        level: confidence level of the median/q99 intervals.
        bootstrap: resamples for the whole-model interval when blocks are sampled.
        hvps: the budget in HVPs for all blocks together (module docstring: the plan within it).
        signs: sign patterns per packed row (>= 2: their spread is the contamination's error).
        min_k: the fewest exact sampled coordinates per block for which the exact plan is kept.
        pilot: rows of the packed plan read first to measure their contamination (``signs * pilot`` HVPs of
            the budget); 0 reads packed without a pilot.
        seed, generator: the randomness (sampled coordinates, sign patterns, screening probes, bootstrap).

    Returns the whole-model ``rmed``, ``rmed_err``, ``rmed_ci``, ``rmed_q99`` (``_err``, ``_ci``), ``max``,
    ``max_upper``, ``max_certified``, ``median``, ``median_ci``, ``q99``, ``exact``, ``size``, ``computed``,
    the same per block under ``blocks``, ``mode`` (``"exact"`` or ``"packed"``: the plan followed), ``budget`` and
    ``hvps`` (never above ``budget``, the pilot's included); on the packed plan also ``max_lower``, ``packed``
    and per block ``contamination``; when the plan was packed, ``pilot`` (module docstring).
    Errors as in the module docstring: ``rmed_err`` is the half-width of an interval that holds the true ratio
    at ``level`` when ``max_certified``.

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> model = nn.Linear(4, 1, bias=False).double()
    >>> X = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(4, 1, dtype=torch.float64)))
    >>> out = rmed(land)           # diag H = (0.5, 2, 4.5, 8): max 8, median 3.25
    >>> round(out["rmed"], 6), out["rmed_err"], out["exact"], out["hvps"]
    (2.461538, 0.0, True, 4)
    """
    _check_options(exact_threshold, k, top, screen_samples, z, level, bootstrap, hvps, signs, min_k, pilot)
    chosen = select_blocks(land.space.blocks, blocks)
    reuse = Reuse(land, "rmed")
    reads, gen, spent = shared_diagonal(land, chosen, reuse, seed=seed, generator=generator, columns=True,
                                        exact_threshold=exact_threshold, k=k, top=top, screen_samples=screen_samples,
                                        z=z, hvps=hvps, signs=signs, min_k=min_k, pilot=pilot)
    (res,) = diagonal_statistics(reads.parts, reads.plan, [None], z=z, level=level, bootstrap=bootstrap, budget=hvps,
                                 generator=gen, pilot=reads.pilot)
    # 0 when precond of this probe already read the same entries, less the columns diagshare read (``shared``
    # names what was received, ``shared_hvps`` what it cost its reader: never counted twice)
    res["hvps"] = spent
    res.update(reuse.fields())
    return res
