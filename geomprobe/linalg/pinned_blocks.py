"""Page-locked host blocks for an offloaded Lanczos basis, each allocated one block ahead on another thread.

Page-locking costs about 0.6 s per GB (the driver faults in and pins every page): under the 1.5x plan a GPT-2
124M bf16 run stores a 1 GiB block of four rows every fourth step, and each allocation held the step's thread
for ~0.6 s before the next product could start (14 of the 46 s outside the products of a 98-step run,
benchmarks/RESULTS.md section 6, eleventh round). Allocated while the products run, the next block is ready
when the basis reaches it. Memory: at most one block beyond the rows stored (``LanczosBasis.PIN_BLOCK_BYTES``),
released to torch's pinned-memory cache when the basis is dropped, where the next run finds it."""

from __future__ import annotations

import threading
import time

import torch

from .pinned_memory import pinned_empty

__all__ = ["PinnedAhead", "ahead_stats"]

# blocks allocated ahead in this process, their time, and the time their takers waited for them (or for a block
# allocated on the spot)
_stats = {"blocks": 0, "bytes": 0, "seconds": 0.0, "waited": 0.0}


def ahead_stats() -> dict:
    """How many page-locked blocks were allocated ahead in this process, their bytes and the seconds it took (on
    the background threads; copies to and from page-locked memory may wait meanwhile), and the seconds the
    callers of :meth:`PinnedAhead.take` waited (``waited``)."""
    return dict(_stats)


class PinnedAhead:
    """Hands out page-locked ``(rows, dim)`` blocks of ``dtype``; after each, :meth:`kick` starts allocating the
    next block (``block`` rows, fewer where ``capacity`` caps the total) on a daemon thread. A refused allocation
    raises ``RuntimeError`` from :meth:`take`, as the direct allocation would.

    When to kick: torch's pinned-memory allocator holds its lock while the driver page-locks a new block, and
    every asynchronous copy from or to pinned memory takes that lock too, so an allocation beside the caller's
    own copies stalls them (measured: ~0.45 s of a step's copies, every fourth step of a GPT-2 124M bf16 run).
    The owner kicks once its copies are queued, before a product that copies nothing."""

    def __init__(self, dim: int, dtype: torch.dtype, block: int, capacity: int | None = None):
        self.dim, self.dtype, self.block, self.capacity = dim, dtype, block, capacity
        self.allocated = 0  # rows in blocks handed out
        self._thread: threading.Thread | None = None
        self._box: dict = {}
        self._due = False

    def _alloc(self, rows: int) -> torch.Tensor:
        exact = pinned_empty((rows, self.dim), self.dtype)  # not rounded up to a power of two (pinned_memory.py)
        return exact if exact is not None else torch.empty(rows, self.dim, dtype=self.dtype, pin_memory=True)

    def take(self, rows: int) -> torch.Tensor:
        """A page-locked block of ``rows`` rows: the one allocated ahead when it has that many, else a new one."""
        out = None
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            box, self._box = self._box, {}
            if "error" in box:
                raise box["error"]
            if box.get("block") is not None and box["block"].shape[0] == rows:
                out = box["block"]
        if out is None:
            out = self._alloc(rows)
        _stats["waited"] += time.perf_counter() - t0
        self.allocated += rows
        self._due = True
        return out

    def kick(self) -> None:
        """Start allocating the next block if one is due (a block was taken since the last kick) and the cap
        leaves room for it."""
        following = self.block if self.capacity is None else min(self.block, self.capacity - self.allocated)
        if not self._due or following <= 0 or self._thread is not None:
            return
        self._due = False
        box = self._box

        def work() -> None:
            t0 = time.perf_counter()
            try:
                box["block"] = self._alloc(following)
            except RuntimeError as e:  # refused: the next take() raises it, where the caller falls back
                box["error"] = e
                return
            _stats["blocks"] += 1
            _stats["bytes"] += box["block"].numel() * box["block"].element_size()
            _stats["seconds"] += time.perf_counter() - t0

        self._thread = threading.Thread(target=work, name="geomprobe-pinned-ahead", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Wait for a block still being allocated and drop it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._box = {}
