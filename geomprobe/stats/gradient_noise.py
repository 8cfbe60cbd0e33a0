"""Streaming statistics of gradient noise ``ξ_p = g_p − ḡ`` over P gradient samples, in bounded memory.

The noise metrics read a gradient source (:mod:`geomprobe.engine.persample`) through :func:`collect_noise`, which
keeps only what the estimates need:

- the per-coordinate mean of the samples and, when asked (``coordinate_variance``), their variance (``2d``
  numbers, Chan's parallel update);
- the samples on a fixed random subset of coordinates (``P × m``, ``m`` capped by ``tail_values``) for the
  tail indices, stratified so every block has enough values;
- per sample: ``‖ξ_p‖²``, per-block ``‖ξ_p‖²`` and projections on given directions;
- per group of samples (for the delete-a-group jackknife): the sums that leave-one-group-out estimates need,
  and, when asked (``moments``), unbiased moments ``tr Σ, (tr Σ)², tr Σ²``
  (:func:`~geomprobe.stats.covariance.trace_moments`).

Each statistic is computed for one or more *views* of the noise, ``s ⊙ ξ`` for a diagonal scaling ``s``
(``None`` = the raw noise; the preconditioned noise ``Pξ`` is the view ``s = diag P``).

Passes: when the samples (``P·d``) and their Gram matrix (``P²``) fit in ``max_elements`` they are held
(float64) and the Gram matrix is exact: one pass. Otherwise two passes over the source (the first finds
``ḡ``) in groups of ``c = max(8, min(max_elements/d, sqrt(max_elements)))`` samples; the moments of ``Σ`` then
come from each group's own Gram matrix (still unbiased, with more variance), for which a group's rows are
held in the source's dtype. Without ``moments`` nothing is held: the second pass takes each block of rows
as the source yields it.

Precision: a row is taken a slice of columns at a time (``max_elements / 4`` values) into two reused
buffers in its own precision, float32 at least (float64 rows stay float64): the centered noise
``ξ = g − ḡ`` (``ḡ`` rounded to that precision), its square, and their sums over a slice's rows or a
block's columns, each a float32 reduction (pairwise: relative error a few units of 2⁻²⁴) added into float64
totals. Against float64 arithmetic throughout, every sum agrees to ``1e-6`` relative for float32 rows
(``tests/test_noise_stream.py``), below the rows' own rounding; ``ḡ``, the group sums, Chan's update, the
projections and the Gram matrices are float64. Nothing waits for the device inside a pass: finiteness and
the groups' sums are read once after it.

Memory beyond the source's rows: ``ḡ`` in float64 and in the compute precision, one float64 group sum per
view (its squares too with ``coordinate_variance``, ``M2`` in pass 1), two slice buffers; with ``moments``
one group of rows. Cost: P gradients per pass; O(P·d) arithmetic plus O(P·c·d) for the Gram matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigurationError
from .covariance import balanced_groups, jackknife_se, moments_from_sums, trace_moments
from .noise_stream import (
    FirstPass,
    GroupSums,
    Overlaps,
    Scratch,
    SlicePlans,
    column_slices,
    compute_dtype,
    piece_sums,
    regroup,
    stream_pieces,
)
from .sampling import random_prefix

# the names the streaming helpers had here (tests patch _column_slices and _Overlaps)
_column_slices = column_slices
_Overlaps = Overlaps


class Block(Protocol):
    """A named slice ``[start, stop)`` of the flat vector (a :class:`geomprobe.engine.paramspace.Block`)."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int: ...

    @property
    def slice(self) -> slice: ...


