"""Helpers the geometry metrics share: block selection, local randomness, order-statistic intervals.

Private: the metrics re-export nothing from here. Everything is plain Python/numpy on small arrays; the
HVP-heavy work stays in :mod:`geomprobe.linalg`.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigurationError, NonFiniteLossError
from ..linalg.vectors import all_finite, default_generator
from ..stats.student import t_quantile  # noqa: F401  (the metrics import it from here)

Matvec = Callable[[torch.Tensor], torch.Tensor]


def resolve_generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    """``generator`` when given, else a fresh CPU generator seeded with ``seed`` (never the global RNG)."""
    return generator if generator is not None else default_generator(seed)


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator``, so bootstrap draws follow the metric's one seed."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
    return np.random.default_rng(seed)


def select_blocks(blocks: Sequence[Any], patterns: str | Sequence[str] | None) -> list[Any]:
    """The blocks whose names match one of the glob ``patterns`` (all blocks for ``None``).

    Raises ConfigurationError naming the available blocks when nothing matches, since a metric over no
    coordinates has nothing to report.
    """
    blocks = list(blocks)
    if not blocks:
        raise ConfigurationError("the Landscape has no parameter blocks; select parameters with params=")
    if patterns is None:
        return blocks
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = [b for b in blocks if any(fnmatch.fnmatchcase(b.name, p) for p in pats)]
    if not chosen:
        shown = ", ".join(b.name for b in blocks[:12]) + (" ..." if len(blocks) > 12 else "")
        raise ConfigurationError(
            f"no parameter block matches blocks={pats!r}; available blocks: {shown}. "
            "Pass glob patterns of block names, or blocks=None for all"
        )
    return chosen


def checked(matvec: Matvec, what: str = "Hessian-vector product") -> Matvec:
    """Wrap ``matvec`` so a NaN/inf result raises NonFiniteLossError instead of poisoning the statistic."""

    def mv(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v)
        if not all_finite(out):
            raise NonFiniteLossError(
                f"a {what} returned NaN or infinite entries at the current parameters; the curvature is "
                "not defined here (check the loss for overflow, or probe an earlier step)"
            )
        return out

    return mv


def column_batches(matvec: Matvec, dim: int, idx: torch.Tensor, *, batch: int, dtype: torch.dtype,
                   device: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(part, C)`` for consecutive parts of ``idx`` of at most ``batch`` indices, ``C[i] = H e_part[i]`` the
    rows ``matvec`` returned (its own tensor: the caller may overwrite it). Cost: one HVP per index.

    :func:`geomprobe.linalg.exact.hessian_columns` of each part, without its two full-size passes per part: a
    fresh zero block of unit vectors (here one block, its few ones moved from part to part) and the
    concatenation of its single result (a copy of every ``(batch, d)`` block; on the CPU a pass over 16 x d
    entries costs about what the HVP's own elementwise work does). Same values."""
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= dim):
        raise ConfigurationError(f"column indices must lie in [0, {dim}), got range [{int(idx.min())}, {int(idx.max())}]")
    if not idx.numel():
        return
    E = torch.zeros(min(batch, idx.numel()), dim, dtype=dtype, device=device)
    rows = torch.arange(E.shape[0], device=E.device)
    for s in range(0, idx.numel(), batch):
        part = idx[s : s + batch]
        n, at = part.numel(), part.to(E.device)
        E[rows[:n], at] = 1
        # the matvec returns before the ones are cleared, and on a device the clearing is queued after it
        yield part, matvec(E[:n]).reshape(n, dim)
        E[rows[:n], at] = 0


