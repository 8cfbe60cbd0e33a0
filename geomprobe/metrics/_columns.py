"""Exact Hessian columns ``H e_j`` read once on a Landscape and used by both ``rmed`` and ``diagshare``
(docs/metrics.md#shared_work).

Private to the metrics. An exact diagonal entry of ``rmed`` is read by an HVP with the unit vector ``e_j``:
its result is the whole column ``H e_j``, which is what ``diagshare`` samples. So one HVP can serve both. A
:class:`ColumnStore` kept on the Landscape (``land.results``, like the products of :mod:`.shared`) records,
per column read and keyed by its global coordinate ``j``, what either metric needs of it:

* ``H_jj`` (``rmed``'s entry; ``diagshare`` takes ``|H_jj|``);
* the L1 norm ``||(H e_j)_b||_1`` of the column over every parameter block ``b`` of the space: one small
  vector per column (a segment sum on the device), from which ``diagshare``'s block mass and total mass over
  any selection of blocks are sums;
* the metric that read it (its HVP is counted there once; the other metric reports it as received).

**One order per block.** Both metrics sample a block's coordinates as a *prefix* of one uniformly random order
of that block's coordinates (:func:`block_order`), a function of the metric's seed and of the block alone
(never of the budget, of the other blocks or of what is stored). ``rmed``'s ``k`` sampled coordinates and
``diagshare``'s ``k_l`` columns of a block are then nested prefixes of the same order: the shorter lies inside
the longer and its columns are read once; the second metric tops up only what its own prefix needs beyond the
stored columns (and may find some of its coordinates among the other's screened candidates).

**Why each estimator is unchanged.** Which coordinates a metric uses is decided by its order alone; the store
only decides whether a used coordinate's column is computed again. A prefix of a uniformly random order is a
uniform sample without replacement of its size, and a column's value does not depend on which metric read it
or why (screened candidates included). So each metric's estimate is exactly the one it makes alone with the
same seed: the same coordinates, the same values up to the rounding of HVPs batched with other vectors
(float64: ~1e-16 relative; a row of a batched product is not bit-identical to the same vector in another
batch), the same randomness for everything else (the screen, the pilot, the bootstrap).

What is not shared: ``rmed``'s packed reads (one HVP carries a signed coordinate of every block: it is no
column) and its Bekas screen; ``diagshare``'s dense path for ``d <= exact_threshold`` records its columns for
``rmed`` but cannot take any (it needs whole columns, not their block norms); ``precond``'s own reads (it
receives ``rmed``'s whole when their options match, :mod:`.shared`). ``rmed``'s pilot draws its packed rows'
coordinates apart from the orders: were they the orders' prefixes, the pilot's decision would depend on the
very entries the exact fallback then reads, and the fallback's sample would no longer be uniform given it.

Cost: none of its own beyond the reads (one HVP per column not stored yet) and, per column, one pass over its
``d`` entries for the block norms (memory speed, a small fraction of an HVP). Drawing a prefix costs
O(length) for large blocks, where a whole permutation of every block (as ``diagshare`` drew before) is 124M
entries on GPT-2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._common import column_batches

__all__ = ["COLUMNS", "ColumnReader", "ColumnStore", "block_order", "columns_key", "draw_order_seed", "top_aligned"]

COLUMNS = "hessian columns"   # what a metric reports as received (``shared``, ``shared_hvps``)
_STORE_KEY = ("hessian columns",)
WHOLE_PERMUTATION = 1 << 16    # blocks up to this size draw a whole permutation; larger ones a stream
_STREAM_CHUNK = 4096

Matvec = Callable[[torch.Tensor], torch.Tensor]


def columns_key(seed: int) -> tuple:
    """The plan's key of the columns drawn with ``seed``: two metrics with the same seed draw the same order
    in every block (:func:`draw_order_seed` is their generator's first draw), so their prefixes nest."""
    return ("columns", seed)


def draw_order_seed(generator: torch.Generator) -> int:
    """The seed of the per-block orders, drawn first from a metric's generator: metrics seeded alike draw the
    same orders. Costs no HVP."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))


def _block_generator(order_seed: int, block: Any) -> torch.Generator:
    # the block's own stream: a function of the order seed and of where the block lies, not of other blocks
    hi, lo = np.random.SeedSequence([int(order_seed), int(block.start), int(block.size)]).generate_state(2)
    return torch.Generator().manual_seed((int(hi) << 31) ^ int(lo))


def block_order(order_seed: int, block: Any, length: int) -> np.ndarray:
    """The first ``min(length, n)`` block-local coordinates of a uniformly random order of the ``n`` coordinates
    of ``block`` (``start``, ``size``), a function of ``order_seed`` and the block alone: a longer prefix extends
    a shorter one, so every prefix is a uniform sample without replacement of its size.

    Blocks of up to 65,536 coordinates draw a whole permutation (O(n)); larger ones take the first occurrences
    in a fixed stream of uniform draws (each new value is uniform over those not seen yet), O(length) expected
    for ``length << n``, instead of a permutation of millions of entries. Costs no HVP."""
    n, length = int(block.size), max(0, min(int(length), int(block.size)))
    g = _block_generator(order_seed, block)
    if n <= WHOLE_PERMUTATION:
        return torch.randperm(n, generator=g)[:length].numpy()
    draws = np.empty(0, dtype=np.int64)
    order = draws
    while len(order) < length:
        draws = np.concatenate([draws, torch.randint(0, n, (_STREAM_CHUNK,), generator=g).numpy()])
        _, first = np.unique(draws, return_index=True)
        order = draws[np.sort(first)]
    return order[:length]


def top_aligned(idx: Sequence[int], batch: int) -> list[list[int]]:
    """``idx`` sorted (block order) and cut where chunks of ``batch`` columns end at its top: the short first
    piece (``len % batch`` columns, none if it divides), then the rest, which ``column_batches`` reads ``batch``
    at a time. Same columns, any order given.

    Why: an HVP of one-hot columns leaves out the gradients of the blocks it does not touch
    (:mod:`geomprobe.engine.pruned_outputs`), so a chunk costs about what its lowest block (furthest from the
    loss, in the usual order of registration) costs. Sorted, a chunk spans a few neighbouring blocks; aligned
    to the top, every full chunk starts as high as it can, and the short chunk takes the dearest place. Costs
    no HVP."""
    order = sorted(int(j) for j in idx)
    cut = len(order) % batch if batch > 0 else 0
    return [piece for piece in (order[:cut], order[cut:]) if piece]


class ColumnStore:
    """The columns read on one Landscape, by global coordinate: ``H_jj``, the L1 norm of ``H e_j`` over each of
    ``blocks`` (none when empty: a store that serves ``rmed`` only) and the metric that read it.

    Entries are added once a column's HVP has returned (a metric failing later leaves them, and they are
    exact), never changed."""

    def __init__(self, blocks: Sequence[Any] = ()):
        self.blocks = tuple(blocks)
        self.index: dict[int, int] = {}
        self.diag: list[float] = []
        self.mass: list[np.ndarray] = []
        self.source: list[str] = []

    def add(self, idx: np.ndarray, diag: np.ndarray, mass: np.ndarray, metric: str) -> None:
        for j, h, m in zip(idx.tolist(), diag.tolist(), mass):
            if j not in self.index:
                self.index[j] = len(self.diag)
                self.diag.append(h)
                self.mass.append(m)
                self.source.append(metric)

    @classmethod
    def of(cls, land: Any) -> ColumnStore | None:
        """The store kept on ``land`` (created on first use, with its space's blocks); None when ``land`` keeps
        no ``results``."""
        results = getattr(land, "results", None)
        if results is None:
            return None
        store = results.get(_STORE_KEY)
        if not isinstance(store, ColumnStore):
            store = results[_STORE_KEY] = cls(land.space.blocks)
        return store


class ColumnReader:
    """One metric call's access to the columns: those not stored yet are read (one HVP each, ``batch`` at a
    time, in the chunks of :func:`top_aligned`) and stored; ``spent`` counts the HVPs this call ran, ``received`` the columns it
    used that another metric had read (by that metric's name, each coordinate once).

    ``store``: a :class:`ColumnStore`, or a function returning one at the first read (the Landscape's store is
    created only then, so a call refused before any HVP leaves no trace); default a private store without
    block norms."""

    def __init__(self, matvec: Matvec, dim: int, *, metric: str,
                 store: ColumnStore | Callable[[], ColumnStore] | None = None, batch: int = 16,
                 dtype: torch.dtype = torch.float64, device: Any = None):
        self.matvec, self.dim, self.metric = matvec, dim, metric
        self._store = store if store is not None else ColumnStore()
        self.batch, self.dtype, self.device = batch, dtype, device
        self.spent = 0
        self.received: dict[str, int] = {}
        self._own: set[int] = set()
        self._counted: set[int] = set()

    @classmethod
    def on(cls, land: Any, metric: str, matvec: Matvec | None = None) -> ColumnReader:
        """A reader of the columns of ``land`` for ``metric``, through ``matvec`` (default ``land.hvp``), on the
        store the Landscape keeps (a private one with the space's blocks when it keeps no ``results``)."""
        def store() -> ColumnStore:
            kept = ColumnStore.of(land)
            return kept if kept is not None else ColumnStore(land.space.blocks)

        return cls(matvec or land.hvp, land.dim, metric=metric, store=store,
                   batch=getattr(land, "chunk_size", 16), dtype=land.dtype, device=land.device)

    @property
    def store(self) -> ColumnStore:
        if not isinstance(self._store, ColumnStore):
            self._store = self._store()
        return self._store

    def read(self, idx: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``H_jj`` (float64) and the per-block L1 norms ``(len(idx), len(store.blocks))`` of the columns ``j`` in
        ``idx`` (global coordinates), reading the ones not stored yet. Cost: one HVP per column not stored."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        store = self.store
        missing = [j for j in dict.fromkeys(idx.tolist()) if j not in store.index]
        for piece in top_aligned(missing, self.batch):
            for part, C in column_batches(self.matvec, self.dim, torch.tensor(piece, dtype=torch.long),
                                          batch=self.batch, dtype=self.dtype, device=self.device):
                self.record(part, C)
        for j in idx.tolist():
            if j not in self._own and j not in self._counted:
                self._counted.add(j)
                src = store.source[store.index[j]]
                self.received[src] = self.received.get(src, 0) + 1
        at = [store.index[j] for j in idx.tolist()]
        mass = np.stack([store.mass[i] for i in at]) if at else np.zeros((0, len(store.blocks)))
        return np.array([store.diag[i] for i in at], dtype=np.float64), mass

    def record(self, part: torch.Tensor, C: torch.Tensor) -> None:
        """Store the columns ``C`` (``(len(part), d)``, ``C[i] = H e_part[i]``) that this call computed with one
        HVP each (counted in ``spent``). ``C`` is overwritten (its absolute values): the caller keeps what else
        it needs first."""
        store = self.store
        part = torch.as_tensor(part, dtype=torch.long).reshape(-1)
        diag = C[torch.arange(len(part)), part.to(C.device)].double().cpu().numpy()
        if store.blocks:
            # in place: a second (chunk, d) block is what runs out first on a large model; one small vector
            # per column leaves the device. Sums accumulate in float32 below float64: a float64 sum of a
            # float32 or bfloat16 slice casts a copy of it first (5 GB for GPT-2's embedding at 16 columns),
            # and float32 tree sums are within ~1e-6 relative, far inside diagshare's intervals.
            C.abs_()
            acc = torch.float64 if C.dtype == torch.float64 else torch.float32
            mass = torch.stack([C[:, b.start : b.stop].sum(1, dtype=acc) for b in store.blocks], 1)
            mass = mass.double().cpu().numpy()
        else:
            mass = np.zeros((len(part), 0))
        store.add(part.numpy(), diag, mass, self.metric)
        self._own.update(part.tolist())
        self.spent += len(part)

    def diagonal(self, idx: np.ndarray | torch.Tensor) -> np.ndarray:
        """``H_jj`` for ``j`` in ``idx`` (float64), reading the columns not stored yet (one HVP each)."""
        return self.read(idx)[0]
