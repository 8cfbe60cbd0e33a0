"""Released host blocks kept by byte size for the next request of that size, up to a share of the host's memory.

A probe of a training loop asks for the same block sizes each time (its basis rows, its work vector, its warm
start's vectors): a block kept when it is released is handed out again without the system or driver calls, and
page faults, of a new one. Two kinds of block share this bookkeeping: page-locked mappings
(:mod:`.pinned_memory`) and pageable basis mappings (:mod:`.host_blocks`). Each caller says how to free a block
it does not keep, and what its limit is at the time (read then, so that a module constant can change it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["SizePool", "physical_bytes"]


def physical_bytes() -> int:
    """The host's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - every Linux answers
        return 0


class SizePool:
    """Blocks ``(address, tag)`` kept by their byte size. ``limit()``: the most bytes kept at once; ``free(addr,
    nbytes, tag)``: releases a block not kept (or emptied by :meth:`release`). Thread-safe; re-entrant, since a
    block may come back from the garbage collector inside a locked region of the same thread."""

    def __init__(self, limit: Callable[[], float], free: Callable[[int, int, object], None]) -> None:
        self._limit, self._free = limit, free
        self._lock = threading.RLock()
        self._blocks: dict[int, list[tuple[int, object]]] = {}
        self.bytes = 0  # kept now

    def put(self, addr: int, nbytes: int, tag: object = None) -> bool:
        """Keep the block if it fits under the limit; False (nothing done) where it does not."""
        with self._lock:
            if self.bytes + nbytes > self._limit():
                return False
            self._blocks.setdefault(nbytes, []).append((addr, tag))
            self.bytes += nbytes
            return True

    def has(self, nbytes: int) -> bool:
        """Whether a block of exactly ``nbytes`` is kept."""
        with self._lock:
            return bool(self._blocks.get(nbytes))

    def take(self, nbytes: int) -> tuple[int, object] | None:
        """A kept block of exactly ``nbytes``, removed from the pool, or None."""
        with self._lock:
            waiting = self._blocks.get(nbytes)
            if not waiting:
                return None
            self.bytes -= nbytes
            return waiting.pop()

    def release(self) -> int:
        """Free every kept block; returns the bytes freed."""
        with self._lock:
            entries = [(nbytes, addr, tag) for nbytes, lst in self._blocks.items() for addr, tag in lst]
            self._blocks.clear()
            self.bytes = 0
        for nbytes, addr, tag in entries:
            self._free(addr, nbytes, tag)
        return sum(e[0] for e in entries)
