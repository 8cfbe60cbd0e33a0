"""Host passes split by columns over a pool of single-threaded workers.

A chunked pass over host vectors (:mod:`.host_arith`, :mod:`.host_fused`) keeps each chunk in cache, so a chunk
holds about 2^21 float32 values; spread over 16 torch threads, each elementwise operation on it gave every
thread ~16k values of a half-precision row group, and the parallel regions' and Python's fixed costs per
operation set the speed: eight-row bf16 dots ran at 10.5 GB/s on a 16-core host whose copies ran at 77 GB/s
(benchmarks/RESULTS.md section 6, eighth round). Every pass here is separable by columns (its inner products
are sums of per-column terms, its updates act column by column), so the columns are cut into one contiguous
range per worker, each worker runs the whole chunked pass over its range on one thread (its OpenMP setting is
its own: ``torch.set_num_threads(1)`` in a worker leaves the caller's threads as they were), and the partial
inner products are added in float64. Python holds the interpreter lock only between operations, which each
take a chunk's worth of memory traffic.

Each worker takes its share of the undivided pass's cache-sized chunk (:func:`worker_columns`). Updates act
column by column and round the same whatever the chunks; inner products are float32 sums over the smaller
chunks, added in float64, so they agree with the undivided pass's to float32 rounding of a chunk's sum. With
one thread (or a vector shorter than :data:`MIN_RANGE` columns a worker) the pass runs undivided on the
calling thread, bit for bit as before.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["MIN_RANGE", "column_ranges", "host_threads", "split_columns", "worker_columns"]

T = TypeVar("T")

# fewest columns a worker takes: below this the pool's hand-off (~50 us a task) costs more than it spreads
MIN_RANGE = 1 << 20

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_pid = os.getpid()


def host_threads() -> int:
    """Workers a pass may use: torch's intra-op threads of the calling thread (the user's statement of the
    cores the job takes)."""
    return max(1, torch.get_num_threads())


def _pool(workers: int) -> ThreadPoolExecutor:
    global _pid
    with _lock:
        if os.getpid() != _pid:  # a forked child inherits the dict but not the threads
            _pools.clear()
            _pid = os.getpid()
        pool = _pools.get(workers)
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="host-columns",
                                      initializer=torch.set_num_threads, initargs=(1,))
            _pools[workers] = pool
        return pool


def column_ranges(d: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, d)`` cut into at most ``parts`` contiguous ranges of at least :data:`MIN_RANGE` columns, each
    starting at a multiple of ``align`` (whole chunks of a chunked pass)."""
    parts = max(1, min(parts, d // MIN_RANGE))
    if parts == 1:
        return [(0, d)]
    step = -(-d // parts)
    step = -(-step // align) * align
    return [(a, min(d, a + step)) for a in range(0, d, step)]


def worker_columns(d: int, cols: int, threads: int | None = None, floor: int = 1 << 15) -> int:
    """Columns per chunk for a pass of ``cols`` columns per chunk undivided, when :func:`split_columns` splits it
    over its workers: each worker's chunk is its share of the cache-sized one (``cols`` over the workers, at
    least ``floor``). 16 workers each holding the whole chunk's float32 scratch (4-8 MB) left the last-level
    cache and made one-row bf16 passes 1.6-2.6x slower than undivided (benchmarks/RESULTS.md section 6,
    twelfth round)."""
    workers = len(column_ranges(d, threads if threads is not None else host_threads()))
    return cols if workers == 1 else max(min(floor, cols), cols // workers)


def split_columns(d: int, fn: Callable[[int, int], T], *, threads: int | None = None, align: int = 1) -> list[T]:
    """``fn(a, b)`` for each range of :func:`column_ranges` (``threads`` workers, default
    :func:`host_threads`), each on one of the pool's single-threaded workers while the calling thread waits
    (it would otherwise run its range on all of its own threads beside them); returns the results in column
    order. A worker's exception is raised here, after every
    range has ended (none is left writing)."""
    ranges = column_ranges(d, threads if threads is not None else host_threads(), align)
    if len(ranges) == 1:
        return [fn(0, d)]
    pool = _pool(len(ranges))
    futures = [pool.submit(fn, a, b) for a, b in ranges]
    results, first_error = [], None
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as e:  # noqa: BLE001 - raised once every range has ended
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return results
