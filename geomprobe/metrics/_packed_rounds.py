"""rmed's packed plan read in rounds, so that it can stop once its interval is tight (``rel_tol > 0``).

Private to the metrics. The same reads as :func:`geomprobe.metrics._reads.read_packed` (one coordinate of every
block per row, ``signs`` sign patterns, a Bekas screen and its candidates), in an order that makes every prefix
a valid plan of its own:

* each block's sampled coordinates are the prefix of one fixed random permutation (row ``t`` reads coordinate
  ``perm[t mod n]``: a uniform sample without replacement until the block is exhausted, repeat reads after), so
  the sample after ``t`` rows is the sample of a budget of ``t`` rows;
* the screen comes first (``read_packed`` spends it after the sample), so that the max is bounded from the
  first look on;
* candidates are the unread coordinates with the largest screened upper bound, taken in that order, a few per
  round: the coordinates that could be the max are read first.

:func:`geomprobe.metrics._budget.packed_looks` says how many rows of each kind every look holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..linalg.diagonal import bekas_diagonal, packed_diagonal
from ..linalg.vectors import Matvec
from ._budget import RmedPlan
from ._reads import BlockDiag, _merge_repeats, _rows

__all__ = ["PackedRounds"]


class PackedRounds:
    """The knowledge of a packed plan read so far (``parts``, one :class:`BlockDiag` per block) and its HVPs.

    Construction draws the permutations and spends the screen (``plan.screen`` HVPs, if the plan has
    candidate rows); :meth:`read_to` extends the reads to a look's cumulative row counts."""

    def __init__(self, matvec: Matvec, dim: int, blocks: Sequence[Any], scalings: Sequence[torch.Tensor | None],
                 plan: RmedPlan, *, z: float, generator: torch.Generator, dtype: torch.dtype, device: Any,
                 batch: int) -> None:
        self.mv, self.dim, self.blocks, self.plan = matvec, dim, list(blocks), plan
        self.gen, self.dtype, self.device, self.batch = generator, dtype, device, batch
        self.perms = [torch.randperm(b.size, generator=generator).numpy() for b in self.blocks]
        self.parts = [BlockDiag(b, False, np.empty(0, int), np.empty(0), np.empty(0, int), np.empty(0),
                                sample_err=np.empty(0), cand_err=np.empty(0)) for b in self.blocks]
        self.hvps = 0
        self.sample_rows = self.cand_rows = 0
        self._est = [np.empty(0) for _ in self.blocks]   # every sample read so far, row order
        self._err = [np.empty(0) for _ in self.blocks]
        self._read: list[set[int]] = [set() for _ in self.blocks]
        # per block and scaling: unread-candidate order (local indices, upper bound descending) and its bounds
        self._ranked: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self._next: list[list[int]] = []
        if plan.rows_cand == 0 or plan.screen == 0:
            return
        mean, se = bekas_diagonal(matvec, dim, samples=plan.screen, batch=batch, generator=generator, dtype=dtype,
                                  device=device)
        mean, se = mean.double().cpu().numpy(), se.double().cpu().numpy()
        self.hvps += plan.screen
        # No look reads more than rows_sample + rows_cand coordinates of a block, so one more than that, ranked
        # once, holds every candidate the rounds will take and the largest bound of the unread rest.
        depth = plan.rows_sample + plan.rows_cand + 1
        for p in self.parts:
            b = p.block
            p.screen, p.screen_se = mean[b.start : b.stop], se[b.start : b.stop]
            ranked = []
            for s in scalings:
                sc = np.ones(b.size) if s is None else s[b.start : b.stop].abs().double().cpu().numpy()
                upper = sc * (np.abs(p.screen) + z * p.screen_se)
                n = min(depth, b.size)
                top = np.argpartition(-upper, n - 1)[:n] if n < b.size else np.arange(b.size)
                top = top[np.argsort(-upper[top], kind="stable")]
                ranked.append((top, upper[top]))
            self._ranked.append(ranked)
            self._next.append([0] * len(scalings))

    def _candidates(self, j: int, count: int) -> np.ndarray:
        """The next ``count`` unread coordinates of block ``j`` by screened upper bound, scalings in turn."""
        got: list[int] = []
        ranked, nxt, read = self._ranked[j], self._next[j], self._read[j]
        while len(got) < count:
            moved = False
            for i, (order, _) in enumerate(ranked):
                while nxt[i] < len(order) and int(order[nxt[i]]) in read:
                    nxt[i] += 1
                if nxt[i] < len(order) and len(got) < count:
                    c = int(order[nxt[i]])
                    got.append(c)
                    read.add(c)
                    nxt[i] += 1
                    moved = True
            if not moved:
                break
        return np.array(got, dtype=int)

    def read_to(self, sample_rows: int, cand_rows: int) -> None:
        """Read rows until ``sample_rows`` sample rows and ``cand_rows`` candidate rows are read, in one batched
        pass (``signs`` HVPs per new row)."""
        new_s, new_c = sample_rows - self.sample_rows, cand_rows - self.cand_rows
        if new_s < 0 or new_c < 0:
            raise ValueError("read_to only extends the reads")
        if new_s + new_c == 0:
            return
        t = np.arange(self.sample_rows, sample_rows)
        local = [perm[t % len(perm)] for perm in self.perms]
        for j, loc in enumerate(local):
            self._read[j].update(loc.tolist())
        # candidates after this round's samples: a coordinate the sample now holds is not read twice
        cands = [self._candidates(j, new_c) for j in range(len(self.blocks))] if new_c else []
        est, err = packed_diagonal(self.mv, self.dim, _pad_rows(self.blocks, local, cands, new_s, new_c),
                                   signs=self.plan.signs, batch=self.batch, generator=self.gen, dtype=self.dtype,
                                   device=self.device)
        self.hvps += self.plan.signs * (new_s + new_c)
        for j, p in enumerate(self.parts):
            self._est[j] = np.concatenate([self._est[j], est[:new_s, j].numpy()])
            self._err[j] = np.concatenate([self._err[j], err[:new_s, j].numpy()])
            n = min(sample_rows, p.block.size)
            p.sample = self.perms[j][:n]
            p.sample_h, p.sample_err = _merge_repeats(self._est[j], self._err[j], n)
            if new_c:
                c = cands[j]
                p.cand = np.concatenate([p.cand, c])
                p.cand_h = np.concatenate([p.cand_h, est[new_s : new_s + len(c), j].numpy()])
                p.cand_err = np.concatenate([p.cand_err, err[new_s : new_s + len(c), j].numpy()])
        self.sample_rows, self.cand_rows = sample_rows, cand_rows

    def unread_upper(self, j: int, scaling: int) -> float | None:
        """The screen's upper bound on block ``j``'s unread entries under scaling ``scaling`` (-inf when every
        entry is read; None without a screen: the caller then bounds nothing)."""
        if not self._ranked:
            return None
        order, upper = self._ranked[j][scaling]
        read = self._read[j]
        for c, u in zip(order.tolist(), upper.tolist()):
            if c not in read:
                return float(u)
        if len(order) < self.blocks[j].size:
            raise RuntimeError("the ranked screen ran out before the reads did")  # depth bounds the reads
        return float("-inf")


def _pad_rows(blocks: Sequence[Any], local: Sequence[np.ndarray], cands: Sequence[np.ndarray], new_s: int,
              new_c: int) -> torch.Tensor:
    """The round's rows: ``new_s`` sample rows then ``new_c`` candidate rows (a block with fewer candidates
    left pads with -1)."""
    S = _rows(blocks, local, new_s)
    if not new_c:
        return S
    return torch.cat([S, _rows(blocks, cands, new_c)])