__all__ = ["DEFAULT_MAX_ELEMENTS", "NoiseStats", "ViewStats", "collect_noise", "tail_coordinates"]

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
    var: torch.Tensor | None              # (d,) per-coordinate variance, divisor P − 1 (if asked)
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
    moments: bool = True,
    coordinate_variance: bool = True,
    on_tail_sample: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
) -> NoiseStats:
    """Stream the gradient samples of ``source`` (an iterable of ``(c, d)`` row blocks with ``len`` = P) once
    or twice and keep the statistics listed in the module docstring.

    ``views`` maps a name to a diagonal scaling ``(d,)`` or None (default ``{"raw": None}``); ``directions``
    ``(k, d)`` are unit vectors to project each view's noise on; ``groups`` is the number of jackknife groups
    when the samples are held (otherwise one per group of ``c`` rows). ``moments=False`` skips the moments of
    ``Σ`` (``ViewStats.moments`` stay NaN) and with them the held groups of the second pass;
    ``coordinate_variance=False`` skips the per-coordinate variance (``var`` None, the ``cv`` fields None and
    empty). ``on_tail_sample(sub, coords)`` is called once the tail sample is complete (after the first pass),
    so a caller can start on it while the second pass runs. Sums are float64 on ``device`` (the model's;
    default CPU); the coordinate subset comes from ``generator`` (CPU).

    Cost: P gradients, twice when they are not held; the arithmetic and its precision in the module docstring.
    Errors: :class:`~geomprobe.errors.NonFiniteLossError` names the first sample with a non-finite entry;
    a source that gives another number of samples than its ``len`` on either pass is a ConfigurationError.
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
    group_slices = balanced_groups(P, min(groups, P) if exact else math.ceil(P / c))
    scratch = Scratch(dev)

    # ---- pass 1: the mean (and variance) per coordinate, the tail subset, projections (all rows if they fit)
    first = FirstPass(P, d, coords, dev, variance=coordinate_variance, held=exact, dirs=dirs, scales=scales,
                       max_elements=max_elements, scratch=scratch, slices=_column_slices)
    for rows in source:
        first.add(rows)
    mean, M2 = first.finish()
    scratch.flat.clear()  # the second pass takes its buffers in its own precision
    stats = NoiseStats(P, d, exact, 1 if exact else 2, group_slices, blocks, mean,
                       None if M2 is None else M2 / (P - 1), coords, first.sub - mean[coords], {})
    if on_tail_sample is not None:
        on_tail_sample(stats.sub, stats.coords)

    # ---- pass 2: centered per-sample and per-group sums for every view
    B = len(blocks)
    for k, s in scales.items():
        stats.views[k] = ViewStats(s, torch.zeros(P, **f64), torch.zeros(P, B, **f64), first.proj[k])
    cdt = torch.float64 if exact else compute_dtype(first.dtype or torch.float32)
    mean_c = mean.to(cdt)
    whole = exact or moments  # a group's rows arrive together (held, or regrouped for its Gram matrix)
    sums = {}
    for k, s in scales.items():
        if whole and sums:
            sums[k] = next(iter(sums.values()))  # one view after another: one set of group sums serves all
        else:
            sums[k] = GroupSums(d, dev, with_squares=coordinate_variance)
    view_c = {k: (None if s is None else s.to(cdt)) for k, s in scales.items()}
    view_mean = {k: (mean if s is None else mean * s) for k, s in scales.items()}
    plans = SlicePlans(blocks, d, max_elements, dev, slices=_column_slices)
    if exact:
        pieces: Iterator[tuple[int, int, torch.Tensor, bool]] = (
            (gi, g.start, first.held[g], True) for gi, g in enumerate(group_slices))  # type: ignore[index]
    elif moments:
        sizes = [g.stop - g.start for g in group_slices]
        pieces = ((gi, g.start, rows, True)
                  for gi, (g, rows) in enumerate(zip(group_slices, regroup(source, sizes, dev))))
    else:
        pieces = stream_pieces(source, group_slices, dev)
    for gi, n0, rows, last in pieces:
        r = rows.shape[0]
        for k, s in scales.items():
            acc = sums[k]
            if moments and not exact:
                acc.gram = torch.zeros(r, r, **f64)
            v = stats.views[k]
            piece_sums(v.sq[n0 : n0 + r], v.block_sq[n0 : n0 + r], rows, mean_c, view_c[k], acc, plans.get(r), scratch)
            if last:
                g = group_slices[gi]
                M2v = None if M2 is None else (M2 if s is None else M2 * s * s)
                _close_group(stats, stats.views[k], acc, view_mean[k], M2v, P - (g.stop - g.start))
    scratch.flat.clear()
    sums.clear()
    for k, s in scales.items():
        v = stats.views[k]
        _read_view(stats, v, view_mean[k])
        if M2 is not None:
            M2v = M2 if s is None else M2 * s * s
            v.cv = _cv(M2v)
            v.block_cv = _block_cvs(M2v, blocks)
        if moments and exact:
            _exact_moments(stats, v, first.held, s)
        elif moments:
            _pooled_moments(stats, v)
    return stats


def _block_dots(x: torch.Tensor, blocks: Sequence[Block]) -> torch.Tensor:
    """``‖x_b‖²`` per block, stacked where ``x`` lives (float64, ``(B,)``)."""
    if not blocks:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    return torch.stack([x[b.slice] @ x[b.slice] for b in blocks])


def _close_group(stats: NoiseStats, v: ViewStats, acc: GroupSums, mv: torch.Tensor, M2v: torch.Tensor | None,
                 n_R: int) -> None:
    """A finished group's sums for view ``v``, kept on the device (read once by :func:`_read_view`)."""
    sg = acc.sg
    v.g_snorm2.append(sg @ sg)
    v.g_sdot.append(sg @ mv)
    v.g_block_snorm2.append(_block_dots(sg, stats.blocks))
    if acc.y2 is not None and M2v is not None:
        # Per-coordinate variance without this group: the rest has mean ḡ − s_g/n_R (in ξ units).
        M2_R = M2v - acc.y2 - sg * sg / n_R
        v.cv_R.append(_cv(M2_R))
        v.block_cv_R.append(_block_cvs(M2_R, stats.blocks))
    if acc.gram is not None:
        v.moments_R.append(trace_moments(acc.gram))  # this group's own moments; pooled later
    acc.reset()


