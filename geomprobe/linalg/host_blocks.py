"""Fresh host memory for a Lanczos basis, made cheap to touch: transparent huge pages where the kernel grants
them on request, and the next basis row's pages faulted in by a background thread while the matvec runs, where
a core is free for it.

A basis row of a 10M-parameter float32 model is 40 MB of fresh pages. Written for the first time, each 4 KiB
page faults (about 10k faults a row): 17-25 ms of kernel time per row on the CPU host of benchmarks/RESULTS.md
§6, where the row's arithmetic itself takes 3 ms. Two levers, both falling back to plain pages and plain writes
whenever the kernel says no:

- ``madvise(MADV_HUGEPAGE)`` on a block when :data:`HUGE_PAGES` asks and the kernel's transparent-huge-page
  mode is ``madvise`` (the usual default; ``always`` needs nothing, ``never`` gets nothing): the block then
  faults 2 MiB at a time, ~20 faults a row instead of ~10k. Off by default: see :data:`HUGE_PAGES`.
- ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) of the next row on a background thread when a row is taken
  (:class:`RowPrefetcher`): the pages exist when the step writes the row, and the faulting ran on another core
  during the matvec. Only where a core is free (:func:`free_core`): otherwise the thread would take its time
  from the matvec's. Where none is, the row is populated by the same call on the writing thread just before
  its first write: one call instead of a fault per page, measured from no saving to 15 % of the faults' time.
  The call does not change the memory's contents, so the row's values never depend on when it ran.

A block of :data:`MAP_BYTES` or more is also a mapping of its own (:func:`host_block`), released on the
background thread when the basis is dropped, where a core is free.

None of this changes a value anywhere or allocates beyond the block asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import queue
import threading

import torch

from .size_pool import SizePool, physical_bytes

__all__ = [
    "HUGE_PAGE", "THP_ENABLED", "RowPrefetcher", "accelerator_in_use", "advise_huge_pages", "advise_huge_range",
    "free_core",
    "keep_released", "kept_bytes", "map_anonymous", "release_kept", "unmap_now_or_beside",
    "host_block", "populate", "populate_wanted", "populated_ahead", "prefetch_wanted", "thp_mode",
]

MADV_HUGEPAGE = 14  # <asm-generic/mman-common.h>
MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels answer EINVAL
HUGE_PAGE = 2 << 20  # the PMD size of x86-64 and of arm64 with 4 KiB pages, where transparent huge pages apply
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

# Huge pages for host basis blocks: off unless asked. Measured on the CPU host of benchmarks/RESULTS.md §6 (a
# virtual machine, mode "madvise"), the 10M MLP's spectrum wrote its rows at 90 ms each with huge pages against
# 20 ms without: 2 MiB pages come from memory the hypervisor has not backed yet, and backing it costs more than
# the guest's faults they save. On a host without that layer they cut a row's faults 500-fold.
HUGE_PAGES = False
# Touching the next row ahead: None chooses by the machine (free_core); True / False force (tests, benchmarks).
PREFETCH: bool | None = None
# A fresh row not touched ahead is populated just before its first write, on the writing thread: the kernel
# fills the range in one call instead of taking a fault per page (on the host of benchmarks/RESULTS.md §6,
# whole runs 1.36-1.40 s against 1.56-1.65 s for the 10M MLP's 87 rows; benchmarks/first_touch.py 17-24 ms a
# row against 19, within its noise). False: the write faults its pages (tests, benchmarks).
POPULATE = True
# A host block of this many bytes or more is a mapping of its own, unmapped on the background thread when its
# last view dies, where a core is free (:func:`host_block`): releasing the 87 rows of the 10M MLP's basis
# (3.5 GB, 870k pages) took 0.22-0.25 s of its spectrum on the caller's thread. False: torch's allocator.
MAP_BYTES = 64 << 20
ASYNC_RELEASE = True

_libc = None
_mapper = None
_populate_refused = False  # the kernel answered EINVAL once (no MADV_POPULATE_WRITE): not asked again


def _madvise():
    """libc's ``madvise``, or None where there is none (not Linux, no libc found)."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = lib.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _mmap():
    """libc's ``(mmap, munmap)``, or None where there are none."""
    global _mapper
    if _mapper is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            mm, mu = lib.mmap, lib.munmap
            mm.restype, mm.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_int, ctypes.c_long]
            mu.restype, mu.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
            _mapper = (mm, mu)
        except (OSError, AttributeError):
            _mapper = False
    return _mapper or None


