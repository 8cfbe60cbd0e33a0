"""Page-locked host memory of exactly the size asked, kept in a pool for the next probe.

torch's page-locked allocator rounds every block up to a power of two before it asks the driver: a 4.4 GB row of
a 1B-parameter float32 model takes 8 GiB of locked memory, and the driver pins every page of it (~0.6 s per GB).
A lean 1B spectrum of ten rows spent ~50 s of its first probe there (75.8 s against 25.7 s for the next probe,
which found the blocks in torch's cache; benchmarks/RESULTS.md §6), and afterwards torch's cache held ~80 GB of
locked host memory.

Here a block of :data:`EXACT_FROM_BYTES` or more is an anonymous mapping of its own size, backed by transparent
huge pages where the kernel grants them (:data:`HUGE_PAGES`: the driver then pins 2 MiB pages, about twice as fast),
its pages faulted in on several threads at once (``MADV_POPULATE_WRITE`` over slices), then registered with the
driver (``cudaHostRegister``). When the last view of a block dies it goes back to a pool keyed by its size, where the
next request of that size takes it without a driver call (a probe in a training loop asks for the same sizes each
time); past :data:`POOL_FRACTION` of the host's memory a released block is unregistered and unmapped instead.
:func:`release_pool` empties the pool (``GeometryProbe.close`` calls it).

Reuse and the device: a block handed back may still be read or written by a copy queued on a CUDA stream. Its
owners wait for the copies of their own side streams before they drop it (``RowCopies.finish``); the pool also
records an event on the current stream when the block comes back and waits for it before handing the block out
again. Nothing here changes a value; where registration is unavailable or refused, :func:`pinned_empty` answers
None and the caller takes its usual route.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading

import torch

from . import host_blocks
from .size_pool import SizePool, physical_bytes

__all__ = ["EXACT_FROM_BYTES", "POOL_FRACTION", "pinned_empty", "pool_stats", "release_pool", "warm"]

EXACT_FROM_BYTES = 64 << 20  # below this torch's rounding wastes little and its cache serves well
POOL_FRACTION = 0.5  # of the host's physical memory, at most, kept locked in the pool between requests
POPULATE_THREADS = 8  # threads faulting a new block's pages in before it is registered
ENABLED = True  # False: every request answers None (the callers' torch route; benchmarks compare the two)
# A new block asks for transparent huge pages before its pages are faulted in (host_blocks.advise_huge_range), so
# that the driver pins 2 MiB pages instead of 4 KiB ones: on an H200's host (mode "madvise") a 2.2 GB row took
# 0.40-0.66 s to map and register against 0.79-0.98 s, and the ten products of the 1.1B Llama's first bf16
# spectrum, which run beside those registrations, 16.0-17.4 s against 19.8-21.6 s (benchmarks/RESULTS.md section 6,
# twenty-fourth round).
# (Pageable basis rows keep host_blocks.HUGE_PAGES, off: measured slower on a virtual machine's CPU host.)
HUGE_PAGES = True

_lock = threading.Lock()
_stats = {"mapped": 0, "reused": 0, "released": 0, "refused": 0, "warmed": 0, "live_bytes": 0}


class _Block:
    """One registered mapping; when the buffer holding it dies (with the last view of the tensor), the block goes
    back to the pool or is released."""

    __slots__ = ("addr", "nbytes")

    def __init__(self, addr: int, nbytes: int) -> None:
        self.addr, self.nbytes = addr, nbytes

    def __del__(self) -> None:
        # at interpreter shutdown the module's globals may be gone already: the system reclaims the memory then
        with contextlib.suppress(Exception):
            _give_back(self.addr, self.nbytes)


def _cudart():
    return torch.cuda.cudart()


def _ok(result) -> bool:
    try:
        return int(result) == 0
    except (TypeError, ValueError):
        return str(result).endswith("success")


def _register(addr: int, nbytes: int) -> bool:
    """Page-lock ``[addr, addr + nbytes)`` for the driver (tests replace this on hosts without CUDA)."""
    return _ok(_cudart().cudaHostRegister(addr, nbytes, 0))


def _unregister(addr: int) -> None:
    _cudart().cudaHostUnregister(addr)


def _usable() -> bool:
    return (ENABLED and torch.cuda.is_available() and torch.cuda.is_initialized()
            and hasattr(_cudart(), "cudaHostRegister") and hasattr(_cudart(), "cudaHostUnregister"))


def _event():
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream())
    return ev


def _free(addr: int, nbytes: int, event=None) -> None:
    if event is not None:
        event.synchronize()  # a copy queued before the block came back has finished with it
    _count("released")
    _unregister(addr)
    host_blocks._mmap()[1](addr, nbytes)


def _count(key: str, n: int = 1) -> None:
    with _lock:
        _stats[key] += n


# released blocks by size, each with the event recorded on the current stream when it came back
_POOL = SizePool(lambda: POOL_FRACTION * physical_bytes(), _free)


def _give_back(addr: int, nbytes: int) -> None:
    _count("live_bytes", -nbytes)
    if _POOL.put(addr, nbytes, _event()):
        return
    if host_blocks.free_core():  # unpinning and unmapping gigabytes takes a while: beside the caller where it can
        host_blocks._WORKER.submit(_free, addr, nbytes)
    else:
        _free(addr, nbytes)


def _populate(addr: int, nbytes: int) -> None:
    """Fault the mapping's pages in on up to :data:`POPULATE_THREADS` threads (the kernel's work, which runs in
    parallel; registration then pins pages that exist). Where the kernel refuses, registration faults them."""
    if not host_blocks.populate_wanted():
        return
    page = mmap.PAGESIZE
    parts = max(1, min(POPULATE_THREADS, nbytes // (64 << 20)))
    step = -(-nbytes // parts // page) * page
    views = []
    for a in range(0, nbytes, step):
        n = min(step, nbytes - a)
        views.append(torch.frombuffer((ctypes.c_char * n).from_address(addr + a), dtype=torch.uint8))
    threads = [threading.Thread(target=host_blocks.populate, args=(v,), daemon=True) for v in views[1:]]
    for t in threads:
        t.start()
    host_blocks.populate(views[0])
    for t in threads:
        t.join()


def _map_registered(nbytes: int) -> int | None:
    addr = host_blocks.map_anonymous(nbytes)
    if addr is None:
        return None
    if HUGE_PAGES:
        host_blocks.advise_huge_range(addr, nbytes)
    _populate(addr, nbytes)
    if _register(addr, nbytes):
        return addr
    host_blocks._mmap()[1](addr, nbytes)
    return None


_warming: dict[int, threading.Thread] = {}  # blocks being mapped ahead into the pool, by byte size


def warm(nbytes: int) -> bool:
    """Map and register one block of ``nbytes`` on a background thread and leave it in the pool, where the next
    :func:`pinned_empty` of that size takes it (and waits for it while it is still being mapped): a probe's first
    lean Lanczos row, mapped while its Landscape builds the graph, not on the step's thread before the first product
    (1.35 s for a 4.4 GB row). False where nothing starts: below :data:`EXACT_FROM_BYTES`, CUDA not in use, or a
    block of that size pooled or warming already."""
    if nbytes < EXACT_FROM_BYTES or not _usable():
        return False
    with _lock:
        if nbytes in _warming or _POOL.has(nbytes):
            return False

        def work() -> None:
            try:
                addr = _map_registered(nbytes)
                if addr is not None:
                    _count("mapped")
                    _count("warmed")
                    if not _POOL.put(addr, nbytes, None):
                        _free(addr, nbytes)
            finally:
                with _lock:
                    _warming.pop(nbytes, None)

        thread = _warming[nbytes] = threading.Thread(target=work, name="geomprobe-pinned-warm", daemon=True)
    thread.start()
    return True


def _wait_warming(nbytes: int) -> None:
    with _lock:
        thread = _warming.get(nbytes)
    if thread is not None:
        thread.join()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """An uninitialized page-locked host tensor of ``shape`` and ``dtype`` taking exactly its bytes (module
    docstring): from the pool where a block of that size waits there, else a new registered mapping. None where
    the block is below :data:`EXACT_FROM_BYTES`, CUDA is not in use, or the mapping or registration failed (the
    pool is emptied and the registration tried once more first): the caller then allocates as before. Cost: a
    new block pins its pages (the driver's time for its bytes, not the next power of two's); a pooled one none."""
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * dtype.itemsize
    if nbytes < EXACT_FROM_BYTES or not _usable():
        return None
    _wait_warming(nbytes)  # a block of this size being mapped ahead (warm) comes sooner than a new one
    entry = _POOL.take(nbytes)
    if entry is not None:
        addr, event = entry
        if event is not None:
            event.synchronize()  # a copy queued before the block came back has finished with it
        _count("reused")
    else:
        addr = _map_registered(nbytes)
        if addr is None and _POOL.bytes > 0:
            release_pool()
            addr = _map_registered(nbytes)
        if addr is None:
            _count("refused")
            return None
        _count("mapped")
    _count("live_bytes", nbytes)
    buf = (ctypes.c_char * nbytes).from_address(addr)
    buf._block = _Block(addr, nbytes)  # dies with the buffer, which the tensor's storage holds
    return torch.frombuffer(buf, dtype=dtype).view(*shape)


def release_pool() -> int:
    """Unregister and unmap every block waiting in the pool; returns the bytes released. Blocks in use are not
    touched (each goes back to the pool, or is released, when its last view dies)."""
    return _POOL.release()


def pool_stats() -> dict:
    """Counts of this process's exact-size blocks: ``mapped`` (new registrations, ``warmed`` of them ahead by
    :func:`warm`), ``reused`` (taken from the pool), ``released``, ``refused``, and the bytes ``pooled`` and
    ``live`` (in use) now."""
    with _lock:
        return {**_stats, "pooled_bytes": _POOL.bytes}
