"""Streaming statistics of gradient noise ``ξ_p = g_p − ḡ`` over P gradient samples, in bounded memory.

The noise metrics read a gradient source (:mod:`geomprobe.engine.persample`) through :func:`collect_noise`, which
keeps only what the estimates need:

- the per-coordinate mean and variance of the samples (``2d`` numbers, Chan's parallel update);
- the samples on a fixed random subset of coordinates (``P × m``, ``m`` capped by ``tail_values``) for the
  tail indices, stratified so every block has enough values;
- per sample: ``‖ξ_p‖²``, per-block ``‖ξ_p‖²`` and projections on given directions;
- per group of samples (for the delete-a-group jackknife): the sums that leave-one-group-out estimates need,
  and unbiased moments ``tr Σ, (tr Σ)², tr Σ²`` (:func:`~geomprobe.stats.covariance.trace_moments`).

Each statistic is computed for one or more *views* of the noise, ``s ⊙ ξ`` for a diagonal scaling ``s``
(``None`` = the raw noise; the preconditioned noise ``Pξ`` is the view ``s = diag P``).

Memory: when the samples (``P·d``) and their Gram matrix (``P²``) fit in ``max_elements`` they are held
(float64) and the Gram matrix is exact: one pass. Otherwise two passes over the source (the first finds
``ḡ``), holding groups of ``c = max(8, min(max_elements/d, sqrt(max_elements)))`` samples, and the moments
of ``Σ`` come from each group's own Gram matrix (still unbiased, with more variance). A group's rows stay in
the source's dtype and are taken to float64 a slice of columns at a time (``max_elements / 4`` values), so
beyond the rows themselves the statistics hold a few float64 d-vectors (mean, variance, a group's sums).
Cost: P gradients per pass; O(P·d) arithmetic plus O(P²·d) for an exact Gram matrix.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigurationError, NonFiniteLossError
from .covariance import balanced_groups, jackknife_se, moments_from_sums, trace_moments
from .sampling import random_prefix


class Block(Protocol):
    """A named slice ``[start, stop)`` of the flat vector (a :class:`geomprobe.engine.paramspace.Block`)."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int: ...

    @property
    def slice(self) -> slice: ...


__all__ = ["NoiseStats", "ViewStats", "collect_noise", "tail_coordinates", "DEFAULT_MAX_ELEMENTS"]

DEFAULT_MAX_ELEMENTS = 2**24  # 128 MiB of float64 held at once
_MIN_GROUP = 8


@dataclass
class ViewStats:
    """Per-sample and per-group sums for one view ``s ⊙ ξ`` of the noise (float64, on the model's device)."""

    scale: torch.Tensor | None
    sq: torch.Tensor                      # (P,)  ‖s⊙ξ_p‖²
    block_sq: torch.Tensor                # (P, B)
    proj: torch.Tensor | None             # (P, k) (s⊙u_j)ᵀ g_p, uncentered
    mean_norm2: float = 0.0               # ‖s⊙ḡ‖²
    block_mean_norm2: list[float] = field(default_factory=list)
    g_snorm2: list[float] = field(default_factory=list)        # ‖Σ_{p∈g} s⊙ξ_p‖² per group
    g_sdot: list[float] = field(default_factory=list)          # Σ_{p∈g} (s⊙ξ_p)ᵀ(s⊙ḡ)
    g_block_snorm2: list[list[float]] = field(default_factory=list)
    cv: float | None = None
    cv_R: list[float | None] = field(default_factory=list)     # leave-one-group-out replicates
    block_cv: list[float | None] = field(default_factory=list)
    block_cv_R: list[list[float | None]] = field(default_factory=list)
    moments: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    moments_R: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class NoiseStats:
    """What :func:`collect_noise` keeps; see the module docstring."""

    P: int
    d: int
    exact: bool
    passes: int
    groups: list[slice]
    blocks: list[Block]
    mean: torch.Tensor                    # (d,) ḡ, float64
    var: torch.Tensor                     # (d,) per-coordinate variance, divisor P − 1
    coords: torch.Tensor                  # (m,) sorted coordinate indices
    sub: torch.Tensor                     # (P, m) centered noise on those coordinates
    views: dict[str, ViewStats]

    def leave_out(self, g: int) -> int:
        """Number of samples left when group ``g`` is removed."""
        return self.P - (self.groups[g].stop - self.groups[g].start)


