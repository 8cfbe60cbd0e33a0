"""Host passes split by columns over single-threaded workers (linalg/host_pool.py): the ranges, the workers'
threads, errors, and the passes' results against the undivided pass."""

from __future__ import annotations

import threading

import pytest
import torch

from geomprobe.linalg import host_pool
from geomprobe.linalg.host_arith import lanczos_pass, row_groups
from geomprobe.linalg.host_fused import host_combine, host_project


def test_column_ranges_cover_the_columns_in_whole_chunks():
    M = host_pool.MIN_RANGE
    assert host_pool.column_ranges(10 * M, 1) == [(0, 10 * M)]
    assert host_pool.column_ranges(M + 5, 8) == [(0, M + 5)]  # too short to split
    for d, parts, align in [(10 * M + 7, 4, 1), (10 * M + 7, 16, 3000), (3 * M, 3, 1 << 15)]:
        r = host_pool.column_ranges(d, parts, align)
        assert r[0][0] == 0 and r[-1][1] == d and len(r) <= parts
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(r, r[1:]))
        assert all(a % align == 0 for a, _ in r)
        assert all(b - a >= M for a, b in r[:-1])


def test_split_columns_runs_each_range_on_a_single_threaded_worker_and_leaves_the_callers_threads():
    seen = []
    lock = threading.Lock()

    def fn(a, b):
        with lock:
            seen.append((a, b, torch.get_num_threads(), threading.current_thread().name))
        return b - a

    before = torch.get_num_threads()
    d = 4 * host_pool.MIN_RANGE + 3
    out = host_pool.split_columns(d, fn, threads=4)
    assert sum(out) == d and len(out) == 4
    assert all(t == 1 and name.startswith("host-columns") for _, _, t, name in seen)
    assert torch.get_num_threads() == before
    assert host_pool.split_columns(d, fn, threads=1) == [d]  # undivided: on the calling thread
    assert seen[-1][3] == threading.current_thread().name


def test_a_workers_error_is_raised_after_every_range_has_ended():
    ended = []

    def fn(a, b):
        if a == 0:
            raise ArithmeticError("range 0 failed")
        ended.append(a)
        return a

    with pytest.raises(ArithmeticError, match="range 0 failed"):
        host_pool.split_columns(3 * host_pool.MIN_RANGE, fn, threads=3)
    assert len(ended) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_passes_agree_with_the_undivided_pass(dtype):
    g = torch.Generator().manual_seed(2)
    d = 3 * host_pool.MIN_RANGE + 12345
    B = torch.randn(5, d, generator=g).to(dtype)
    w0 = torch.randn(d, generator=g).to(dtype)
    c = torch.randn(5, generator=g, dtype=torch.float64)
    results = {}
    for threads in (1, 3):
        w = w0.clone()
        dots = lanczos_pass(w, row_groups([B]), pre=[(B[4], 0.3)], dots=True, norm=True, threads=threads)
        w2 = w.clone()
        nsq = lanczos_pass(w2, row_groups([B]), sub=c, norm=True, threads=threads)[1]
        z, u = torch.empty_like(w0), torch.empty_like(w0)
        zn = host_project(w0, row_groups([B]), c, c * 2, z, u, threads=threads)
        out = w0.clone()
        comb = host_combine(out, [(out, 0.5), (B[1], -1.0)], before=[(0, 1)], after=[-1], threads=threads)
        results[threads] = (w, dots, w2, nsq, z, u, zn, out, comb)
    one, split = results[1], results[3]
    # updates act column by column: the same roundings whatever the chunks; inner products are float32 sums
    # over each worker's (smaller) chunks, so they agree to float32 rounding of those sums
    for a, b in zip(one, split):
        if isinstance(a, tuple):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=5e-2)  # 3M float32 products
        elif isinstance(a, float):
            assert abs(a - b) <= 1e-5 * abs(a)
        elif a.dtype == dtype:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