def exact_diagonal_chunked(matvec: Matvec, dim: int, idx: torch.Tensor, *, batch: int, dtype: torch.dtype,
                           device: Any) -> torch.Tensor:
    """Exact ``H_jj`` for ``j`` in ``idx`` (float64, CPU), ``batch`` columns at a time.

    Same values and cost (one HVP per index) as :func:`geomprobe.linalg.exact.exact_diagonal`, but only one chunk
    of full columns ``(batch, d)`` is alive at once, so thousands of entries of a large model fit in memory.
    """
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    out = torch.empty(idx.numel(), dtype=torch.float64)
    for s, (part, cols) in zip(range(0, idx.numel(), batch),
                               column_batches(matvec, dim, idx, batch=batch, dtype=dtype, device=device)):
        out[s : s + batch] = cols[torch.arange(part.numel()), part.to(cols.device)].double().cpu()
    return out


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when the ratio is undefined (den = 0) or not finite (JSON has no inf)."""
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def half_width(x: float | None, lo: float | None, hi: float | None) -> float | None:
    """The larger distance from ``x`` to an interval end: ``[x - err, x + err]`` covers ``[lo, hi]``."""
    if x is None or lo is None or hi is None:
        return None
    return max(x - lo, hi - x, 0.0)


def _binom_cdf(n: int, p: float) -> list[float]:
    """``P(Bin(n, p) <= j)`` for ``j = 0..n``, via log-space terms (n up to a few 1e4 is instant)."""
    if p <= 0.0:
        return [1.0] * (n + 1)
    if p >= 1.0:
        return [0.0] * n + [1.0]
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq)
        for j in range(n + 1)
    ]
    out, acc = [], 0.0
    for t in terms:
        acc += t
        out.append(min(acc, 1.0))
    return out


@functools.lru_cache(maxsize=1024)  # every block of a plan asks for the same few (n, p, level): O(n) each
def order_stat_ranks(n: int, p: float, level: float) -> tuple[int, int]:
    """1-based ranks ``(l, u)`` with ``P(x_(l) <= xi_p <= x_(u)) >= level`` for a sample of size ``n``.

    Distribution-free: the number of sample points below the population ``p``-quantile ``xi_p`` is
    Binomial(n, p), so ``l`` is the largest rank with ``P(B <= l - 1) <= alpha/2`` and ``u`` the smallest
    with ``P(B <= u - 1) >= 1 - alpha/2``. Sampling without replacement from a finite block only tightens
    the coverage (the hypergeometric law is more concentrated). Ranks may fall outside ``[1, n]`` (0 or
    ``n + 1``) when the sample is too small for that side: the interval is then open on that side.

    >>> order_stat_ranks(100, 0.5, 0.95)
    (40, 61)
    """
    alpha = 1.0 - level
    cdf = _binom_cdf(n, p)
    lower = 0
    for r in range(1, n + 1):
        if cdf[r - 1] <= alpha / 2:
            lower = r
        else:
            break
    upper = n + 1
    for r in range(1, n + 1):
        if cdf[r - 1] >= 1 - alpha / 2:
            upper = r
            break
    return lower, upper


def quantile_ci(
    sample: np.ndarray, p: float, level: float, *, floor: float = 0.0, ceiling: float | None = None
) -> tuple[float, float]:
    """Order-statistic interval for the population ``p``-quantile; open sides become ``floor``/``ceiling``."""
    x = np.sort(np.asarray(sample, dtype=np.float64))
    lo_r, hi_r = order_stat_ranks(len(x), p, level)
    lo = float(x[lo_r - 1]) if lo_r >= 1 else floor
    if hi_r <= len(x):
        hi = float(x[hi_r - 1])
    else:
        hi = float(ceiling) if ceiling is not None else math.inf
    return lo, hi


def weighted_quantile(values: np.ndarray, weights: np.ndarray, p: float) -> float:
    """The smallest value whose cumulative weight reaches ``p`` of the total (inverted-CDF quantile)."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    i = int(np.searchsorted(cw, p * cw[-1], side="left"))
    return float(v[min(i, len(v) - 1)])


