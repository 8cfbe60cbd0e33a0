"""How ``rmed`` reads a Hessian diagonal: exact entries, or packed reads of one coordinate of every block.

Private to the metrics. Each function spends HVPs and returns per-block knowledge (:class:`BlockDiag`): the
entries read, their errors (none for exact entries) and the Bekas screen. :func:`read_scaled_candidates` adds,
to reads made for the raw diagonal, the candidates a scaled diagonal ``s_i h_i`` needs for its max (``precond``
reuses ``rmed``'s reads this way). The Bekas screen stays on the device it was computed on
(:class:`~geomprobe.metrics._screen.Screen`, shared by every block of a pass), and the candidates are chosen
there (:func:`~geomprobe.metrics._screen.screen_candidates`): only their indices come to the host. Exact
entries are read as Hessian columns through a :class:`~geomprobe.metrics._columns.ColumnReader`, so those
``diagshare`` read are not read again. The statistics built on it (median, q99, max and their intervals) live
in :mod:`geomprobe.metrics.rmed`; the plan that chooses between the two reads in :mod:`geomprobe.metrics._budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from ..linalg.diagonal import bekas_diagonal, packed_diagonal
from ..linalg.vectors import Matvec
from ..stats.sampling import random_prefix
from ._budget import RmedPlan
from ._columns import ColumnReader, block_order, top_aligned
from ._common import exact_diagonal_chunked
from ._screen import Screen, screen_candidates

__all__ = ["BlockDiag", "DiagonalReads", "PackedPilot", "read_exact", "read_packed", "read_pilot",
           "read_scaled_candidates"]


@dataclass
class BlockDiag:
    """What is known about one block's diagonal (raw, unscaled): entries read, their errors, the screen."""

    block: Any
    exact: bool
    sample: np.ndarray        # local indices computed exactly as a uniform sample (all, if exact)
    sample_h: np.ndarray      # their h_i
    cand: np.ndarray          # local indices recomputed after screening
    cand_h: np.ndarray
    screen: Screen | None = None          # the whole model's Bekas screen, on its device (None: not screened)
    sample_err: np.ndarray | None = None  # packed reads: standard error of each h_i (None: exact entries)
    cand_err: np.ndarray | None = None


@dataclass(frozen=True)
class DiagonalReads:
    """One complete pass of reads: per-block knowledge, the plan it followed, the HVPs it spent and the state
    of the generator right after it (the statistics and any later reads continue from there, so a pass kept
    for another metric gives that metric exactly what reading again would). Never changed once made."""

    parts: tuple[BlockDiag, ...]
    plan: RmedPlan            # the plan the parts followed (a pilot's fallback, when it switched)
    hvps: int                 # everything spent, the pilot's reads included
    state: torch.Tensor
    pilot: dict | None = None  # the pilot's record (:func:`geomprobe.metrics._pilot.judge_pilot`), if one ran