# Mappings released while a probe of a training loop runs (keep_released) are kept for the next probe's blocks of
# the same size, their pages in place: each probe of the 1.1B Llama's default plan faulted its fresh rows in for
# 4.5 s and unmapped them for 2.3 s (cProfile of a later probe, benchmarks/RESULTS.md section 6, nineteenth
# round). At most this share of the host's memory is kept; all of it is released when the last probe closes.
KEEP_FRACTION = 0.25
_keep_lock = threading.Lock()
_keepers = 0


def keep_released(on: bool) -> None:
    """Count a probe in (``True``) or out (``False``). While any is in, a released block mapping is kept for a later
    :func:`host_block` of its size (up to :data:`KEEP_FRACTION` of the host's memory) instead of unmapped; when
    the last one goes out, every kept mapping is released (:func:`release_kept`)."""
    global _keepers
    with _keep_lock:
        _keepers = max(0, _keepers + (1 if on else -1))
        last = _keepers == 0
    if last:
        release_kept()


def kept_bytes() -> int:
    """Bytes of released mappings kept for reuse now."""
    return _KEPT.bytes


def release_kept() -> int:
    """Unmap every kept mapping (on the background thread where a core is free); returns the bytes released."""
    return _KEPT.release()


def unmap_now_or_beside(addr: int, length: int) -> None:
    """Unmap ``[addr, addr + length)``: on the background thread where a core is free, else at once."""
    unmap = _mmap()[1]
    if free_core():
        _WORKER.submit(unmap, addr, length)
    else:
        unmap(addr, length)