def z_of(level: float) -> float:
    """Two-sided normal quantile for a confidence ``level`` (0.95 -> 1.96)."""
    if not 0.0 < level < 1.0:
        raise ConfigurationError(f"confidence level must lie in (0, 1), got {level!r}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def stratified_quantile_ci(strata: Sequence[tuple[np.ndarray, int, bool]], p: float, level: float, *,
                           floor: float = 0.0, ceiling: float = math.inf) -> tuple[float, float]:
    """Interval for the ``p``-quantile of a population made of strata, by inverting a test on its CDF.

    ``strata`` are ``(sample, size, exact)``: a uniform sample without replacement of a stratum of ``size``
    values (``exact``: the sample is the whole stratum). At each candidate ``x`` the population CDF is
    ``F(x) = sum_l (n_l / N) F_l(x)``, estimated with variance ``sum_l (n_l / N)^2 p_l (1 - p_l) / k_l
    (1 - k_l / n_l)`` (``p_l`` shrunk to ``(k_l F_l + 1/2) / (k_l + 1)``, so that a stratum lying entirely
    on one side still counts). The interval holds the ``x`` where ``|F_hat(x) - p| <= z se(x)``: its lower
    end the smallest sample value whose upper band reaches ``p`` (``floor`` if the smallest already does),
    its upper end the smallest whose lower band does (``ceiling`` if none). Unlike a percentile bootstrap it
    stays honest with a few dozen values per stratum.
    """
    z = z_of(level)
    total = float(sum(n for _, n, _ in strata))
    grid = np.unique(np.concatenate([np.asarray(v, dtype=np.float64) for v, _, _ in strata]))
    F = np.zeros(len(grid))
    var = np.zeros(len(grid))
    for v, n, exact in strata:
        v = np.sort(np.asarray(v, dtype=np.float64))
        k = len(v)
        w = n / total
        Fl = np.searchsorted(v, grid, side="right") / k
        F += w * Fl
        if not exact and k < n:
            pl = (k * Fl + 0.5) / (k + 1)
            var += w * w * pl * (1 - pl) / k * (1 - k / n)
    se = np.sqrt(var)
    tie = 1e-12  # F is a sum of rounded fractions: a whole stratum's exact p must not read as just below p
    up = np.nonzero(F + z * se >= p - tie)[0]
    lo_ok = np.nonzero(F - z * se >= p - tie)[0]
    lo = floor if not len(up) or up[0] == 0 else float(grid[up[0]])
    hi = float(grid[lo_ok[0]]) if len(lo_ok) else ceiling
    return lo, hi


def plan_options(land: Any) -> dict[str, bool]:
    """The Lanczos options a memory plan decides for runs on ``land``: ``delayed`` (:func:`delayed_fits`) and
    ``selective`` (:func:`selective_fits`). (A float32 host basis for a half-precision model, Lanczos'
    ``basis_dtype``, is not one of them: measured slower on the 1B Llama, benchmarks/RESULTS.md section 6.)"""
    return {"delayed": delayed_fits(land), "selective": selective_fits(land)}


def lanczos_placement(land: Any, basis_device: Any = None) -> dict[str, Any]:
    """Where a metric's Lanczos run on ``land`` keeps its vectors: ``device``, ``basis_device`` and ``lean`` for
    :func:`~geomprobe.linalg.lanczos.lanczos`. Where the Landscape's vectors live (host memory in the host-vector
    mode), the basis where asked; but with host vectors and a plan whose ``working_vectors`` is ``"device"``,
    the working vectors on the model's device with the basis in host memory, two d-vectors there (lean; one
    where the plan's ``working_vectors`` is ``"streamed"``: each product reads its input from the host row)."""
    plan = getattr(land, "plan", None)
    where = getattr(land, "vector_device", None) or land.device
    working = getattr(plan, "working_vectors", None)
    if working in ("device", "streamed") and torch.device(where).type == "cpu":
        return {"device": land.device, "basis_device": "cpu", "lean": True if working == "device" else working}
    return {"device": where, "basis_device": basis_device, "lean": False}


def selective_fits(land: Any) -> bool:
    """Whether a Lanczos run on ``land`` may keep converged Ritz vectors for selective orthogonalization (up to
    :data:`~geomprobe.linalg.orthogonality.SELECTIVE_VECTORS` d-vectors beside its basis): where the memory plan
    counted them (``items["selective_work"]``), where the vectors live in host memory (none on the device), and
    always without a budget. Else the run takes whole-basis steps where it would have kept them."""
    plan = getattr(land, "plan", None)
    if getattr(plan, "budget_bytes", None) is None:
        return True
    if getattr(plan, "vectors", None) == "host" or getattr(plan, "vector_device", None) == "cpu":
        return True
    items = plan.items if isinstance(getattr(plan, "items", None), dict) else {}
    return items.get("selective_work", 0) > 0


def delayed_fits(land: Any) -> bool:
    """Whether a Lanczos run on ``land`` may run its passes over an offloaded basis beside the products
    (:mod:`geomprobe.linalg.delayed_lanczos`), which holds
    :data:`~geomprobe.linalg.delayed_lanczos.DELAYED_EXTRA_VECTORS` more d-vectors on the device: where the
    memory plan counted them (``items["delayed_work"]``, when it put the basis in host memory and its budget
    held them); always without a budget."""
    plan = getattr(land, "plan", None)
    if getattr(plan, "budget_bytes", None) is None:
        return True
    items = plan.items if isinstance(getattr(plan, "items", None), dict) else {}
    return items.get("delayed_work", 0) > 0
