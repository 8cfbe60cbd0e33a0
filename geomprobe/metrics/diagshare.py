"""Diagonal mass share of the Hessian, with its random-matrix baselines (docs/metrics.md#diagshare).

::

    delta(A) = sum_i |a_ii| / sum_ij |a_ij|  in (0, 1]

Reference: Kohler, Adolphs, Lucchi, "Adaptive norms for deep learning with regularized Newton methods":
network Hessians keep a diagonal share above both baselines below, which is why diagonal (adaptive)
norms fit them. Also reported: ``delta`` per block (of the block's own sub-matrix ``H_ll``) and the
block-diagonal share ``beta = sum_l sum_{i,j in l} |h_ij| / sum_ij |h_ij|``.

Estimators:

* ``d <= min(exact_threshold, hvps)`` (the selected coordinates): the dense Hessian from ``d`` HVPs,
  symmetrized, and every share exactly (errors 0, up to rounding).
* larger: column sampling, stratified by block, within the budget of ``hvps`` HVPs (one exact column each,
  default 1,024) for all blocks together. Per block ``l`` of ``n_l`` coordinates, ``k_l = min(n_l, k, c)``
  columns ``H e_j`` drawn uniformly without replacement, the cap ``c`` the largest that fits the budget
  (``geomprobe.metrics._budget.plan_columns``; all columns when ``n_l <= k_l``: an exact stratum). A column
  cannot be shared between blocks (a packed vector mixes columns), so 1,024 columns over 150 blocks are ~7
  per block: the whole-model and block-diagonal shares use all of them, a block's own share only its own.
  With stratum weights ``w_l = n_l / k_l`` (``sum_j`` over the sampled columns)::

      delta_hat   = sum_l w_l sum_j |H_jj|          / sum_l w_l sum_j ||H e_j||_1
      delta_hat_l = sum_j |H_jj|                    / sum_j ||(H e_j)_l||_1
      beta_hat    = sum_l w_l sum_j ||(H e_j)_l||_1 / sum_l w_l sum_j ||H e_j||_1

  (``sum_i |a_ii| / sum_ij |a_ij| = sum_j |a_jj| / sum_j ||a_:j||_1``, so sampling whole columns is
  unbiased for numerator and denominator; a random principal sub-block would not be.) Errors at ``level``:
  the wider of a stratified percentile bootstrap over the sampled columns and a linearized Student-t
  interval (residuals ``a_j - R b_j``, finite-population correction, Welch-Satterthwaite degrees of
  freedom): the bootstrap alone is too narrow at a handful of columns. ``x_ci`` is the interval and
  ``x_err`` its half-width about ``x``; a block with a single column has the interval ``[0, 1]``. Ratio
  estimators carry an O(1/k) bias, small against that interval. The interval is only as good as the
  sample's view of the heaviest columns: over repeated draws the nominal 95 % (bootstrap alone) covered
  92-95 % when the diagonal's log-scale sd is 1 (k = 150-256 per block), but 87 % with a log-scale sd of 2
  at k = 256 and 78 % at k = 96. On a digits MLP (1,210 parameters, 4 blocks, 100 seeds) the combined
  interval covered 0.93 / 0.96 / 0.93-1.0 (whole, block-diagonal, per block) at 6 columns per block, and
  0.88 / 0.92 / 0.87-0.99 at 3: below ~6 columns per block the per-block intervals undercover.

Stopping (``rel_tol``, default 0.2; 0 spends the whole budget as before): the sampled columns are read in
looks (``geomprobe.metrics._budget.column_looks``: first six columns per block, or 64 columns, so that no
stop rests on the intervals of fewer, which undercover (above); then steps of ``max(m, 64)`` columns, every
look the plan's split of its budget between blocks), each block's columns the
prefix of one random order of its coordinates (``geomprobe.metrics._columns.block_order``), batched across blocks. It stops at the first look where
``diagshare_err <= rel_tol * diagshare`` or when the budget is spent; ``converged`` says which. The result at
a look is the result of a budget that ends there (same seed), and when every block is sampled it is the
whole-budget estimator of that budget. Intervals are reported without widening for the looks. Measured
coverage at the stop on the digits MLP (budget 512, 200 seeds, whole / block-diagonal share): rel_tol 0.2
(stops at 64) 0.93 / 0.96, 0.1 (64-128) 0.92 / 0.955, 0.05 (192-320) 0.935 / 0.945, 0.03 0.95 / 0.97;
the whole budget (442 columns) 0.965 / 0.97; on a heterogeneous dense Hessian of 20 blocks x 50 (100
seeds) 0.90 at the stop (rel_tol 0.03, stops at 184-378 of 400), against 0.90 and 0.93 at fixed budgets of
120 and 248: the stops cost no coverage beyond that of the smaller budget itself, so no widening for the looks
is applied (a Bonferroni split over up to 15 looks would double the half-widths at every stop). A look costs the Student-t interval; the bootstrap runs only at a look that interval meets.

Shared columns (``geomprobe.metrics._columns``, docs/metrics.md#shared_work): every column read goes to the
Landscape's store with ``H_jj`` and its L1 norm over each block, and the columns ``rmed`` read there (its exact
entries: the first ``k`` of the same per-block orders when the seed is the same) are not read again. Which
columns are used is decided by the orders alone, so the estimate is the solo one (same seed: the same values,
up to the rounding of HVPs batched otherwise); ``hvps`` counts the columns read here, ``shared_hvps`` those
received.

Cost in HVPs: ``d`` (exact) or ``sum_l k_l <= hvps`` (sampled; fewer when ``rel_tol`` stops it, or when
``rmed`` read some of the columns). Rows are restricted to the selected
blocks, so with ``blocks=`` the statistic is that of the selected coordinates' sub-Hessian.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigurationError
from ..linalg.exact import hessian_columns
from ._budget import check_rel_tol, column_looks, plan_columns
from ._columns import COLUMNS, ColumnReader, block_order, draw_order_seed
from ._common import checked, half_width, numpy_rng, resolve_generator, select_blocks, t_quantile
from .registry import register
from .shared import Reuse

__all__ = ["diagshare", "diagonal_share", "wigner_baseline", "ols_baseline"]


def _check_d(d: int) -> None:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ConfigurationError(f"the dimension d must be a positive integer, got {d!r}")


def wigner_baseline(d: int, *, sigma_diag: float = 1.0, sigma_off: float = 1.0) -> float:
    """Diagonal share of a Wigner matrix's entrywise mean: ``delta(E|A|) = s1 / (s1 + (d - 1) s2)``.

    ``A`` symmetric with independent zero-mean Gaussian entries, diagonal sd ``sigma_diag = s1`` and
    off-diagonal sd ``sigma_off = s2`` (``E|a| = sqrt(2/pi) sd``, the constant cancels). With equal scales this
    is ``1/d``: the share of a Hessian with no diagonal structure at all. Reference: Kohler et al.
    (docs/metrics.md#diagshare).
    Monte Carlo of ``E delta(A)`` at d = 100 gives 0.0100-0.0101.

    >>> wigner_baseline(100)
    0.01
    """
    _check_d(d)
    if sigma_diag <= 0 or sigma_off < 0:
        raise ConfigurationError(f"need sigma_diag > 0 and sigma_off >= 0, got {sigma_diag}, {sigma_off}")
    return sigma_diag / (sigma_diag + (d - 1) * sigma_off)


def ols_baseline(d: int, n: int) -> float:
    """Diagonal share of a least-squares Hessian ``H = X^T X / n``: ``1 / (1 + (d - 1) sqrt(2 / (pi n)))``.

    ``X`` is ``n x d`` with i.i.d. zero-mean unit-variance inputs; ``n`` is the Hessian's batch size (the
    number of samples it averages over, ``Landscape.n_samples``). For large ``n``, ``H_ii -> 1`` and
    ``H_ij ~ N(0, 1/n)`` with ``E|H_ij| = sqrt(2 / (pi n))``. Monte Carlo (docs/metrics.md#diagshare): d=50,
    n=128 gives 0.2250
    against 0.2244 here; d=10, n=32 0.4420 vs 0.4406; d=100, n=4096 0.4474 vs 0.4476.

    >>> round(ols_baseline(50, 128), 4)
    0.2244
    """
    _check_d(d)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigurationError(f"the batch size n must be a positive integer, got {n!r}")
    return 1.0 / (1.0 + (d - 1) * math.sqrt(2.0 / (math.pi * n)))


def _blockdiag_baselines(sizes: Sequence[int], n: int) -> tuple[float, float]:
    # Expected block-diagonal mass share under the same two models: every |a_ij| alike (Wigner), or
    # diagonal 1 and off-diagonal sqrt(2/(pi n)) (OLS).
    d = sum(sizes)
    inner = sum(s * s for s in sizes)
    c = math.sqrt(2.0 / (math.pi * n))
    return inner / d**2, (d + c * (inner - d)) / (d + c * (d * d - d))


def diagonal_share(A: torch.Tensor) -> float:
    """``delta(A) = sum_i |a_ii| / sum_ij |a_ij|`` of a dense square matrix (None-free: 0/0 gives NaN).

    >>> diagonal_share(torch.tensor([[2.0, -1.0], [-1.0, 2.0]]))
    0.6666666666666666
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ConfigurationError(f"diagonal_share needs a square matrix, got shape {tuple(A.shape)}")
    A = A.double().abs()
    return float(torch.diagonal(A).sum() / A.sum())


def _share(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _exact(land: Any, chosen: list, idx: torch.Tensor, batch: int, reader: ColumnReader) -> dict:
    # Columns chunk by chunk, keeping only the selected rows: never the full (D, d) block of columns. Each
    # column also goes to the Landscape's store, where rmed finds its diagonal entry (this path takes none:
    # it needs whole columns, the store keeps their block norms).
    M = torch.empty(len(idx), len(idx), dtype=torch.float64)
    for s in range(0, len(idx), batch):
        part = idx[s : s + batch]
        cols = hessian_columns(reader.matvec, land.dim, part, batch=batch, dtype=land.dtype, device=land.device)
        M[s : s + batch] = cols[:, idx.to(cols.device)].double().cpu()
        reader.record(part, cols)
    M = ((M + M.T) / 2).abs()
    total = float(M.sum())
    out, inner, at = {}, 0.0, 0
    for b in chosen:
        sub = M[at : at + b.size, at : at + b.size]
        mass = float(sub.sum())
        inner += mass
        d = _share(float(torch.diagonal(sub).sum()), mass)
        out[b.name] = {"diagshare": d, "diagshare_err": 0.0, "diagshare_ci": [d, d], "exact": True,
                       "columns": b.size}
        at += b.size
    d = _share(float(torch.diagonal(M).sum()), total)
    bd = _share(inner, total)
    return {"diagshare": d, "diagshare_err": 0.0, "diagshare_ci": [d, d], "blockdiag_share": bd,
            "blockdiag_share_err": 0.0, "blockdiag_share_ci": [bd, bd], "exact": True, "columns": len(idx),
            "blocks": out}


def _stratified_t(strata: list[dict], a_key: str, b_key: str, level: float) -> tuple[float, float]:
    """Student-t interval of the stratified ratio ``sum_l w_l sum a / sum_l w_l sum b`` by linearization.

    Residuals ``u_j = a_j - R b_j`` carry the ratio's error: ``var = sum_l w_l^2 k_l s_l^2 (1 - k_l/n_l)``,
    over ``(sum w b)^2``, with Welch-Satterthwaite degrees of freedom (a stratum of few columns that
    dominates the variance sets them). A stratum of one column borrows the mean per-column variance of the
    others. With a handful of columns per block the percentile bootstrap is too narrow (it never sees a column
    it did not draw); this interval grows as the columns get fewer."""
    num = sum(st["w"] * st[a_key].sum() for st in strata)
    den = sum(st["w"] * st[b_key].sum() for st in strata)
    if not den > 0:
        return (math.nan, math.nan)
    R = num / den
    sampled = [st for st in strata if not st["exact"]]
    unit = [float((st[a_key] - R * st[b_key]).var(ddof=1)) for st in sampled if len(st[a_key]) >= 2]
    pooled = float(np.mean(unit)) if unit else math.inf
    parts = []
    for st in sampled:
        k, n = len(st[a_key]), st["block"].size
        v = float((st[a_key] - R * st[b_key]).var(ddof=1)) if k >= 2 else pooled
        parts.append((st["w"] ** 2 * k * v * (1 - k / n), max(k - 1, 1)))
    var = sum(v for v, _ in parts)
    if not parts or not math.isfinite(var):
        return (0.0, 1.0) if parts else (R, R)
    spread = sum(v * v / f for v, f in parts)
    df = max(1, int(var * var / spread)) if spread > 0 else 1
    h = t_quantile(0.5 + level / 2, df) * math.sqrt(var) / den
    return max(R - h, 0.0), min(R + h, 1.0)


def _own_t(st: dict, level: float) -> tuple[float, float]:
    """The block's own share ``sum |H_jj| / sum ||(H e_j)_l||_1`` over its columns: the same interval, one stratum."""
    if len(st["diag"]) < 2:
        return (0.0, 1.0)  # one column says nothing about its own spread
    return _stratified_t([{**st, "exact": False, "w": 1.0}], "diag", "inner", level)


def _column_sums(reader: ColumnReader, chosen: list, owner: np.ndarray, glob: np.ndarray) -> tuple[np.ndarray, ...]:
    """``|H_jj|``, ``||H e_j||_1`` over the selected blocks and ``||(H e_j)_l||_1`` over the column's own block
    ``l = chosen[owner]`` of the columns ``glob``, from the Landscape's store (:mod:`._columns`): columns not
    stored yet are read (one HVP each, batched across blocks), the others cost nothing."""
    diag, mass = reader.read(glob)
    where = {b.start: i for i, b in enumerate(reader.store.blocks)}
    sel = np.array([where[b.start] for b in chosen], dtype=np.int64)
    tot = mass[:, sel].sum(1)
    inner = mass[np.arange(len(glob)), sel[owner]]
    return np.abs(diag), tot, inner


def _sampled(chosen: list, columns: list[int], level: float, bootstrap: int, gen: torch.Generator,
             reader: ColumnReader) -> dict:
    # each block's columns: the prefix of its order (shared with rmed's sample of the same seed), read at once
    order_seed = draw_order_seed(gen)
    local = [np.sort(block_order(order_seed, b, k)) for b, k in zip(chosen, columns)]
    owner = np.concatenate([np.full(len(loc), j) for j, loc in enumerate(local)])
    glob = np.concatenate([b.start + loc for b, loc in zip(chosen, local)])
    diag, tot, inner = _column_sums(reader, chosen, owner, glob)
    strata = []
    for j, (b, loc) in enumerate(zip(chosen, local)):
        m = owner == j
        strata.append({"block": b, "exact": len(loc) == b.size, "w": b.size / len(loc),
                       "diag": diag[m], "tot": tot[m], "inner": inner[m]})
    return _summarize(strata, level, bootstrap, numpy_rng(gen))


def _share_stats(strata: list[dict], draws: list[np.ndarray]) -> np.ndarray:
    """Rows ``[diagshare, blockdiag_share, per-block shares...]`` of the resamples ``draws`` (per stratum an
    ``(R, k_l)`` array of column indices; R rows at once). Each sum runs over one row of ``k_l`` values, so
    every figure is the one a resample's own 1-D sum gives, bit for bit."""
    R = draws[0].shape[0] if draws else 0
    num, den, inn = np.zeros(R), np.zeros(R), np.zeros(R)
    per = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for st, ix in zip(strata, draws):
            dg, tt, ii = st["diag"][ix].sum(1), st["tot"][ix].sum(1), st["inner"][ix].sum(1)
            num, den, inn = num + st["w"] * dg, den + st["w"] * tt, inn + st["w"] * ii
            per.append(np.where(ii > 0, dg / ii, np.nan))
        pos = den > 0
        cols = [np.where(pos, num / den, np.nan), np.where(pos, inn / den, np.nan)] + per
    return np.stack(cols, axis=1)


def _resamples(strata: list[dict], bootstrap: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per stratum the ``(bootstrap, k_l)`` column indices of every resample (an exact stratum keeps all its
    columns), drawn in one call: ``integers`` with one upper bound per entry draws the stream that one call
    per resample and stratum, in that order, drew (resample-major, strata in order)."""
    ks = [len(st["diag"]) for st in strata]
    sampled = [j for j, st in enumerate(strata) if not st["exact"]]
    highs = np.concatenate([np.full(ks[j], ks[j], dtype=np.int64) for j in sampled]) if sampled else None
    flat = (rng.integers(0, np.tile(highs, bootstrap)).reshape(bootstrap, -1)
            if sampled and bootstrap > 0 else np.zeros((bootstrap, 0), dtype=np.int64))
    out, at = [], 0
    for j, st in enumerate(strata):
        if st["exact"]:
            out.append(np.broadcast_to(np.arange(ks[j]), (bootstrap, ks[j])))
        else:
            out.append(flat[:, at : at + ks[j]])
            at += ks[j]
    return out


def _summarize(strata: list[dict], level: float, bootstrap: int, rng: np.random.Generator) -> dict:
    """Shares and their intervals from the sampled columns of every block (module docstring). Host work: one
    vectorized pass per stratum over all ``bootstrap`` resamples (no loop over resamples)."""
    full = [np.arange(len(st["diag"]))[None, :] for st in strata]
    first = _share_stats(strata, full)[0]
    d0, bd0, per0 = first[0], first[1], list(first[2:])
    B = _share_stats(strata, _resamples(strata, bootstrap, rng))
    a = 1 - level
    lo, hi = np.nanquantile(B, a / 2, axis=0), np.nanquantile(B, 1 - a / 2, axis=0)
    # The wider of the bootstrap and the linearized interval: the bootstrap is too narrow at few columns.
    lin = [_stratified_t(strata, "diag", "tot", level), _stratified_t(strata, "inner", "tot", level)]
    lin += [_own_t(st, level) if not st["exact"] else (np.nan, np.nan) for st in strata]
    for j, (l, h) in enumerate(lin):
        if np.isfinite(l):
            lo[j], hi[j] = min(lo[j], l), max(hi[j], h)

    def pack(x: float, j: int) -> tuple[float | None, float | None, list]:
        if not np.isfinite(x):
            return None, None, [None, None]
        ci = [float(min(lo[j], x)), float(max(hi[j], x))]
        return float(x), half_width(float(x), *ci), ci

    blocks = {}
    for j, st in enumerate(strata):
        x, err, ci = pack(per0[j], 2 + j)
        if st["exact"]:
            err, ci = 0.0, [x, x]
        blocks[st["block"].name] = {"diagshare": x, "diagshare_err": err, "diagshare_ci": ci,
                                    "exact": st["exact"], "columns": len(st["diag"])}
    dx, derr, dci = pack(d0, 0)
    bx, berr, bci = pack(bd0, 1)
    return {"diagshare": dx, "diagshare_err": derr, "diagshare_ci": dci, "blockdiag_share": bx,
            "blockdiag_share_err": berr, "blockdiag_share_ci": bci, "exact": all(st["exact"] for st in strata),
            "columns": int(sum(len(st["diag"]) for st in strata)), "blocks": blocks}


def _met(out: dict, rel_tol: float) -> bool:
    """The whole-model share's interval half-width is at most ``rel_tol`` times the share."""
    x, err = out["diagshare"], out["diagshare_err"]
    return x is not None and err is not None and err <= rel_tol * x


def _in_rounds(chosen: list, k: int, hvps: int, level: float, bootstrap: int, rel_tol: float,
               gen: torch.Generator, reader: ColumnReader) -> dict:
    """Column sampling in looks (``_budget.column_looks``), stopping at the first look whose whole-model
    interval meets ``rel_tol``.

    Every block's columns are the prefix of its order (:func:`._columns.block_order`, drawn for every block
    from the generator's first draw, so that which blocks draw does not depend on the budget, and shared with
    rmed's sample of the same seed), read in batches that mix blocks; each look's bootstrap starts from the
    same seed. The result at a look is therefore the result of a budget that ends there."""
    looks = column_looks([b.size for b in chosen], budget=hvps, k=k)
    order_seed = draw_order_seed(gen)
    orders = [block_order(order_seed, b, c) for b, c in zip(chosen, looks[-1])]
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64))
    reads = [{"col": np.empty(0, dtype=np.int64), "diag": np.empty(0), "tot": np.empty(0), "inner": np.empty(0)}
             for _ in chosen]
    have = [0] * len(chosen)
    for i, cols in enumerate(looks):
        owner = np.concatenate([np.full(c - h, j) for j, (c, h) in enumerate(zip(cols, have))])
        local = np.concatenate([orders[j][h:c] for j, (c, h) in enumerate(zip(cols, have))])
        glob = local + np.array([b.start for b in chosen], dtype=np.int64)[owner]
        diag, tot, inner = _column_sums(reader, chosen, owner, glob)
        for j in np.unique(owner):
            m = owner == j
            r = reads[j]
            for key, v in (("col", local[m]), ("diag", diag[m]), ("tot", tot[m]), ("inner", inner[m])):
                r[key] = np.concatenate([r[key], v])
        have = list(cols)
        strata = []
        for b, r, c in zip(chosen, reads, cols):
            order = np.argsort(r["col"], kind="stable")  # coordinate order, as a single pass reads them
            strata.append({"block": b, "exact": c == b.size, "w": b.size / c, "diag": r["diag"][order],
                           "tot": r["tot"][order], "inner": r["inner"][order]})
        last = i == len(looks) - 1
        d = sum(st["w"] * st["diag"].sum() for st in strata) / sum(st["w"] * st["tot"].sum() for st in strata)
        # the reported interval holds this one: a look it does not meet is not worth the bootstrap
        quick = half_width(d, *_stratified_t(strata, "diag", "tot", level)) if math.isfinite(d) else None
        if not last and (quick is None or not math.isfinite(quick) or quick > rel_tol * d):
            continue
        out = _summarize(strata, level, bootstrap, np.random.default_rng(seed))
        if _met(out, rel_tol) or last:
            out["converged"] = _met(out, rel_tol)
            return out
    raise AssertionError("unreachable: the last look returns")


@register("diagshare", cost="d HVPs up to exact_threshold (2048) and hvps (1024); above, one exact column per "
          "HVP, min(n_l, k, c) per block (k = 256) with the cap c fitting hvps (1024) over all blocks, in looks that "
          "may stop earlier once diagshare_err <= rel_tol (0.2) x diagshare")
def diagshare(
    land: Any,
    *,
    blocks: str | Sequence[str] | None = None,
    exact_threshold: int = 2048,
    k: int = 256,
    level: float = 0.95,
    bootstrap: int = 1000,
    hvps: int = 1024,
    rel_tol: float = 0.2,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> dict:
    """Diagonal mass share ``delta`` of the Hessian, per block, and the block-diagonal share, with baselines.

    Args:
        land: the Landscape.
        blocks: glob patterns of block names (default all); shares are of the selected coordinates.
        exact_threshold: up to this many selected coordinates the dense Hessian is built (``d`` HVPs).
        k: sampled columns per block above it, at most (the budget may give fewer).
        hvps: the budget in HVPs (exact columns) for all blocks together: a cap when ``rel_tol`` stops early.
        rel_tol: when sampling, stop at the first look (module docstring, "Stopping") where
            ``diagshare_err <= rel_tol * diagshare``; 0 spends the whole budget. The default 0.2 resolves a
            1.5x difference ((1 + 0.2) / (1 - 0.2)) between two probes, and the share is read against the
            Wigner and OLS baselines, from which network Hessians sit several times away: a tighter interval
            would cost HVPs without changing the reading; the budget stays the cap.
        level, bootstrap: confidence level and resamples of the bootstrap interval.
        seed, generator: the randomness (column draws, bootstrap).

    Returns ``diagshare``, ``diagshare_err``, ``diagshare_ci``, ``blockdiag_share`` (``_err``, ``_ci``), ``exact``,
    ``columns``, ``hvps`` (spent, never above ``budget``), ``budget`` (the cap), ``converged`` (the whole-model
    interval meets ``rel_tol``; always True with ``rel_tol=0`` or when exact); the baselines for the same ``d`` and
    ``n = land.n_samples``: ``wigner`` (:func:`wigner_baseline`), ``ols`` (:func:`ols_baseline`) and for the
    block-diagonal share ``blockdiag_wigner = sum n_l^2 / d^2`` and ``blockdiag_ols`` (every diagonal entry 1,
    every off-diagonal one ``sqrt(2/(pi n))``); and ``blocks`` with each block's share, its ``columns`` and its
    own ``d``, ``wigner``, ``ols``. Errors: 0 when exact, else interval half-widths (module docstring).

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> model = nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(3, 1, dtype=torch.float64)))
    >>> out = diagshare(land)          # H = 2 X^T X / 3 = [[4, 0], [0, 4/3]]: purely diagonal
    >>> out["diagshare"], out["exact"], out["n"], round(out["ols"], 4)
    (1.0, True, 3, 0.6846)
    """
    if k < 2 or bootstrap < 10 or not 0.0 < level < 1.0 or exact_threshold < 0:
        raise ConfigurationError(
            f"diagshare needs k >= 2, bootstrap >= 10, 0 < level < 1 and exact_threshold >= 0; got k={k}, "
            f"bootstrap={bootstrap}, level={level}, exact_threshold={exact_threshold}"
        )
    if isinstance(hvps, bool) or not isinstance(hvps, (int, np.integer)) or hvps < 1:
        raise ConfigurationError(f"diagshare needs an integer budget hvps >= 1, got hvps={hvps!r}")
    rel_tol = check_rel_tol("diagshare", rel_tol)
    chosen = select_blocks(land.space.blocks, blocks)
    gen = resolve_generator(seed, generator)
    batch = getattr(land, "chunk_size", 16)
    reader = ColumnReader.on(land, "diagshare", checked(land.hvp))
    reuse = Reuse(land, "diagshare")
    d = sum(b.size for b in chosen)
    if d <= min(exact_threshold, hvps):
        idx = torch.cat([torch.arange(b.start, b.stop) for b in chosen])
        out = _exact(land, chosen, idx, batch, reader)
        out["converged"] = True
    elif rel_tol > 0:
        out = _in_rounds(chosen, k, hvps, level, bootstrap, rel_tol, gen, reader)
    else:
        columns = plan_columns([b.size for b in chosen], budget=hvps, k=k)
        out = _sampled(chosen, columns, level, bootstrap, gen, reader)
        out["converged"] = True
    for source, count in reader.received.items():
        reuse.note(COLUMNS, source, count)
    n = int(land.n_samples)
    bw, bo = _blockdiag_baselines([b.size for b in chosen], n)
    # hvps: only those spent here; columns rmed read are named in ``shared`` and counted in ``shared_hvps``
    out.update({"d": d, "n": n, "wigner": wigner_baseline(d), "ols": ols_baseline(d, n),
                "blockdiag_wigner": bw, "blockdiag_ols": bo, "hvps": reader.spent, "budget": hvps})
    out.update(reuse.fields())
    for b in chosen:
        out["blocks"][b.name].update({"d": b.size, "wigner": wigner_baseline(b.size),
                                      "ols": ols_baseline(b.size, n)})
    return out
