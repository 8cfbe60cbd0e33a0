"""The Bekas screen of rmed's reads, kept where it was computed, and everything the reads ask of it.

Private to the metrics. The screen is a mean ``h_hat`` and a standard error ``se`` for every coordinate of the
model: on GPT-2 124M, two 124M-entry arrays. Everything done with it is per coordinate (the upper bound
``s_i (|h_hat_i| + z se_i)``, the candidates of largest bound per block, the pool across blocks, the largest
bound over the unread coordinates of a block), so it is done where the screen lives, block by block, and only
the small results (candidate indices and their bounds, per-block maxima, the screen at the read coordinates)
cross to the host, in one transfer per call. A host (CPU) model takes the same path.

Precision: the screen is kept in float64, as :func:`geomprobe.linalg.diagonal.bekas_diagonal` returns it (it
accumulates in float64), and the bound is formed by the same float64 operations as the host formula
``|h_hat| + z se`` (times ``|s|`` in float64) it replaces, each rounded once, so every bound, candidate and
maximum is the one the host formula gives, bit for bit. The price is 16 bytes per parameter held on the
device while the reads are kept (one probe), where the host copy held the same on the host.

Ties: where equal bounds straddle a block's cut-off (dead coordinates whose screen is exactly 0, repeated
values), the lowest coordinates among the tied ones are taken, whatever the device: candidates are the
``n`` largest bounds, ties to the lower index; the pool across blocks takes the largest bounds, ties to the
earlier block, then the lower index. Known coordinates (masked by ``-inf``) are never candidates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Screen", "ScreenFacts", "screen_candidates", "screen_facts"]


class Screen:
    """The Bekas screen of the whole model, ``mean`` and ``se``, float64 ``(d,)``, worked on where it was
    computed (:attr:`device`).

    Computed on an accelerator, it is kept in host memory between uses and brought back for each one
    (:meth:`resident`): kept there, its 16 bytes per parameter would stay on the accelerator for as long as
    the reads are kept for other metrics (2.0 GB on GPT-2 124M, 16 GB on a 1B model: past the memory plan,
    which counts only the reads' own vectors). One bus crossing each way per use (2 GB: ~0.1-0.2 s) against
    the old host arithmetic's seconds."""

    def __init__(self, mean: torch.Tensor, se: torch.Tensor):
        self.device = mean.device
        if self.device.type != "cpu":
            mean, se = mean.cpu(), se.cpu()
        self._kept = (mean, se)
        self._live: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mean(self) -> torch.Tensor:
        return (self._live or self._kept)[0]

    @property
    def se(self) -> torch.Tensor:
        return (self._live or self._kept)[1]

    @contextmanager
    def resident(self) -> Iterator[Screen]:
        """The screen on :attr:`device` for the duration of the block (nested uses share one copy)."""
        if self._live is not None or self.device.type == "cpu":
            yield self
            return
        self._live = (self._kept[0].to(self.device), self._kept[1].to(self.device))
        try:
            yield self
        finally:
            self._live = None

    def bound(self, start: int, stop: int, z: float, scale: torch.Tensor | None = None, *,
              out: torch.Tensor | None = None, tmp: torch.Tensor | None = None) -> torch.Tensor:
        """``|h_hat_i| + z se_i`` (times ``|s_i|`` for a flat ``scale`` on the screen's device) of coordinates
        ``start:stop``, float64, free to mask in place: written into ``out`` (and ``tmp``, float64 buffers of
        the block's size at least) when given, a fresh tensor otherwise. One pass over the block per factor.

        Each operation is rounded once, as the host formula's (``z se`` and the sum are two roundings: no
        fused multiply-add), so the bound is that formula's bit for bit."""
        n = stop - start
        out = torch.empty(n, dtype=torch.float64, device=self.device) if out is None else out[:n]
        tmp = torch.empty(n, dtype=torch.float64, device=self.device) if tmp is None else tmp[:n]
        torch.mul(self.se[start:stop], z, out=out)
        torch.abs(self.mean[start:stop], out=tmp)
        out += tmp
        if scale is not None:
            tmp.copy_(scale[start:stop])  # to float64 first, exactly: |s| as the host formula took it
            out *= tmp.abs_()
        return out


def _on(device: torch.device, local: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Per-block index arrays of the host as views of one tensor on ``device`` (one host->device copy)."""
    lengths = [len(a) for a in local]
    flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in local]) if local else np.empty(0, np.int64)
    return list(torch.from_numpy(flat).to(device).split(lengths))


def _flat_scale(s: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if s is None else s.detach().reshape(-1).to(device)


class _Work:
    """Float64 buffers of the largest block's size, reused block after block: a fresh block-sized tensor per
    block and factor cost more in allocation (page faults, on a host) than the arithmetic in it."""

    def __init__(self, screen: Screen, blocks: Sequence[Any]):
        self.screen = screen
        size = max((b.size for b in blocks), default=0)
        self.out = torch.empty(size, dtype=torch.float64, device=screen.device)
        self.tmp = torch.empty(size, dtype=torch.float64, device=screen.device)

    def masked(self, b: Any, z: float, scale: torch.Tensor | None,
               known: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The block's bound with the coordinates of ``known`` (block-local device indices) set to ``-inf``: a
        view of the buffer, valid until the next call."""
        ub = self.screen.bound(b.start, b.stop, z, scale, out=self.out, tmp=self.tmp)
        for idx in known:
            if idx is not None and idx.numel():
                ub.index_fill_(0, idx, -np.inf)
        return ub


def _top(ub: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(n, len(ub))`` largest entries of ``ub`` and their indices, ties at the cut-off to the lowest
    indices; values sorted descending. :func:`_top_host` on a host, :func:`_top_device` elsewhere: the same
    result, the one reading the device when it is free to, the other never."""
    return (_top_host if ub.device.type == "cpu" else _top_device)(ub, n)


def _none(device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, dtype=torch.float64, device=device), torch.empty(0, dtype=torch.long, device=device)


def _top_host(ub: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_top` by one top-k pass, and a pass over the entries equal to the k-th only when one of them is
    left out (the (k+1)-th, read with the top k, says so at no cost; elsewhere the tied entries are all in the
    top k and that pass would change nothing)."""
    m = ub.numel()
    k = min(n, m)
    if k <= 0:
        return _none(ub.device)
    v, i = torch.topk(ub, min(k + 1, m))
    if k == m or not bool(v[k - 1] == v[k]):
        return v[:k], i[:k]
    v, i = v[:k], i[:k]
    above = int((v > v[k - 1]).sum())  # entries above the cut-off: all in the top k, first in sorted order
    tied = torch.nonzero(ub == v[k - 1]).reshape(-1)[: k - above]  # ascending: the lowest tied indices
    return v, torch.cat([i[:above], tied])


def _top_device(ub: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_top` with fixed output shapes, so that nothing waits for the device: one top-k pass, then the
    ``k`` lowest indices among the entries equal to the k-th (a second top-k, over their indices)."""
    m = ub.numel()
    k = min(n, m)
    if k <= 0:
        return _none(ub.device)
    v, i = torch.topk(ub, k)
    thr = v[k - 1 :]
    above = (v > thr).sum()  # entries above the cut-off are all in the top k, first in the sorted values
    pos = torch.arange(m, device=ub.device, dtype=torch.int32 if m < 2**31 - 1 else torch.long)
    tied = torch.topk(torch.where(ub == thr, pos, m), k, largest=False).values.long()  # lowest tied indices
    r = torch.arange(k, device=ub.device)
    return v, torch.where(r < above, i, tied[(r - above).clamp_min(0)])


def _fetch(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The small device tensors ``tensors`` on the host as float64, in one device->host copy (indices travel
    as float64, exact below 2**53)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).cpu().numpy()
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()])
        at += t.numel()
    return out


def _ranked(v: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The valid picks of :func:`_top` (bound above ``-inf``: not a known coordinate) in index order."""
    ok = v > -np.inf
    v, i = v[ok], i[ok].astype(np.int64)
    order = np.argsort(i, kind="stable")
    return v[order], i[order]


def screen_candidates(screen: Screen, blocks: Sequence[Any], known: Sequence[np.ndarray],
                      scalings: Sequence[torch.Tensor | None], n_top: int, z: float, *, pool: int = 0,
                      taken: Sequence[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`_candidates` with the screen on its device for the call (:meth:`Screen.resident`)."""
    with screen.resident():
        return _candidates(screen, blocks, known, scalings, n_top, z, pool=pool, taken=taken)


def _candidates(screen: Screen, blocks: Sequence[Any], known: Sequence[np.ndarray],
                scalings: Sequence[torch.Tensor | None], n_top: int, z: float, *, pool: int = 0,
                taken: Sequence[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per block, the union over ``scalings`` of the ``n_top`` coordinates outside ``known`` (block-local) of
    largest upper bound ``|s_i| (|h_hat_i| + z se_i)`` (``None``: no scaling); and ``pool`` more across all the
    ``blocks`` together, outside ``known``, those and ``taken``: the largest bounds over all blocks, an equal
    share ``max(1, pool // len(scalings))`` per scaling, their union trimmed to ``pool`` (the longest lists
    lose their highest indices first).

    Returns per block the sorted local candidates and the sorted local pool picks. Cost: no HVP; per
    scaling one or two top-k passes (two with a pool) over every block, where the screen lives; one
    host->device copy of the known indices and one device->host copy of ``n_top`` (and the pool's share)
    candidates per block. Ties as in the module docstring; otherwise the choice of the host formula."""
    dev = screen.device
    scales = [_flat_scale(s, dev) for s in scalings]
    known_d = _on(dev, known)
    work = _Work(screen, blocks)
    none = _none(dev)
    tops = [[_top(work.masked(b, z, sc, [known_d[j]]), n_top) if n_top > 0 else none for j, b in enumerate(blocks)]
            for sc in scales]
    per = max(1, pool // max(1, len(scalings))) if pool > 0 else 0
    pools: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    if per:
        taken_d = _on(dev, taken) if taken is not None else [None] * len(blocks)
        mask = [[known_d[j], taken_d[j]] + [t[j][1] for t in tops] for j in range(len(blocks))]
        pools = [[_top(work.masked(b, z, sc, mask[j]), per) for j, b in enumerate(blocks)] for sc in scales]
    host = iter(_fetch([x for stage in (tops, pools) for row in stage for pair in row for x in pair]))
    got = [[_ranked(next(host), next(host)) for _ in blocks] for _ in tops]
    cand = [np.unique(np.concatenate([g[j][1] for g in got])) if got else np.empty(0, np.int64)
            for j in range(len(blocks))]
    if not per:
        return cand, [np.empty(0, dtype=np.int64) for _ in blocks]
    chosen: list[set[int]] = [set() for _ in blocks]
    for _ in pools:
        best: list[tuple[float, int, int]] = []
        for j in range(len(blocks)):
            v, i = _ranked(next(host), next(host))
            best.extend((float(u), j, int(c)) for u, c in zip(v, i))
        # a block's own best ``per`` are the only ones that can be among the global best ``per``; the stable
        # sort keeps block order, then index order, among equal bounds
        best.sort(key=lambda t: -t[0])
        for _, j, c in best[:per]:
            chosen[j].add(c)
    extra = [np.array(sorted(c), dtype=np.int64) for c in chosen]
    # the union over scalings may exceed the pool by rounding: trim the largest lists
    while sum(len(c) for c in extra) > pool:
        j = max(range(len(extra)), key=lambda i: len(extra[i]))
        extra[j] = extra[j][:-1]
    return cand, extra


@dataclass(frozen=True)
class ScreenFacts:
    """What one block's statistics need of the screen and a scaling, on the host: ``|s|`` at the sampled
    and candidate coordinates (None without a scaling), the screen's mean and standard error at the read
    coordinates (sample, then candidates; None without a screen or when not packed) and the largest bound
    over the unread coordinates (``-inf`` when every coordinate was read, ``inf`` when unread ones have no
    screen to bound them)."""

    sc_sample: np.ndarray | None
    sc_cand: np.ndarray | None
    mean_at: np.ndarray | None
    se_at: np.ndarray | None
    unread_upper: float


def screen_facts(parts: Sequence[Any], scalings: Sequence[torch.Tensor | None], z: float) -> list[list[ScreenFacts]]:
    """:func:`_facts` with every screen of ``parts`` on its device for the call (:meth:`Screen.resident`)."""
    with ExitStack() as stack:
        for sv in {id(p.screen): p.screen for p in parts if p.screen is not None}.values():
            stack.enter_context(sv.resident())
        return _facts(parts, scalings, z)


def _facts(parts: Sequence[Any], scalings: Sequence[torch.Tensor | None], z: float) -> list[list[ScreenFacts]]:
    """:class:`ScreenFacts` of every part (``BlockDiag``: ``block``, ``exact``, ``sample``, ``cand``, ``screen``,
    ``sample_err``) under each scaling, outer list per scaling.

    Cost: no HVP; per scaling one pass over the screened blocks that have unread coordinates (the bound,
    masked, its max), where the screen lives; one host->device copy of the read indices and one
    device->host copy of everything (a few numbers per block and per read coordinate), whatever the number
    of blocks. Every value is the host formula's bit for bit (maxima and gathers are exact)."""
    screens = [p.screen for p in parts if p.screen is not None and not p.exact]
    dev = screens[0].device if screens else next((s.device for s in scalings if s is not None), torch.device("cpu"))
    reads = [np.concatenate([p.sample, p.cand]).astype(np.int64) for p in parts]
    n = len(parts)
    on = _on(dev, [p.block.start + r for p, r in zip(parts, reads)] + [p.cand for p in parts]
             + [p.sample for p in parts])
    idx_d, loc_d, samp_d = on[:n], on[n : 2 * n], on[2 * n :]
    scales = [_flat_scale(s, dev) for s in scalings]
    send: list[torch.Tensor] = []
    packed = [p.sample_err is not None and p.screen is not None and not p.exact for p in parts]
    for p, pk, ix in zip(parts, packed, idx_d):
        if pk:
            send += [p.screen.mean[ix], p.screen.se[ix]]
    unread = [p.screen is not None and not p.exact and len(np.union1d(p.sample, p.cand)) < p.block.size
              for p in parts]
    distinct = {id(sv): sv for sv in screens}
    work = {k: _Work(sv, [p.block for p in parts if p.screen is sv]) for k, sv in distinct.items()}
    for sc in scales:
        if sc is not None:
            send += [sc[ix].abs().double() for ix in idx_d]
        maxima = [work[id(p.screen)].masked(p.block, z, sc, [samp_d[j], loc_d[j]]).max().reshape(1)
                  for j, p in enumerate(parts) if unread[j]]
        if maxima:
            send.append(torch.cat(maxima))
    host = iter(_fetch(send))
    at = [(next(host), next(host)) if pk else (None, None) for pk in packed]
    out = []
    for sc in scales:
        gathered = [next(host) for _ in parts] if sc is not None else [None] * len(parts)
        mx = iter(next(host) if any(unread) else ())
        row = []
        for p, g, (a, e), u in zip(parts, gathered, at, unread):
            k = len(p.sample)
            if u:
                upper = float(next(mx))
            elif p.screen is None and not p.exact and len(np.union1d(p.sample, p.cand)) < p.block.size:
                upper = float("inf")  # no screen: nothing bounds the unseen entries
            else:
                upper = -np.inf
            row.append(ScreenFacts(None if g is None else g[:k], None if g is None else g[k:], a, e, upper))
        out.append(row)
    return out