def map_anonymous(nbytes: int) -> int | None:
    """The address of a fresh private anonymous mapping of ``nbytes`` (no page touched), once the releases still
    pending have run; None where mapping is unavailable or fails."""
    fns = _mmap()
    if fns is None:
        return None
    _WORKER.flush()  # a basis dropped and a new one allocated are never both in memory
    addr = fns[0](None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    return None if addr is None or addr == ctypes.c_void_p(-1).value else addr


_KEPT = SizePool(lambda: KEEP_FRACTION * physical_bytes() if _keepers else 0.0,
                 lambda addr, length, _tag: unmap_now_or_beside(addr, length))


class _Mapping:
    """An anonymous mapping, kept for reuse when this object dies while a probe keeps released mappings
    (:func:`keep_released`), else unmapped: on the background thread where a core is free, else at once."""

    __slots__ = ("addr", "length")

    def __init__(self, addr: int, length: int) -> None:
        self.addr, self.length = addr, length

    def __del__(self) -> None:
        # at interpreter shutdown the module's globals may be gone already: the system reclaims the memory then
        with contextlib.suppress(Exception):
            if not _KEPT.put(self.addr, self.length):
                unmap_now_or_beside(self.addr, self.length)


def host_block(rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized ``(rows, dim)`` host tensor, as ``torch.empty`` gives, for a basis block. One of
    :data:`MAP_BYTES` or more is an anonymous mapping of its own (page-aligned), and when its last view dies
    the mapping is released on the background thread where a core is free (:func:`free_core`), else at once,
    or kept for the next block of its size while a probe keeps released mappings (:func:`keep_released`), which
    then takes it with its pages in place. Releases still pending are waited for before a new mapping is taken,
    so a basis dropped and a new one allocated are never both in memory. Falls back to ``torch.empty`` where
    mapping is not available or fails. Cost: one system call (none for a kept mapping); no page touched."""
    nbytes = rows * dim * dtype.itemsize
    if not ASYNC_RELEASE or nbytes < MAP_BYTES:
        return torch.empty(rows, dim, dtype=dtype)
    kept = _KEPT.take(nbytes)
    addr = kept[0] if kept is not None else map_anonymous(nbytes)
    if addr is None:
        return torch.empty(rows, dim, dtype=dtype)
    buf = (ctypes.c_char * nbytes).from_address(addr)
    buf._mapping = _Mapping(addr, nbytes)  # dies with the buffer, which the tensor's storage holds
    return torch.frombuffer(buf, dtype=dtype).view(rows, dim)


def thp_mode(path: str = THP_ENABLED) -> str:
    """The kernel's transparent-huge-page mode, the bracketed word of ``path`` (``"always"``, ``"madvise"``,
    ``"never"``), or ``"unavailable"`` where the file is missing or unreadable (no THP support, not Linux)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def _aligned(addr: int, nbytes: int, align: int) -> tuple[int, int]:
    """The ``align``-aligned part ``(start, length)`` of ``[addr, addr + nbytes)`` (length 0 if none)."""
    start = -(-addr // align) * align
    return start, max(0, (addr + nbytes) // align * align - start)


def _span(t: torch.Tensor, align: int) -> tuple[int, int]:
    """The ``align``-aligned part ``(start, length)`` of the memory of contiguous ``t`` (length 0 if none)."""
    return _aligned(t.data_ptr(), t.numel() * t.element_size(), align)


def advise_huge_pages(t: torch.Tensor, mode: str | None = None) -> bool:
    """Ask the kernel to back host tensor ``t`` (contiguous, freshly allocated, not yet touched) with
    transparent huge pages: ``madvise(MADV_HUGEPAGE)`` on its 2 MiB-aligned part, when :data:`HUGE_PAGES`
    asks and the mode (:func:`thp_mode`, or ``mode``) is ``"madvise"``. Returns whether the memory is eligible
    for huge pages now (mode ``"always"``: without a call, whatever :data:`HUGE_PAGES` says). Changes no value;
    mode ``"never"``, no THP support or a refusal (any errno) leave plain pages. Cost: one system call, no page
    touched."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return False
    mode = thp_mode() if mode is None else mode
    if mode == "always":
        return True
    if mode != "madvise" or not HUGE_PAGES:
        return False
    return advise_huge_range(t.data_ptr(), t.numel() * t.element_size(), mode)


def advise_huge_range(addr: int, nbytes: int, mode: str | None = None) -> bool:
    """``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned part of ``[addr, addr + nbytes)`` (memory not yet touched)
    where the kernel's mode (:func:`thp_mode`, or ``mode``) is ``"madvise"``, whatever :data:`HUGE_PAGES` says
    (the caller decided); True also for mode ``"always"``, where nothing needs asking. Changes no value."""
    mode = thp_mode() if mode is None else mode
    if mode == "always":
        return True
    fn = _madvise()
    start, length = _aligned(addr, nbytes, HUGE_PAGE)
    if mode != "madvise" or fn is None or length == 0:
        return False
    return fn(start, length, MADV_HUGEPAGE) == 0


def populate(t: torch.Tensor) -> bool:
    """Fault in the pages of host tensor ``t`` (contiguous) as a write would, without writing:
    ``madvise(MADV_POPULATE_WRITE)`` on its page-aligned part (a partial page at either end is left to the
    write). Returns whether the kernel did it; False where it cannot (a kernel before 5.14, not Linux), and then
    it is not asked again in this process. The values of ``t`` are unchanged. Cost: the page faults' kernel
    time, on the calling thread; the GIL is released meanwhile (ctypes)."""
    global _populate_refused
    fn = None if _populate_refused else _madvise()
    if fn is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    start, length = _span(t, os.sysconf("SC_PAGE_SIZE"))
    if length == 0:
        return True
    if fn(start, length, MADV_POPULATE_WRITE) == 0:
        return True
    if ctypes.get_errno() == errno.EINVAL:
        _populate_refused = True
    return False


def free_core() -> bool:
    """Whether this process leaves a CPU core free beside torch's own threads (fewer intra-op threads than the
    cores it may run on), where a background thread's work costs the matvec nothing. The thread count is the
    user's statement of the cores the job takes; other processes' load is not judged (the one-minute load
    average, tried, still counted a benchmark run that had just ended and turned the prefetch off for the
    next). Where another process does hold the spare core, the background call shares a core with the matvec
    and costs about what the same call on the matvec's thread would."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


def populate_wanted() -> bool:
    """Whether a fresh basis row is populated before its first write (:data:`POPULATE`, the kernel permitting)."""
    return POPULATE and not _populate_refused


def accelerator_in_use() -> bool:
    """Whether this process has initialized CUDA: a basis in host memory then most likely serves a matvec on the
    GPU (the host-vector mode), whose device work leaves torch's CPU threads waiting for most of a product."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def prefetch_wanted() -> bool:
    """Whether a basis in host memory touches its next row ahead (:data:`PREFETCH`, else :func:`free_core` or
    :func:`accelerator_in_use`). Beside a GPU's product the background faults cost the product little even with
    torch on every core: GPT-2 355M bf16 on host vectors (16 of 16 cores), 10 steps, 70.9 s with the rows faulted
    on the main thread, 58.4 s with them faulted beside the products (benchmarks/RESULTS.md §6)."""
    if PREFETCH is not None:
        return PREFETCH and not _populate_refused
    return not _populate_refused and (free_core() or accelerator_in_use())


class _Worker:
    """One daemon thread per process running submitted calls in order. A thread started per row cost 1.7 ms a
    start on a busy host (``Thread.start`` waits for the new thread to run): 0.15 s of a probe. Started on
    first use and again in a forked child, which inherits the queue but not the thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._pid: int | None = None

    def submit(self, fn, *args) -> threading.Event:
        """Queue ``fn(*args)``; the event is set once it has run (an exception in it is dropped: the work
        here only ever saves time)."""
        with self._lock:
            if self._queue is None or self._pid != os.getpid():
                self._queue, self._pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=self._run, args=(self._queue,), name="geomprobe-host-blocks",
                                 daemon=True).start()
            done = threading.Event()
            self._queue.put((fn, args, done))
        return done

    def flush(self) -> None:
        """Return once every call queued so far has run (at once where the thread never started here)."""
        if self._queue is not None and self._pid == os.getpid():
            self.submit(lambda: None).wait()

    @staticmethod
    def _run(q: queue.SimpleQueue) -> None:
        while True:
            fn, args, done = q.get()
            # a failed prefetch only means that the write faults the pages itself: never an error of the run
            with contextlib.suppress(Exception):
                fn(*args)
            del fn, args  # the row must not stay alive while the thread waits for the next one
            done.set()


_WORKER = _Worker()


def populated_ahead(rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A fresh ``(rows, dim)`` host block whose pages the background thread starts faulting in now, for
    results written at the end of a run (a spectrum's Ritz vectors), so that their first write does not take
    the faults on the caller's thread; None where nothing would run beside the caller (:func:`prefetch_wanted`)
    or the block is below :data:`MAP_BYTES` (then a fresh tensor costs as much). Values uninitialized. Measured
    on the CPU (two threads, ten 0.4 GB float32 rows): two Ritz vectors took 0.63-1.48 s into fresh memory and
    0.40-0.42 s into populated memory. Cost: one system call here; the faults on the background thread."""
    item = torch.empty(0, dtype=dtype).element_size()
    if rows < 1 or rows * dim * item < MAP_BYTES or not (populate_wanted() and prefetch_wanted()):
        return None
    block = host_block(rows, dim, dtype)
    advise_huge_pages(block)
    _WORKER.submit(populate, block)  # the queued call holds the block until it has run
    return block


class RowPrefetcher:
    """At most one row's pages being faulted in by the background thread (:func:`populate`).

    The queued call holds the row tensor until it has run, so the memory cannot be released under it;
    :meth:`wait` waits for it. A row that the caller writes before the thread reaches it is simply faulted
    by the write, so the caller never needs to wait before writing."""

    def __init__(self) -> None:
        self._done: threading.Event | None = None
        self.started = 0  # rows handed to the thread (tests, benchmarks)

    def start(self, row: torch.Tensor) -> None:
        """Fault ``row``'s pages in on the background thread, once the previous row's are."""
        self.wait()
        self._done = _WORKER.submit(populate, row)
        self.started += 1

    def wait(self) -> None:
        """Return once no row is being faulted in."""
        if self._done is not None:
            self._done.wait()
            self._done = None