def _read_view(stats: NoiseStats, v: ViewStats, mv: torch.Tensor) -> None:
    """Bring a view's group sums, ``‖s⊙ḡ‖²`` per block and whole, to the host in one read; check that the
    squares stayed finite (float32 squares overflow past ``|ξ| ≈ 1.8e19``)."""
    G, B = len(stats.groups), len(stats.blocks)
    dev = mv.device
    packed = torch.cat([
        (mv @ mv).reshape(1), _block_dots(mv, stats.blocks),
        torch.stack(v.g_snorm2), torch.stack(v.g_sdot),
        torch.stack(v.g_block_snorm2).reshape(-1) if B else torch.zeros(0, dtype=torch.float64, device=dev),
        torch.isfinite(v.sq).all().double().reshape(1),
    ]).tolist()
    if packed[-1] != 1.0:
        p = int((~torch.isfinite(v.sq)).nonzero()[0])
        raise ConfigurationError(
            f"the noise of gradient sample {p} overflows float32 when squared (entries beyond ~1.8e19 in "
            "magnitude); scale the loss down so that its gradients are measurable"
        )
    v.mean_norm2 = packed[0]
    v.block_mean_norm2 = packed[1 : 1 + B]
    at = 1 + B
    v.g_snorm2, v.g_sdot = packed[at : at + G], packed[at + G : at + 2 * G]
    at += 2 * G
    v.g_block_snorm2 = [packed[at + i * B : at + (i + 1) * B] for i in range(G)]


def _cv(M2: torch.Tensor) -> float | None:
    """``std(c)/mean(c)`` over coordinates of per-coordinate variances ``c`` (scale-free, so M2 will do)."""
    m = float(M2.mean())
    return float(M2.std(correction=0)) / m if m > 0 and M2.numel() > 0 else None


def _block_norms2(x: torch.Tensor, blocks: Sequence[Block]) -> list[float]:
    """``‖x_b‖²`` per block, each the dot product a per-block read took, read from the device at once."""
    if not blocks:
        return []
    return _block_dots(x, blocks).tolist()


def _block_cvs(M2: torch.Tensor, blocks: Sequence[Block]) -> list[float | None]:
    """:func:`_cv` of every block's slice of ``M2``: its means and standard deviations computed per block where
    ``M2`` lives and read at once (one wait for the device per call, not two per block)."""
    if not blocks:
        return []
    ms = torch.stack([torch.stack([M2[b.slice].mean(), M2[b.slice].std(correction=0)]) for b in blocks]).tolist()
    return [sd / m if m > 0 and b.stop > b.start else None for b, (m, sd) in zip(blocks, ms)]


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