def read_exact(matvec: Matvec, dim: int, blocks: Sequence[Any], scalings: Sequence[torch.Tensor | None], *,
               exact_threshold: int, k: int, top: int, screen_samples: int, z: float,
               generator: torch.Generator, dtype: torch.dtype, device: Any, batch: int,
               pool: int = 0, order_seed: int = 0, columns: ColumnReader | None = None) -> tuple[list[BlockDiag], int]:
    """Exact entries: whole small blocks, ``k`` sampled + ``top`` screened per larger block (one HVP each),
    ``screen_samples`` Bekas probes if a block is large (none when 0), and ``pool`` more candidates chosen
    across the larger blocks by their screened upper bound. Returns the per-block knowledge and HVPs spent
    (at most ``sum_small n + n_large (k + top) + screen_samples + pool``; columns ``columns`` already holds cost
    none).

    A larger block's ``k`` coordinates are the first ``k`` of its order drawn from ``order_seed``
    (:func:`geomprobe.metrics._columns.block_order`): a uniform sample without replacement, and the prefix
    ``diagshare`` takes its columns from, so the entries are read through ``columns`` (the Landscape's store:
    a column either metric read serves both)."""
    columns = columns or ColumnReader(matvec, dim, metric="rmed", batch=batch, dtype=dtype, device=device)
    before = columns.spent
    parts: list[BlockDiag] = []
    for b in blocks:
        if b.size <= max(exact_threshold, k + top):
            parts.append(BlockDiag(b, True, np.arange(b.size), np.empty(0), np.empty(0, int), np.empty(0)))
        else:
            local = np.sort(block_order(order_seed, b, k))
            parts.append(BlockDiag(b, False, local, np.empty(0), np.empty(0, int), np.empty(0)))
    idx = np.concatenate([p.block.start + p.sample for p in parts])
    h = columns.diagonal(idx)
    hvps = columns.spent - before
    at = 0
    for p in parts:
        p.sample_h = h[at : at + len(p.sample)]
        at += len(p.sample)
    large = [p for p in parts if not p.exact]
    if not large or screen_samples == 0:
        return parts, hvps
    screen = Screen(*bekas_diagonal(matvec, dim, samples=screen_samples, batch=batch, generator=generator,
                                    dtype=dtype, device=device))
    hvps += screen_samples
    # candidates and pool chosen where the screen lives: only their indices come to the host
    cand, extra = screen_candidates(screen, [p.block for p in large], [p.sample for p in large], scalings, top, z,
                                    pool=pool)
    for p, c, more in zip(large, cand, extra):
        p.screen = screen
        p.cand = np.union1d(c, more).astype(int)
    cidx = np.concatenate([p.block.start + p.cand for p in large])
    before = columns.spent
    hc = columns.diagonal(cidx)
    hvps += columns.spent - before
    at = 0
    for p in large:
        p.cand_h = hc[at : at + len(p.cand)]
        at += len(p.cand)
    return parts, hvps


def _rows(blocks: Sequence[Any], local: Sequence[np.ndarray], n_rows: int) -> torch.Tensor:
    """An ``(n_rows, n_blocks)`` matrix of global coordinates, column ``l`` = block l's list, -1 padded."""
    R = np.full((n_rows, len(blocks)), -1, dtype=np.int64)
    for j, (b, loc) in enumerate(zip(blocks, local)):
        R[: len(loc), j] = b.start + loc
    return torch.from_numpy(R)


@dataclass(frozen=True)
class PackedPilot:
    """The sampled coordinates of a packed plan and the reads of its first ``rows`` rows (the pilot)."""

    local: tuple[np.ndarray, ...]    # per block: the sampled local indices
    columns: tuple[np.ndarray, ...]  # per block: the index read in each sampled row (repeats for small blocks)
    est: np.ndarray                  # (rows, blocks) pilot reads
    err: np.ndarray                  # their standard errors
    hvps: int

    @property
    def rows(self) -> int:
        return int(self.est.shape[0])


def read_pilot(matvec: Matvec, dim: int, blocks: Sequence[Any], plan: RmedPlan, *, generator: torch.Generator,
               dtype: torch.dtype, device: Any, batch: int) -> PackedPilot:
    """Draw the packed plan's sampled coordinates and read its first ``plan.pilot`` rows (``plan.signs *
    plan.pilot`` HVPs): what :mod:`._pilot` judges, and the first rows of :func:`read_packed` if it continues."""
    local, columns = [], []
    for b in blocks:
        loc = random_prefix(b.size, min(b.size, plan.rows_sample), generator).sort().values.numpy()
        local.append(loc)
        # A block smaller than the rows fills its free slots with repeat reads (fresh signs and companions):
        # its few entries get many reads, and their errors many degrees of freedom.
        columns.append(np.resize(loc, plan.rows_sample))
    est, err = _read_rows(matvec, dim, blocks, [c[: plan.pilot] for c in columns], plan.pilot, plan.signs,
                          generator=generator, dtype=dtype, device=device, batch=batch)
    return PackedPilot(tuple(local), tuple(columns), est, err, plan.signs * plan.pilot)


