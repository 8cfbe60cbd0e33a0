"""Fresh host memory for a Lanczos basis (:mod:`geomprobe.linalg.host_blocks`): the next row's pages faulted in
on a background thread (page faults counted on the step's own thread), never beyond the stored rows plus one
nor past a capacity, values bit-identical with and without; the fallbacks (no free core, a kernel without
MADV_POPULATE_WRITE, no huge pages); the DGKS norm of the host step taken from Pythagoras, bit-identical to
the swept one; the Ritz rotation without copies of float32 rows."""

from __future__ import annotations

import ctypes
import errno
import math
import resource
import sys

import pytest
import torch

from geomprobe.linalg import host_arith as HA
from geomprobe.linalg import host_blocks as HB
from geomprobe.linalg import krylov_basis as KB
from geomprobe.linalg.krylov_basis import LanczosBasis
from geomprobe.linalg.lanczos import lanczos

LINUX = sys.platform.startswith("linux")
PAGE = 4096


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def thread_faults() -> int:
    """Minor page faults of the calling thread alone (the prefetch thread's own do not count)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.fixture
def prefetch(monkeypatch):
    monkeypatch.setattr(HB, "PREFETCH", True)
    monkeypatch.setattr(HB, "_populate_refused", False)


# ---------------------------------------------------------------------------------------------- the kernel's modes
@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                        ("always madvise [never]", "never"), ("garbage", "unavailable"),
                                        ("", "unavailable")])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
    f = tmp_path / "enabled"
    f.write_text(text)
    assert HB.thp_mode(str(f)) == mode
    assert HB.thp_mode(str(tmp_path / "missing")) == "unavailable"


def test_huge_pages_are_asked_only_where_the_mode_and_the_switch_allow(monkeypatch):
    calls = []

    def fake(start, length, advice):
        calls.append((start, length, advice))
        return 0

    monkeypatch.setattr(HB, "_madvise", lambda: fake)
    t = torch.empty(3 * HB.HUGE_PAGE // 4 + 1000)  # 3 MB: one whole 2 MiB page at least
    monkeypatch.setattr(HB, "HUGE_PAGES", False)
    assert HB.advise_huge_pages(t, "madvise") is False and calls == []  # off by default: measured slower here
    assert HB.advise_huge_pages(t, "always") is True and calls == []  # the kernel does it without a call
    monkeypatch.setattr(HB, "HUGE_PAGES", True)
    for mode in ("never", "unavailable"):
        assert HB.advise_huge_pages(t, mode) is False and calls == []
    assert HB.advise_huge_pages(t[::2], "madvise") is False and calls == []  # not contiguous
    assert HB.advise_huge_pages(t, "madvise") is True
    (start, length, advice), = calls
    # the 2 MiB-aligned part of the tensor's memory, nothing outside it
    a, n = t.data_ptr(), t.numel() * 4
    assert advice == HB.MADV_HUGEPAGE and start % HB.HUGE_PAGE == 0 and length % HB.HUGE_PAGE == 0
    assert a <= start and start + length <= a + n and length >= HB.HUGE_PAGE
    monkeypatch.setattr(HB, "_madvise", lambda: (lambda *a: -1))  # refused: plain pages, no error
    assert HB.advise_huge_pages(t, "madvise") is False


@pytest.mark.skipif(not LINUX, reason="madvise is Linux's")
def test_huge_pages_on_this_kernel_change_no_value(monkeypatch):
    monkeypatch.setattr(HB, "HUGE_PAGES", True)
    basis = LanczosBasis(300_000, torch.float32, "cpu")
    x = torch.randn(300_000, generator=gen(0))
    row = basis.append_normalized(x.clone(), 3.0)
    assert torch.equal(row, x / 3.0)


# ---------------------------------------------------------------------------------------------- populate
@pytest.mark.skipif(not LINUX, reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_faults_the_pages_in_and_keeps_the_values(monkeypatch):
    import mmap

    monkeypatch.setattr(HB, "_populate_refused", False)
    n = 16 << 20  # 64 MB mappings of their own, every page untouched (not memory an allocator kept)
    fresh = [mmap.mmap(-1, n) for _ in range(2)]
    t, u = (torch.frombuffer(m, dtype=torch.float32) for m in fresh)
    if not HB.populate(t):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (before 5.14)")
    f0 = thread_faults()
    t.fill_(1.5)  # the write finds its pages: at most the partial pages at the ends fault
    assert thread_faults() - f0 <= 4
    f0 = thread_faults()
    u.fill_(1.5)  # the same write on fresh pages faults every page: what populate saved
    assert thread_faults() - f0 >= n // PAGE // 2
    v = torch.arange(300_000, dtype=torch.float32)
    w = v.clone()
    assert HB.populate(w) and torch.equal(w, v)  # populating written memory changes nothing


def test_a_kernel_without_populate_is_asked_once(monkeypatch):
    calls = []

    def refuse(start, length, advice):
        calls.append(advice)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(HB, "_populate_refused", False)
    monkeypatch.setattr(HB, "_madvise", lambda: refuse)
    monkeypatch.setattr(HB, "PREFETCH", None)
    t = torch.empty(100_000)
    assert HB.populate(t) is False and HB.populate(t) is False
    assert calls == [HB.MADV_POPULATE_WRITE]  # not asked again
    assert HB.prefetch_wanted() is False
    assert LanczosBasis(1000, torch.float32, "cpu").prefetcher is None  # the basis falls back to plain writes


def test_no_prefetch_without_a_free_core(monkeypatch):
    monkeypatch.setattr(HB, "PREFETCH", None)
    monkeypatch.setattr(HB, "_populate_refused", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 10**6)
    assert HB.free_core() is False and HB.prefetch_wanted() is False
    assert LanczosBasis(1000, torch.float32, "cpu").prefetcher is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 0)
    assert HB.free_core() is True and HB.prefetch_wanted() is True
    monkeypatch.setattr(HB, "PREFETCH", False)
    assert HB.prefetch_wanted() is False


def test_prefetch_beside_a_gpu_product_even_without_a_free_core(monkeypatch):
    # with CUDA initialized the host basis serves a product on the GPU, whose device time leaves the CPU waiting
    monkeypatch.setattr(HB, "PREFETCH", None)
    monkeypatch.setattr(HB, "_populate_refused", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 10**6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert HB.accelerator_in_use() is False and HB.prefetch_wanted() is False
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert HB.accelerator_in_use() is True and HB.prefetch_wanted() is True
    assert LanczosBasis(1000, torch.float32, "cpu").prefetcher is not None
    monkeypatch.setattr(HB, "_populate_refused", True)  # a kernel without MADV_POPULATE_WRITE: never
    assert HB.prefetch_wanted() is False


def test_a_failing_prefetch_is_no_error_and_the_worker_goes_on():
    done = HB._WORKER.submit(lambda: 1 / 0)
    assert done.wait(10)
    hits = []
    assert HB._WORKER.submit(hits.append, 7).wait(10) and hits == [7]


# ---------------------------------------------------------------------------------------------- the basis
@pytest.mark.skipif(not LINUX, reason="per-thread fault counts and MADV_POPULATE_WRITE are Linux's")
def test_appended_rows_fault_on_the_background_thread_not_the_steps(prefetch):
    d = 1 << 21  # 8 MB rows: 2048 pages each
    if not HB.populate(torch.empty(d)):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (before 5.14)")
    basis = LanczosBasis(d, torch.float32, "cpu")
    assert basis.prefetcher is not None
    w = torch.randn(d, generator=gen(1))
    basis.append_normalized(w, 2.0)  # the first row (and the start of the prefetching)
    faults = []
    for i in range(20):  # across the first block's end: the next block is allocated a row ahead
        basis.prefetcher.wait()  # the matvec's time, in a run
        f0 = thread_faults()
        basis.append_normalized(w, 2.0 + i)
        faults.append(thread_faults() - f0)
    # before: every row faulted its 2048 pages on this thread
    assert max(faults) <= 16, faults
    assert basis.prefetcher.started == 21 and len(basis.blocks) == 2


def test_prefetching_stays_within_the_stored_rows_plus_one_and_the_capacity(prefetch, monkeypatch):
    touched = []
    monkeypatch.setattr(HB, "populate", lambda row: touched.append(row.data_ptr()))
    monkeypatch.setattr(KB.LanczosBasis, "BLOCK", 4)
    d = 1000
    basis = LanczosBasis(d, torch.float32, "cpu")
    rows = [basis.append(torch.full((d,), float(i))).data_ptr() for i in range(8)]
    basis.prefetcher.wait()
    # each row's successor, once: row 8 is the first of a third block, allocated ahead (address space)
    assert touched[:-1] == rows[1:] and len(touched) == 8 and len(basis.blocks) == 3
    assert basis.n == basis.peak == 8 and [b.shape[0] for b in basis._filled()] == [4, 4]
    touched.clear()
    capped = LanczosBasis(d, torch.float32, "cpu", capacity=6)
    for i in range(6):
        capped.append(torch.full((d,), float(i)))
    capped.prefetcher.wait()
    assert len(touched) == 5 and len(capped.blocks) == 2 and capped.blocks[1].shape[0] == 2  # none past 6
    with pytest.raises(RuntimeError, match="full"):
        capped.append(torch.zeros(d))


def test_prefetch_only_for_a_basis_in_host_memory(prefetch):
    assert LanczosBasis(100, torch.float32, "cpu").prefetcher is not None
    assert LanczosBasis(100, torch.float32, "meta").prefetcher is None


@pytest.mark.parametrize("max_basis", [None, 12])
def test_lanczos_results_are_bit_identical_with_and_without_prefetch(monkeypatch, max_basis):
    monkeypatch.setattr(HB, "_populate_refused", False)
    d = 40_003
    diag = torch.linspace(-1.0, 1.0, d)
    diag[-1], diag[0] = 3.0, -2.0
    runs = []
    for on in (False, True):
        monkeypatch.setattr(HB, "PREFETCH", on)
        runs.append(lanczos(lambda v: diag * v, d, k=1, tol=1e-4, max_iter=120, dtype=torch.float32,
                            generator=gen(3), max_basis=max_basis))
    a, b = runs
    assert torch.equal(a.ritz_values, b.ritz_values) and torch.equal(a.bounds, b.bounds)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.beta, b.beta) and a.steps == b.steps
    assert a.converged and abs(a.top(1)[0][0] - 3.0) <= a.top(1)[1][0] + 1e-6


# ---------------------------------------------------------------------------------------------- the host step
def _old_host_step(w, basis, cur, prev, beta_prev, local, extra=()):
    """The three-term host step as it was: the norm before the update swept in the first pass."""
    space = basis.space
    groups = [*(y[None] for y in extra), prev[None], cur[None]] if local else HA.row_groups(list(basis._filled()))
    alpha = float(space.reduce(HA.lanczos_pass(w, [cur[None]], dots=True)[0])[0])
    c, before_sq = HA.lanczos_pass(w, groups, pre=[(prev, beta_prev), (cur, alpha)], dots=True, norm=True)
    before = float(before_sq.clamp_min(0).sqrt())
    coeffs = c.clone()
    coeffs[-1] += alpha
    coeffs[-2] += beta_prev
    nsq = HA.lanczos_pass(w, groups, sub=c, norm=True)[1]
    beta = float(nsq.clamp_min(0).sqrt())
    repass = beta < KB.REPASS * before
    if repass:
        c3 = HA.lanczos_pass(w, groups, dots=True)[0]
        nsq = HA.lanczos_pass(w, groups, sub=c3, norm=True)[1]
        coeffs = coeffs + c3
        beta = float(nsq.clamp_min(0).sqrt())
    return w, coeffs, beta, repass


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize("near", [0.0, 0.3, 0.6, 0.75, 0.9, 0.999])
@pytest.mark.parametrize("with_extra", [False, True])
def test_the_host_step_equals_the_swept_norm_step_bit_for_bit(local, near, with_extra):
    # H v = alpha v + beta_prev prev + a part of size ``near`` along the basis + the rest new: the share of the
    # norm the first pass removes crosses the DGKS threshold (1/sqrt 2) between near = 0.6 and 0.75
    d, n = 20_011, 6
    g = gen(7)
    Q, _ = torch.linalg.qr(torch.randn(d, n + 2, dtype=torch.float64, generator=g))
    basis = LanczosBasis(d, torch.float32, "cpu")
    for i in range(n):
        basis.append(Q[:, i].float())
    prev, cur = basis.blocks[0][n - 2], basis.blocks[0][n - 1]
    extra = []
    if with_extra and local:  # a kept Ritz vector leaning on prev and v: rows that are not orthonormal
        y = (Q[:, n] + 0.2 * Q[:, n - 1]).float()
        extra = [y / y.norm()]
    mix = torch.randn(n, dtype=torch.float64, generator=g)
    mix = mix / mix.norm()
    along = (Q[:, :n] @ mix) if not local else (0.6 * Q[:, n - 2] + 0.8 * Q[:, n - 1])
    hv = (0.7 * Q[:, n - 1] + 0.4 * Q[:, n - 2] + near * along + math.sqrt(1 - near**2) * 0.5 * Q[:, n + 1]).float()
    w_new, c_new, b_new = KB._host_step(hv.clone(), basis, cur, prev, 0.4, 3, local, extra)
    w_old, c_old, b_old, repass = _old_host_step(hv.clone(), basis, cur, prev, 0.4, local, extra)
    assert torch.equal(w_new, w_old) and torch.equal(c_new, c_old) and b_new == b_old
    if near >= 0.9:
        assert repass  # the cases where the decision matters are covered


def test_pythagoras_decides_the_repass_as_the_swept_norm_would(monkeypatch):
    # H v with 0.9 along prev where the three-term step removes 0.2 of it: the local pass removes 0.7 of the
    # norm and leaves 1e-4, so the DGKS repass is due; without it the float32 pass leaves ~u * 0.7 along prev,
    # 3e-4 of the new vector (the control below shows that this test sees the difference)
    d = 10_007
    Q, _ = torch.linalg.qr(torch.randn(d, 4, dtype=torch.float64, generator=gen(11)))

    def step():
        basis = LanczosBasis(d, torch.float32, "cpu")
        for i in range(3):
            basis.append(Q[:, i].float())
        prev, cur = basis.blocks[0][1], basis.blocks[0][2]
        hv = (0.5 * Q[:, 2] + 0.9 * Q[:, 1] + 1e-4 * Q[:, 3]).float()
        w, c, beta = KB._host_step(hv.clone(), basis, cur, prev, 0.2, 3, True)
        left = float((torch.stack([prev, cur]).double() @ w.double()).abs().max())
        return left / beta, beta, c

    left, beta, c = step()
    assert left <= 1e-5 and beta == pytest.approx(1e-4, rel=1e-2)
    assert float(c[0]) == pytest.approx(0.9, abs=1e-6) and float(c[1]) == pytest.approx(0.5, abs=1e-6)
    monkeypatch.setattr(KB, "REPASS", 0.0)  # never a second pass
    left_once, _, _ = step()
    assert left_once > 1e-5


# ---------------------------------------------------------------------------------------------- Ritz vectors
def test_ritz_rotation_reads_float32_rows_where_they_lie(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    d, l = 50_021, 3
    g = gen(5)
    blocks = [torch.randn(16, d, generator=g), torch.randn(16, d, generator=g), torch.randn(5, d, generator=g)]
    Y = torch.randn(37, l, dtype=torch.float64, generator=g)
    out = torch.empty(l, d)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                self.n += 1
            return func(*args, **(kwargs or {}))

    width = 10_000
    with Copies() as mode:
        sq = HA.host_rotate(blocks, Y, [out], width=width, norms=True)
    chunks = -(-d // width)
    assert mode.n == chunks  # the result's rows only; the old pass copied each block's chunk too (4 per chunk)
    ref = Y.T @ torch.cat(blocks).double()
    bound = 37 * 2.0**-24 * (Y.T.abs() @ torch.cat(blocks).double().abs()) * 1.01 + 2.0**-24 * ref.abs()
    assert bool(((out.double() - ref).abs() <= bound).all())
    assert torch.allclose(sq, ref.square().sum(1), rtol=1e-5)
    # in place (a thick restart): the targets are the blocks' own first rows
    want = Y.T @ torch.cat(blocks).double()
    HA.host_rotate(blocks, Y, [blocks[0][:l]], width=width)
    assert bool(((blocks[0][:l].double() - want).abs() <= bound).all())


def test_fresh_rows_are_populated_once_before_their_first_write(monkeypatch):
    # no free core: each fresh row is populated on the writing thread, once; rows a rotation keeps are not
    monkeypatch.setattr(HB, "PREFETCH", False)
    monkeypatch.setattr(HB, "_populate_refused", False)
    seen = []
    monkeypatch.setattr(KB, "populate", lambda row: seen.append(row.data_ptr()))
    d = 1000
    basis = LanczosBasis(d, torch.float32, "cpu")
    assert basis.prefetcher is None and basis.populate_rows
    rows = [basis.append(torch.full((d,), float(i))).data_ptr() for i in range(5)]
    assert seen == rows
    basis.rotate(torch.eye(5, 2, dtype=torch.float64))
    seen.clear()
    again = [basis.append(torch.full((d,), 9.0)).data_ptr() for _ in range(4)]
    assert seen == again[3:]  # rows 2-4 were written before the rotation; row 5 is fresh
    monkeypatch.setattr(HB, "POPULATE", False)
    seen.clear()
    plain = LanczosBasis(d, torch.float32, "cpu")
    plain.append(torch.zeros(d))
    assert seen == [] and not plain.populate_rows and plain.prefetcher is None


# ---------------------------------------------------------------------------------------------- mapped blocks
def mapped(addr: int) -> bool:
    """Whether ``addr`` lies in a mapping of this process (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


@pytest.fixture
def small_maps(monkeypatch):
    monkeypatch.setattr(HB, "MAP_BYTES", 1 << 20)
    monkeypatch.setattr(HB, "ASYNC_RELEASE", True)
    if HB._mmap() is None or not LINUX:
        pytest.skip("no libc mmap here")


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mapped_block_holds_values_and_is_released_with_its_last_view(small_maps, monkeypatch, background, dtype):
    monkeypatch.setattr(HB, "free_core", lambda: background)
    rows, dim = 4, 300_001
    B = HB.host_block(rows, dim, dtype)
    assert B.shape == (rows, dim) and B.dtype == dtype and B.is_contiguous()
    addr = B.data_ptr()
    assert addr % PAGE == 0 and mapped(addr)
    x = torch.randn(rows, dim, generator=gen(0)).to(dtype)
    B.copy_(x)
    row = B[2]
    del B
    HB._WORKER.flush()
    assert mapped(addr) and torch.equal(row, x[2])  # a view keeps the mapping
    del row
    if background:
        HB._WORKER.flush()
    assert not mapped(addr)  # released: at once, or by the background thread


def test_pending_releases_finish_before_a_new_block_is_mapped(small_maps, monkeypatch):
    import threading

    monkeypatch.setattr(HB, "free_core", lambda: True)
    mm, mu = HB._mmap()
    events = []
    monkeypatch.setattr(HB, "_mmap", lambda: (lambda *a: events.append("map") or mm(*a),
                                              lambda *a: events.append("unmap") or mu(*a)))
    gate = threading.Event()
    B = HB.host_block(2, 1 << 20, torch.float32)
    addr = B.data_ptr()
    HB._WORKER.submit(gate.wait, 10)  # the thread busy: the release below queues behind it
    del B
    assert mapped(addr) and events == ["map"]  # queued, not yet released
    threading.Timer(0.2, gate.set).start()
    C = HB.host_block(2, 1 << 20, torch.float32)  # waits for the queue: the old block is gone first
    assert events == ["map", "unmap", "map"] and mapped(C.data_ptr())  # (the kernel may reuse the address)
    del C
    HB._WORKER.flush()


def test_mapping_falls_back_to_torch_empty(monkeypatch):
    calls = []
    monkeypatch.setattr(HB, "MAP_BYTES", 1 << 10)
    monkeypatch.setattr(HB, "_mmap", lambda: (lambda *a: calls.append(a) or ctypes.c_void_p(-1).value,
                                              lambda *a: calls.append(("unmap", *a))))
    B = HB.host_block(3, 1000, torch.float32)  # the mapping fails (MAP_FAILED): torch's memory instead
    assert B.shape == (3, 1000) and len(calls) == 1
    B.fill_(2.0)
    assert float(B.sum()) == 6000.0
    monkeypatch.setattr(HB, "ASYNC_RELEASE", False)
    assert HB.host_block(3, 1000, torch.float32).shape == (3, 1000) and len(calls) == 1  # not asked
    monkeypatch.setattr(HB, "ASYNC_RELEASE", True)
    monkeypatch.setattr(HB, "MAP_BYTES", 1 << 30)
    assert HB.host_block(3, 1000, torch.float32).shape == (3, 1000) and len(calls) == 1  # small: not mapped
    monkeypatch.setattr(HB, "MAP_BYTES", 1 << 10)
    monkeypatch.setattr(HB, "_mmap", lambda: None)  # no libc
    assert HB.host_block(3, 1000, torch.float32).shape == (3, 1000)


def test_a_dropped_basis_releases_every_block(small_maps, monkeypatch, prefetch):
    monkeypatch.setattr(HB, "free_core", lambda: True)
    d = 1 << 18
    basis = LanczosBasis(d, torch.float32, "cpu")
    for i in range(20):
        basis.append_normalized(torch.ones(d), 1.0 + i)
    addrs = [b.data_ptr() for b in basis.blocks]
    assert len(addrs) == 2 and all(mapped(a) for a in addrs)
    basis.prefetcher.wait()
    del basis
    HB._WORKER.flush()
    assert not any(mapped(a) for a in addrs)


@pytest.fixture
def keeping(small_maps, monkeypatch):
    """A probe counted in (released mappings kept); the kept ones released after."""
    monkeypatch.setattr(HB, "_keepers", 0)
    HB.release_kept()
    monkeypatch.setattr(HB, "free_core", lambda: False)
    HB.keep_released(True)
    yield
    HB.release_kept()


def test_a_probe_keeps_released_mappings_for_the_next_block_of_their_size(keeping):
    B = HB.host_block(2, 1 << 20, torch.float32)
    addr = B.data_ptr()
    B.fill_(3.0)
    del B
    assert mapped(addr) and HB.kept_bytes() == 8 << 20  # kept, not unmapped
    C = HB.host_block(4, 1 << 19, torch.float32)  # the same bytes: the same mapping, its pages in place
    assert C.data_ptr() == addr and HB.kept_bytes() == 0 and float(C[0, 0]) == 3.0
    D = HB.host_block(3, 1 << 20, torch.float32)  # another size: a new mapping
    assert D.data_ptr() != addr
    del C, D
    assert HB.kept_bytes() == (8 << 20) + (12 << 20)
    HB.keep_released(False)  # the last probe out: everything kept is released
    assert HB.kept_bytes() == 0 and not mapped(addr)


def test_kept_mappings_stay_under_their_share_and_nothing_is_kept_without_a_probe(keeping, monkeypatch):
    monkeypatch.setattr(HB, "KEEP_FRACTION", (10 << 20) / HB.physical_bytes())  # room for one 8 MiB block
    A, B = HB.host_block(2, 1 << 20, torch.float32), HB.host_block(2, 1 << 20, torch.float32)
    a, b = A.data_ptr(), B.data_ptr()
    del A
    del B
    assert HB.kept_bytes() == 8 << 20 and mapped(a) and not mapped(b)
    HB.keep_released(True)  # two probes in: one out keeps them
    HB.keep_released(False)
    assert HB.kept_bytes() == 8 << 20
    HB.keep_released(False)
    assert HB.kept_bytes() == 0 and not mapped(a)
    C = HB.host_block(2, 1 << 20, torch.float32)
    c = C.data_ptr()
    del C
    assert HB.kept_bytes() == 0 and not mapped(c)  # no probe in: released at once


def test_a_probe_counts_itself_in_at_its_first_probe_and_out_at_close(monkeypatch):
    from reference import TanhMLP

    import geomprobe as gp

    calls = []
    monkeypatch.setattr("geomprobe.probe.geometry_probe.keep_released", lambda on: calls.append(on))
    X, y = torch.randn(32, 6, generator=gen(0), dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen(1))
    model = TanhMLP().double()
    probe = gp.GeometryProbe(model, torch.nn.CrossEntropyLoss(), (X, y), metrics={"spectrum": {"max_iter": 5}})
    assert calls == []
    probe.probe(0)
    probe.probe(1)
    probe.close()
    probe.close()
    assert calls == [True, False]


def test_a_probe_collected_without_close_counts_itself_out(monkeypatch):
    import gc

    from reference import TanhMLP

    import geomprobe as gp

    calls = []
    monkeypatch.setattr("geomprobe.probe.geometry_probe.keep_released", lambda on: calls.append(on))
    X, y = torch.randn(32, 6, generator=gen(0), dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen(1))
    probe = gp.GeometryProbe(TanhMLP().double(), torch.nn.CrossEntropyLoss(), (X, y),
                             metrics={"spectrum": {"max_iter": 5}})
    probe.probe(0)
    del probe
    gc.collect()
    assert calls == [True, False]
