"""The arithmetic of :func:`~geomprobe.stats.gradient_noise.collect_noise`'s passes over gradient rows.

A block of rows is taken a slice of columns at a time (:func:`column_slices`) into reused buffers
(:class:`Scratch`) in the rows' own precision, float32 at least (:func:`compute_dtype`), and every sum is a
reduction in that precision added into float64 totals: :class:`FirstPass` (the mean, or Chan's mean and
``M2``; the tail sample; projections; held rows; each row's sum for the finiteness check) and
:func:`piece_sums` (a view's centered squares per row, whole and per block, and the group's sums in
:class:`GroupSums`). Nothing here waits for the device; the precision statement is in
:mod:`geomprobe.stats.gradient_noise`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigurationError, NonFiniteLossError

__all__ = [
    "FirstPass",
    "GroupSums",
    "Overlaps",
    "Scratch",
    "SlicePlan",
    "SlicePlans",
    "column_slices",
    "compute_dtype",
    "piece_sums",
    "regroup",
    "stream_pieces",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the statistics take a slice of rows in: the rows' own, float32 at least."""
    return torch.promote_types(dtype, torch.float32)


class Scratch:
    """Reused buffers for a slice of rows, one per name and dtype, on one device. Fresh temporaries cost more
    than the arithmetic on the CPU, where torch's allocator gives large blocks back to the system and each new
    one pays its page faults (a float32 subtraction of 8 x 4M entries: 108 ms into a fresh tensor, 4 ms into a
    reused one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, r: int, w: int) -> torch.Tensor:
        buf = self.flat.get((name, dtype))
        if buf is None or buf.numel() < r * w:
            buf = self.flat[(name, dtype)] = torch.empty(r * w, dtype=dtype, device=self.device)
        return buf[: r * w].view(r, w)

    def add_into(self, total: torch.Tensor, x: torch.Tensor) -> None:
        """``total += x`` for a float64 ``total`` and a narrower ``x``: on the CPU through a reused float64 copy
        (torch's mixed-precision add makes a fresh one: 9.8 ms against 3.8 at 3.7M entries); elsewhere one
        kernel, which converts as it reads."""
        if total.device.type == "cpu" and x.dtype != total.dtype:
            x = self.get("wide", total.dtype, 1, x.numel())[0].copy_(x.reshape(-1)).view(x.shape)
        total += x


class FirstPass:
    """Pass 1 over the rows: ``Σ g_p`` in float64 (rows of at most float32 precision add up exactly; float64
    rows are summed less the first row, so that equal rows give their own value as the mean and exactly zero
    noise), or Chan's running mean and ``M2`` with the variance; the
    tail sample, projections, the rows themselves when held, and each row's sum, whose finiteness is read once
    at the end (a finite sum proves a finite row; a non-finite one means a NaN or an infinity, or entries past
    ``1e31`` that float32 squares would overflow anyway)."""

    def __init__(self, P: int, d: int, coords: torch.Tensor, dev: torch.device, *, variance: bool, held: bool,
                 dirs: torch.Tensor | None, scales: dict[str, torch.Tensor | None], max_elements: int,
                 scratch: Scratch, slices: Callable[[int, int, int], Iterable[slice]] | None = None):
        f64 = {"dtype": torch.float64, "device": dev}
        self.P, self.d, self.dev, self.coords = P, d, dev, coords
        self.total = torch.zeros(d, **f64)  # Σ (g_p − shift); the running mean when M2 is kept
        self.shift: torch.Tensor | None = None
        self.M2 = torch.zeros(d, **f64) if variance else None
        self.row_sums = torch.zeros(P, **f64)
        self.held = torch.empty(P, d, **f64) if held else None
        self.sub = torch.empty(P, coords.numel(), **f64)
        self.dirs, self.scales = dirs, scales
        self.proj = {k: (None if dirs is None else torch.zeros(P, dirs.shape[0], **f64)) for k in scales}
        self.max_elements, self.scratch = max_elements, scratch
        self.slices = slices or column_slices
        self.n = 0
        self.dtype: torch.dtype | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(device=self.dev)
        n, r = self.n, rows.shape[0]
        if n + r > self.P:
            raise ConfigurationError(f"the gradient source gave more than its stated {self.P} samples")
        if r == 0:
            return
        self.dtype = self.dtype or rows.dtype
        cdt = compute_dtype(rows.dtype)
        if self.M2 is None and self.shift is None and cdt == torch.float64:
            self.shift = rows[0].to(cdt, copy=True)
        for cs in self.slices(self.d, r, self.max_elements):
            x = rows[:, cs]
            if x.dtype != cdt:
                x = self.scratch.get("y", cdt, r, cs.stop - cs.start).copy_(x)
            self.row_sums[n : n + r] += x.sum(1)
            if self.M2 is None:
                if self.shift is not None:
                    y = torch.sub(x, self.shift[cs], out=self.scratch.get("y2", cdt, r, x.shape[1]))
                    self.total[cs] += y.sum(0)
                else:
                    for i in range(r):  # row by row into float64: exact, where a float32 sum over rows rounds
                        self.scratch.add_into(self.total[cs], x[i])
            else:
                self._chan(x, cs)
            if self.held is not None:
                self.held[n : n + r, cs] = x
            if self.dirs is not None:
                xd = x.double()
                for k, s in self.scales.items():
                    self.proj[k][n : n + r] += xd @ (self.dirs[:, cs] if s is None else self.dirs[:, cs] * s[cs]).T
        self.sub[n : n + r] = rows[:, self.coords]
        self.n += r

    def _chan(self, x: torch.Tensor, cs: slice) -> None:
        """Chan et al.'s parallel update of the mean and ``M2`` by a block of ``r`` rows (float64 totals)."""
        n, (r, w) = self.n, x.shape
        mean, M2 = self.total[cs], self.M2[cs]  # type: ignore[index]
        mc = x[0] if r == 1 else x.mean(0)
        if r > 1:
            y = torch.sub(x, mc, out=self.scratch.get("y2", x.dtype, r, w))
            M2 += y.mul_(y).sum(0)
        delta = torch.sub(mc, mean, out=self.scratch.get("delta", torch.float64, 1, w)[0])
        mean.add_(delta, alpha=r / (n + r))
        M2.addcmul_(delta, delta, value=n * r / (n + r))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ḡ, M2 or None)``, after checking the count and (one read) the finiteness of every row."""
        if self.n != self.P:
            raise ConfigurationError(f"the gradient source gave {self.n} samples, expected {self.P}")
        bad = ~torch.isfinite(self.row_sums)
        if bool(bad.any()):
            p = int(bad.nonzero()[0])
            raise NonFiniteLossError(
                f"gradient sample {p} has non-finite entries at the current parameters; the noise is undefined here"
            )
        if self.M2 is not None:
            return self.total, self.M2
        mean = self.total.div_(self.P)
        if self.shift is not None:
            mean += self.shift
        self.shift = None
        return mean, None


def regroup(chunks: Iterable[torch.Tensor], sizes: Sequence[int], device: torch.device) -> Iterator[torch.Tensor]:
    """Re-cut a stream of row blocks into blocks of exactly ``sizes`` rows (on ``device``, in their own dtype)."""
    buf: list[torch.Tensor] = []
    have = 0
    it = iter(sizes)
    want = next(it, None)
    for c in chunks:
        c = c.detach().to(device=device)
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


def stream_pieces(chunks: Iterable[torch.Tensor], groups: Sequence[slice],
                   device: torch.device) -> Iterator[tuple[int, int, torch.Tensor, bool]]:
    """The blocks of rows as the source yields them, cut at the groups' edges: ``(group, first sample, rows,
    whether the group ends here)``; nothing is held."""
    gi, n = 0, 0
    for c in chunks:
        c = c.detach().to(device=device)
        while c.shape[0] > 0 and gi < len(groups):
            take = min(groups[gi].stop - n, c.shape[0])
            yield gi, n, c[:take], n + take == groups[gi].stop
            n += take
            c = c[take:]
            if n == groups[gi].stop:
                gi += 1
    if gi < len(groups):
        raise ConfigurationError("the gradient source gave fewer samples on a second pass than on the first")


def column_slices(d: int, rows: int, max_elements: int) -> Iterator[slice]:
    """Slices of columns holding about ``max_elements / 4`` entries of ``rows`` rows each (a slice and its
    temporaries stay within ``max_elements`` float64 values)."""
    step = max(1, max_elements // (4 * max(rows, 1)))
    for a in range(0, d, step):
        yield slice(a, min(a + step, d))


class Overlaps:
    """Which blocks overlap a slice of columns. For blocks in order without overlap (a parameter space's) only
    those, found by bisection, so a pass over column slices takes slices + blocks steps, not slices x blocks
    (35,000 a group on GPT-2); every block otherwise."""

    def __init__(self, blocks: Sequence[Any]):
        self.starts = [b.start for b in blocks]
        self.stops = [b.stop for b in blocks]
        self.ordered = all(self.stops[i] <= self.starts[i + 1] for i in range(len(blocks) - 1))

    def __call__(self, cs: slice) -> range:
        if not self.ordered:
            return range(len(self.starts))
        return range(bisect.bisect_right(self.stops, cs.start), bisect.bisect_left(self.starts, cs.stop))


@dataclass
class SlicePlan:
    """A block of ``r`` rows' column slices and, per slice, the pieces of blocks it holds ``(j, lo, hi)``
    (offsets in the slice); ``assign`` (pieces x blocks, 0/1, float64) adds each block's pieces up in one
    product, the same order on every run (an atomic ``index_add_`` would not be)."""

    slices: list[slice]
    pieces: list[list[tuple[int, int, int]]]
    assign: torch.Tensor


class SlicePlans:
    """:class:`SlicePlan` per number of rows, made once (the slices and overlaps are host work)."""

    def __init__(self, blocks: Sequence[Any], d: int, max_elements: int, device: torch.device,
                 slices: Callable[[int, int, int], Iterable[slice]] | None = None):
        self.blocks, self.d, self.max_elements, self.device = list(blocks), d, max_elements, device
        self.slices = slices or column_slices
        self.overlaps = Overlaps(blocks)
        self.plans: dict[int, SlicePlan] = {}

    def get(self, r: int) -> SlicePlan:
        if r not in self.plans:
            slices = list(self.slices(self.d, r, self.max_elements))
            pieces, owner = [], []
            for cs in slices:
                here = []
                for j in self.overlaps(cs):
                    b = self.blocks[j]
                    lo, hi = max(b.start, cs.start), min(b.stop, cs.stop)
                    if lo < hi:
                        here.append((j, lo - cs.start, hi - cs.start))
                        owner.append(j)
                pieces.append(here)
            assign = torch.zeros(len(owner), len(self.blocks), dtype=torch.float64)
            assign[torch.arange(len(owner)), torch.tensor(owner, dtype=torch.long)] = 1.0
            self.plans[r] = SlicePlan(slices, pieces, assign.to(self.device))
        return self.plans[r]


class GroupSums:
    """One group's running sums for a view: ``Σ_p s⊙ξ_p`` (float64, d), with ``coordinate_variance`` its
    squares' ``Σ_p (s⊙ξ_p)²``, and the group's Gram matrix when its rows arrive together."""

    def __init__(self, d: int, device: torch.device, *, with_squares: bool):
        self.sg = torch.zeros(d, dtype=torch.float64, device=device)
        self.y2 = torch.zeros(d, dtype=torch.float64, device=device) if with_squares else None
        self.gram: torch.Tensor | None = None

    def reset(self) -> None:
        self.sg.zero_()
        if self.y2 is not None:
            self.y2.zero_()
        self.gram = None


def piece_sums(sq: torch.Tensor, block_sq: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor,
               s: torch.Tensor | None, acc: GroupSums, plan: SlicePlan, scratch: Scratch) -> None:
    """Add a block of ``r`` rows to a view: ``y = (rows − ḡ) ⊙ s`` a slice of columns at a time in the compute
    precision (``mean`` and ``s`` already in it) into reused buffers; the rows' sums of ``y²``, whole (into
    ``sq``, ``(r,)``) and per block (``block_sq``, ``(r, B)``), and the group's sums into ``acc``, each a float32
    reduction added into float64. Cost: a few reads of the rows' slice; no host synchronization."""
    r = rows.shape[0]
    parts, block_parts = [], []
    for cs, here in zip(plan.slices, plan.pieces):
        w = cs.stop - cs.start
        y = scratch.get("y", mean.dtype, r, w)
        torch.sub(rows[:, cs], mean[cs], out=y)
        if s is not None:
            y.mul_(s[cs])
        y2 = torch.mul(y, y, out=scratch.get("y2", mean.dtype, r, w))
        parts.append(y2.sum(1))
        block_parts.extend(y2[:, lo:hi].sum(1) for _, lo, hi in here)
        scratch.add_into(acc.sg[cs], y[0] if r == 1 else y.sum(0))
        if acc.y2 is not None:
            scratch.add_into(acc.y2[cs], y2[0] if r == 1 else y2.sum(0))
        if acc.gram is not None:
            yd = y.double()
            acc.gram.addmm_(yd, yd.T)
    sq += torch.stack(parts, 1).double().sum(1)
    if block_parts:
        block_sq += torch.stack(block_parts, 1).double() @ plan.assign