def tail_coordinates(
    blocks: Sequence[Block], P: int, tail_values: int, generator: torch.Generator, *, min_block_values: int = 4096
) -> torch.Tensor:
    """Sorted coordinate indices, ``≈ tail_values / P`` in all, drawn per block in proportion to its size.

    Every block gets at least ``min(size, ⌈min_block_values / P⌉)`` coordinates so that its own tail index
    has enough values. Drawn without replacement from ``generator``; all coordinates when they fit.
    """
    d = blocks[-1].stop
    m = max(1, tail_values // P)
    if m >= d:
        return torch.arange(d)
    floor = math.ceil(min_block_values / P)
    out = []
    for b in blocks:
        q = min(b.size, max(floor, math.ceil(m * b.size / d)))
        out.append(b.start + random_prefix(b.size, q, generator))
    return torch.sort(torch.cat(out)).values


def _regroup(chunks: Iterable[torch.Tensor], sizes: Sequence[int], f64: dict) -> Iterator[torch.Tensor]:
    """Re-cut a stream of row blocks into blocks of exactly ``sizes`` rows (on the given device, in their own
    dtype)."""
    buf: list[torch.Tensor] = []
    have = 0
    it = iter(sizes)
    want = next(it, None)
    for c in chunks:
        # kept in the source's dtype and on its device: converted to float64 a slice of columns at a time
        c = c.detach().to(device=f64["device"])
        while c.shape[0] > 0 and want is not None:
            take = min(want - have, c.shape[0])
            buf.append(c[:take])
            have += take
            c = c[take:]
            if have == want:
                yield torch.cat(buf)
                buf, have = [], 0
                want = next(it, None)
    if want is not None:
        raise ConfigurationError("the gradient source gave fewer samples on a second pass than on the first")


def _check_finite(rows: torch.Tensor, offset: int) -> None:
    if bool(torch.isfinite(rows.sum())):  # the common case in one read of the rows (see linalg.vectors.all_finite)
        return
    bad = ~torch.isfinite(rows).all(1)
    if bool(bad.any()):
        p = offset + int(bad.nonzero()[0])
        raise NonFiniteLossError(
            f"gradient sample {p} has non-finite entries at the current parameters; the noise is undefined here"
        )


def collect_noise(
    source: Any,
    blocks: Sequence[Block],
    *,
    views: dict[str, torch.Tensor | None] | None = None,
    directions: torch.Tensor | None = None,
    tail_values: int = 2**19,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    groups: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> NoiseStats:
    """Stream the gradient samples of ``source`` (an iterable of ``(c, d)`` row blocks with ``len`` = P) once
    or twice and keep the statistics listed in the module docstring.

    ``views`` maps a name to a diagonal scaling ``(d,)`` or None (default ``{"raw": None}``); ``directions``
    ``(k, d)`` are unit vectors to project each view's noise on; ``groups`` is the number of jackknife groups
    when the samples are held (otherwise one per held group of rows). Sums are float64 on ``device`` (the
    model's; default CPU); the coordinate subset comes from ``generator`` (CPU).
    """
    P = len(source)
    blocks = list(blocks)
    d = blocks[-1].stop
    if P < 8:
        raise ConfigurationError(f"noise statistics need at least 8 gradient samples, got {P}")
    views = {"raw": None} if views is None else views
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f64 = {"dtype": torch.float64, "device": dev}
    scales = {k: (None if s is None else s.detach().to(**f64)) for k, s in views.items()}
    dirs = None if directions is None else directions.detach().to(**f64).reshape(-1, d)
    coords = tail_coordinates(blocks, P, tail_values, gen).to(dev)
    # Held rows (P x d) and the Gram matrix (P x P) must both fit; otherwise groups of c rows at a time.
    c = max(_MIN_GROUP, min(max_elements // d, math.isqrt(max_elements)))
    exact = P <= c
    if exact:
        group_slices = balanced_groups(P, min(groups, P))
    else:
        group_slices = balanced_groups(P, math.ceil(P / c))

    # ---- pass 1: mean and variance per coordinate, the tail subset, projections (and all rows if they fit)
    mean = torch.zeros(d, **f64)
    M2 = torch.zeros(d, **f64)
    held = torch.empty(P, d, **f64) if exact else None
    sub = torch.empty(P, coords.numel(), **f64)
    proj = {k: (None if dirs is None else torch.empty(P, dirs.shape[0], **f64)) for k in scales}
    n = 0
    for rows in source:
        rows = rows.detach().to(device=dev)
        r = rows.shape[0]
        if n + r > P:
            raise ConfigurationError(f"the gradient source gave more than its stated {P} samples")
        _check_finite(rows, n)
        for k in proj:
            if proj[k] is not None:
                proj[k][n : n + r] = 0
        # float64 a slice of columns at a time: a whole block of rows in float64, and its temporaries, would
        # be several times the rows themselves (24-32 GB at 124M parameters)
        for cs in _column_slices(d, r, max_elements):
            x = rows[:, cs].to(**f64)
            mc = x.mean(0)
            m2c = ((x - mc) ** 2).sum(0)
            delta = mc - mean[cs]
            mean[cs] += delta * (r / (n + r))
            M2[cs] += m2c + delta**2 * (n * r / (n + r))
            for k, s in scales.items():
                if dirs is not None:
                    proj[k][n : n + r] += x @ (dirs[:, cs] if s is None else dirs[:, cs] * s[cs]).T
            if held is not None:
                held[n : n + r, cs] = x
        sub[n : n + r] = rows[:, coords].to(**f64)
        n += r
    if n != P:
        raise ConfigurationError(f"the gradient source gave {n} samples, expected {P}")
    var = M2 / (P - 1)
    stats = NoiseStats(P, d, exact, 1 if exact else 2, group_slices, blocks, mean, var, coords,
                       sub - mean[coords], {})

    # ---- pass 2: centered per-sample and per-group sums for every view
    B = len(blocks)
    for k, s in scales.items():
        stats.views[k] = ViewStats(s, torch.empty(P, **f64), torch.empty(P, B, **f64), proj[k])
    sizes = [g.stop - g.start for g in group_slices]
    rows_iter = (held[g] for g in group_slices) if exact else _regroup(source, sizes, f64)
    for gi, (g, rows) in enumerate(zip(group_slices, rows_iter)):
        for k, s in scales.items():
            _group_sums(stats, stats.views[k], rows, mean, s, M2 if s is None else M2 * s * s, g,
                        mean if s is None else mean * s, gram=not exact, max_elements=max_elements)
    for k, s in scales.items():
        v = stats.views[k]
        mv = mean if s is None else mean * s
        v.mean_norm2 = float(mv @ mv)
        v.block_mean_norm2 = _block_norms2(mv, blocks)
        M2v = M2 if s is None else M2 * s * s
        v.cv = _cv(M2v)
        v.block_cv = _block_cvs(M2v, blocks)
        if exact:
            _exact_moments(stats, v, held, s)
        else:
            _pooled_moments(stats, v)
    return stats


def _cv(M2: torch.Tensor) -> float | None:
    """``std(c)/mean(c)`` over coordinates of per-coordinate variances ``c`` (scale-free, so M2 will do)."""
    m = float(M2.mean())
    return float(M2.std(correction=0)) / m if m > 0 and M2.numel() > 0 else None


class _Overlaps:
    """Which blocks overlap a slice of columns. For blocks in order without overlap (a parameter space's) only
    those, found by bisection, so a pass over column slices takes slices + blocks steps, not slices x blocks
    (35,000 a group on GPT-2); every block otherwise."""

    def __init__(self, blocks: Sequence[Block]):
        self.starts = [b.start for b in blocks]
        self.stops = [b.stop for b in blocks]
        self.ordered = all(self.stops[i] <= self.starts[i + 1] for i in range(len(blocks) - 1))

    def __call__(self, cs: slice) -> range:
        if not self.ordered:
            return range(len(self.starts))
        return range(bisect.bisect_right(self.stops, cs.start), bisect.bisect_left(self.starts, cs.stop))


def _block_norms2(x: torch.Tensor, blocks: Sequence[Block]) -> list[float]:
    """``‖x_b‖²`` per block, each the dot product a per-block read took, read from the device at once."""
    if not blocks:
        return []
    return torch.stack([x[b.slice] @ x[b.slice] for b in blocks]).tolist()


def _block_cvs(M2: torch.Tensor, blocks: Sequence[Block]) -> list[float | None]:
    """:func:`_cv` of every block's slice of ``M2``: its means and standard deviations computed per block where
    ``M2`` lives and read at once (one wait for the device per call, not two per block)."""
    if not blocks:
        return []
    ms = torch.stack([torch.stack([M2[b.slice].mean(), M2[b.slice].std(correction=0)]) for b in blocks]).tolist()
    return [sd / m if m > 0 and b.stop > b.start else None for b, (m, sd) in zip(blocks, ms)]


def _group_sums(stats: NoiseStats, v: ViewStats, rows: torch.Tensor, mean: torch.Tensor, s: torch.Tensor | None,
                M2v: torch.Tensor, g: slice, mv: torch.Tensor, *, gram: bool, max_elements: int) -> None:
    """One group's sums for view ``v``: ``y = (rows - mean) * s``, taken a slice of columns at a time in float64
    (the group's rows stay in their own dtype), so memory beyond the rows is a few d-vectors and one slice."""
    f64 = {"dtype": torch.float64, "device": mean.device}
    r, d = rows.shape[0], mean.shape[0]
    sq = torch.zeros(r, **f64)
    block_sq = torch.zeros(r, len(stats.blocks), **f64)
    sg = torch.empty(d, **f64)
    y2_sum = torch.empty(d, **f64)
    G = torch.zeros(r, r, **f64) if gram else None
    overlapping = _Overlaps(stats.blocks)
    for cs in _column_slices(d, r, max_elements):
        y = rows[:, cs].to(**f64) - mean[cs]
        if s is not None:
            y *= s[cs]
        y2 = y * y
        sq += y2.sum(1)
        for j in overlapping(cs):
            b = stats.blocks[j]
            lo, hi = max(b.start, cs.start), min(b.stop, cs.stop)
            if lo < hi:
                block_sq[:, j] += y2[:, lo - cs.start : hi - cs.start].sum(1)
        sg[cs] = y.sum(0)
        y2_sum[cs] = y2.sum(0)
        if G is not None:
            G += y @ y.T
    v.sq[g] = sq
    v.block_sq[g] = block_sq
    v.g_snorm2.append(float(sg @ sg))
    v.g_sdot.append(float(sg @ mv))
    v.g_block_snorm2.append(_block_norms2(sg, stats.blocks))
    # Per-coordinate variance without this group: the rest has mean ḡ − s_g/n_R (in ξ units).
    n_R = stats.P - r
    M2_R = M2v - y2_sum - sg * sg / n_R
    v.cv_R.append(_cv(M2_R))
    v.block_cv_R.append(_block_cvs(M2_R, stats.blocks))
    if G is not None:
        v.moments_R.append(trace_moments(G))  # this group's own moments; pooled later


def _column_slices(d: int, rows: int, max_elements: int) -> Iterator[slice]:
    """Slices of columns holding about ``max_elements / 4`` entries of ``rows`` rows each (a float64 slice and
    its temporaries stay within ``max_elements`` values)."""
    step = max(1, max_elements // (4 * max(rows, 1)))
    for a in range(0, d, step):
        yield slice(a, min(a + step, d))


def _pooled_moments(stats: NoiseStats, v: ViewStats) -> None:
    """Chunked mode: average the groups' unbiased moments, weighted by their number of pairs."""
    w = [(g.stop - g.start) * (g.stop - g.start - 1) for g in stats.groups]
    own = v.moments_R

    def avg(keep: list[int]) -> tuple[float, float, float]:
        tot = sum(w[i] for i in keep)
        return tuple(sum(w[i] * own[i][j] for i in keep) / tot for j in range(3))  # type: ignore[return-value]

    G = len(stats.groups)
    v.moments = avg(list(range(G)))
    v.moments_R = [avg([i for i in range(G) if i != g]) for g in range(G)]


def _exact_moments(stats: NoiseStats, v: ViewStats, held: torch.Tensor, s: torch.Tensor | None) -> None:
    """Held samples: the full Gram matrix, built over column slices to bound the temporary memory."""
    P, d = held.shape
    K = torch.zeros(P, P, dtype=torch.float64, device=held.device)
    width = max(1, DEFAULT_MAX_ELEMENTS // (4 * P))
    for a in range(0, d, width):
        y = held[:, a : a + width] - stats.mean[a : a + width]
        if s is not None:
            y = y * s[a : a + width]
        K += y @ y.T
    v.moments = trace_moments(K)
    diag, rows, frob2 = K.diagonal(), K.sum(1), float((K * K).sum())
    v.moments_R = []
    for g in stats.groups:
        # Remove group g's rows and columns through the sums alone (moments_from_sums).
        Kg = K[g]
        keep = torch.ones(P, dtype=torch.bool, device=K.device)
        keep[g] = False
        rows_R = (rows - Kg.sum(0))[keep]
        frob2_R = frob2 - 2 * float((Kg * Kg).sum()) + float((Kg[:, g] ** 2).sum())
        v.moments_R.append(moments_from_sums(int(keep.sum()), diag[keep], rows_R, frob2_R))


# ------------------------------------------------------------------------------------- derived estimates
def trace_estimates(stats: NoiseStats, v: ViewStats, block: int | None = None) -> dict[str, Any]:
    """``tr Σ`` (unbiased, divisor P−1), ``‖G‖²`` (unbiased: ``‖ḡ‖² − tr Σ/P``) and their leave-one-group-out
    replicates, for the whole view or one block."""
    P = stats.P
    sq = v.sq if block is None else v.block_sq[:, block]
    mn2 = v.mean_norm2 if block is None else v.block_mean_norm2[block]
    A = float(sq.sum())
    trace = A / (P - 1)
    out: dict[str, Any] = {"trace": trace, "g2": mn2 - trace / P, "trace_R": [], "g2_R": []}
    for gi, g in enumerate(stats.groups):
        n_R = stats.leave_out(gi)
        snorm2 = v.g_snorm2[gi] if block is None else v.g_block_snorm2[gi][block]
        tr_R = (A - float(sq[g].sum()) - snorm2 / n_R) / (n_R - 1)
        out["trace_R"].append(tr_R)
        if block is None:
            mn2_R = mn2 - 2 * v.g_sdot[gi] / n_R + snorm2 / n_R**2
            out["g2_R"].append(mn2_R - tr_R / n_R)
    return out


def projection_variances(stats: NoiseStats, v: ViewStats) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Variance over samples of each projection (divisor P−1), and its leave-one-group-out replicates."""
    if v.proj is None:
        return None
    full = v.proj.var(0)
    reps = []
    for g in stats.groups:
        keep = torch.ones(stats.P, dtype=torch.bool, device=v.proj.device)
        keep[g] = False
        reps.append(v.proj[keep].var(0))
    return full, reps


def ratio(num: float | None, den: float | None) -> float | None:
    """``num/den`` when both are defined and ``den > 0``; None otherwise."""
    if num is None or den is None or not den > 0:
        return None
    return num / den


def with_error(value: float | None, replicates: Sequence[float | None]) -> tuple[float | None, float | None]:
    """A point estimate and its delete-a-group jackknife standard error (None when undefined)."""
    if value is None:
        return None, None
    return value, jackknife_se(replicates)