def _read_rows(matvec: Matvec, dim: int, blocks: Sequence[Any], columns: Sequence[np.ndarray], n_rows: int,
               signs: int, *, generator: torch.Generator, dtype: torch.dtype, device: Any,
               batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed reads of ``n_rows`` rows (``signs * n_rows`` HVPs); none read when ``n_rows`` is 0."""
    if n_rows == 0:
        return np.zeros((0, len(blocks))), np.zeros((0, len(blocks)))
    est, err = packed_diagonal(matvec, dim, _rows(blocks, columns, n_rows), signs=signs, batch=batch,
                               generator=generator, dtype=dtype, device=device)
    return est.numpy(), err.numpy()


def read_packed(matvec: Matvec, dim: int, blocks: Sequence[Any], scalings: Sequence[torch.Tensor | None],
                plan: RmedPlan, *, z: float, generator: torch.Generator, dtype: torch.dtype, device: Any,
                batch: int, pilot: PackedPilot | None = None) -> tuple[list[BlockDiag], int]:
    """Packed reads (one coordinate of every block per row, ``plan.signs`` sign patterns): samples, then a
    Bekas screen and its candidates. Every entry comes with the standard error of its contamination.

    The sampled rows continue from ``pilot`` (its rows are the first, not read again; without one it is read
    here). Returns the per-block knowledge and the HVPs spent by this call, the pilot's counted only when read
    here: ``plan.packed_hvps`` in all."""
    hvps = 0
    if pilot is None:
        pilot = read_pilot(matvec, dim, blocks, plan, generator=generator, dtype=dtype, device=device, batch=batch)
        hvps += pilot.hvps
    rest = [c[pilot.rows :] for c in pilot.columns]
    n_rest = plan.rows_sample - pilot.rows
    est, err = _read_rows(matvec, dim, blocks, rest, n_rest, plan.signs, generator=generator, dtype=dtype,
                          device=device, batch=batch)
    hvps += plan.signs * n_rest
    est, err = np.concatenate([pilot.est, est]), np.concatenate([pilot.err, err])
    parts = []
    for j, b in enumerate(blocks):
        p = BlockDiag(b, False, pilot.local[j], np.empty(0), np.empty(0, int), np.empty(0))
        p.sample_h, p.sample_err = _merge_repeats(est[:, j], err[:, j], len(p.sample))
        p.cand_err = np.empty(0)
        parts.append(p)
    if plan.rows_cand == 0 or plan.screen == 0:
        return parts, hvps
    screen = Screen(*bekas_diagonal(matvec, dim, samples=plan.screen, batch=batch, generator=generator,
                                    dtype=dtype, device=device))
    hvps += plan.screen
    per_scaling = max(1, plan.rows_cand // len(scalings))  # their union then fits the candidate rows
    cand, _ = screen_candidates(screen, blocks, [p.sample for p in parts], scalings, per_scaling, z)
    for p, c in zip(parts, cand):
        p.screen = screen
        p.cand = c.astype(int)[: plan.rows_cand]
    est, err = packed_diagonal(matvec, dim, _rows(blocks, [p.cand for p in parts], plan.rows_cand),
                               signs=plan.signs, batch=batch, generator=generator, dtype=dtype, device=device)
    hvps += plan.signs * plan.rows_cand
    for j, p in enumerate(parts):
        p.cand_h, p.cand_err = est[: len(p.cand), j].numpy(), err[: len(p.cand), j].numpy()
    return parts, hvps


def _merge_repeats(est: np.ndarray, err: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry mean and standard error when row ``r`` read entry ``r mod n`` (``n`` entries, cycled).

    An entry read in several rows takes the spread of its row means (companions and signs both vary);
    one read once keeps its sign-pattern error."""
    reads = np.arange(len(est)) % n
    count = np.bincount(reads, minlength=n)
    mean = np.bincount(reads, weights=est, minlength=n) / count
    sq = np.bincount(reads, weights=(est - mean[reads]) ** 2, minlength=n)
    many = count >= 2
    se = np.empty(n)
    se[many] = np.sqrt(sq[many] / (count[many] - 1) / count[many])
    once = ~many
    se[once] = err[: n][once]
    return mean, se


def read_scaled_candidates(matvec: Matvec, dim: int, reads: DiagonalReads, scaling: torch.Tensor, *, z: float,
                           generator: torch.Generator, dtype: torch.dtype, device: Any,
                           batch: int) -> tuple[list[BlockDiag], int]:
    """``reads`` completed for the max of the scaled diagonal ``|s_i h_i|``: per screened block the ``n`` unsampled
    coordinates of largest scaled upper bound ``s_i (|h_hat_i| + z se_i)`` are read too, those not read yet
    (``n = plan.top`` exact entries, or ``plan.rows_cand`` packed rows under ``plan.signs`` sign patterns).

    The raw reads ranked the candidates by the unscaled bound; a strong scaling moves the max elsewhere, and
    only reading the coordinates that could hold it lets the screen certify it. Returns new per-block
    knowledge (the raw candidates plus the new ones; ``reads`` is left as it was) and the HVPs spent: at most
    ``plan.top`` per screened block plus ``plan.pool`` (exact) or ``plan.signs * plan.rows_cand`` (packed); none
    without a screen.
    """
    plan = reads.plan
    packed = plan.mode == "packed"
    n_top = plan.rows_cand if packed else plan.top
    new: list[np.ndarray] = [np.empty(0, dtype=int) for _ in reads.parts]
    screened = [j for j, p in enumerate(reads.parts) if p.screen is not None and not p.exact]
    pool = 0 if packed else plan.pool
    if screened and (n_top > 0 or pool > 0):
        parts = [reads.parts[j] for j in screened]
        # ranked where the screen lives (one screen for all the parts: it is read once per pass); the pool,
        # as rmed's reads chose it, but ranked by the scaled bound, outside the candidates old and new
        chosen, more = screen_candidates(parts[0].screen, [p.block for p in parts], [p.sample for p in parts],
                                         [scaling], n_top, z, pool=pool, taken=[p.cand for p in parts])
        for j, p, c, m in zip(screened, parts, chosen, more):
            new[j] = np.union1d(np.setdiff1d(c, p.cand), m).astype(int)
    n_rows = max((len(c) for c in new), default=0)
    if n_rows == 0:
        return list(reads.parts), 0
    if packed:
        blocks = [p.block for p in reads.parts]
        est, err = packed_diagonal(matvec, dim, _rows(blocks, new, n_rows), signs=plan.signs, batch=batch,
                                   generator=generator, dtype=dtype, device=device)
        hvps = plan.signs * n_rows
        got = [(est[: len(c), j].numpy(), err[: len(c), j].numpy()) for j, c in enumerate(new)]
    else:
        idx = np.concatenate([p.block.start + c for p, c in zip(reads.parts, new)])
        # chunks aligned to the top as the column reads are (_columns.top_aligned): the same entries, cheaper
        # products; they come back sorted, and go back to idx's order
        h = np.empty(len(idx))
        h[np.argsort(idx, kind="stable")] = np.concatenate([
            exact_diagonal_chunked(matvec, dim, torch.tensor(piece), batch=batch, dtype=dtype, device=device).numpy()
            for piece in top_aligned(idx, batch)])
        hvps = len(idx)
        got, at = [], 0
        for c in new:
            got.append((h[at : at + len(c)], None))
            at += len(c)
    out = []
    for p, c, (h, e) in zip(reads.parts, new, got):
        if len(c) == 0:
            out.append(p)
            continue
        cand_err = None if e is None else np.concatenate([p.cand_err, e])
        out.append(replace(p, cand=np.concatenate([p.cand, c]), cand_h=np.concatenate([p.cand_h, h]),
                           cand_err=cand_err))
    return out, hvps

