"""Page-locked basis blocks allocated one ahead on another thread (linalg/pinned_blocks.py): the block handed
out is the one allocated ahead, sizes follow the basis's cap, a refusal reaches the caller, at most one block is
allocated beyond those handed out. Page-locked memory needs CUDA: the allocation itself is replaced here (and
taken for real where a GPU is present)."""

from __future__ import annotations

import threading

import pytest
import torch

from geomprobe.linalg.pinned_blocks import PinnedAhead


class _Counting(PinnedAhead):
    def __init__(self, *a, fail_at: int | None = None, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[int, str]] = []
        self.fail_at = fail_at

    def _alloc(self, rows):
        self.calls.append((rows, threading.current_thread().name))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("CUDA error: out of memory")
        return torch.empty(rows, self.dim, dtype=self.dtype)


def test_each_block_after_the_first_was_allocated_ahead_on_another_thread():
    p = _Counting(8, torch.bfloat16, block=4)
    blocks = []
    for _ in range(3):
        blocks.append(p.take(4))
        p.kick()
        p.kick()  # one block ahead at most, however often kicked
    p.close()
    assert [b.shape for b in blocks] == [(4, 8)] * 3
    assert p.calls[0][1] == threading.current_thread().name  # the first one is needed at once
    assert all(name == "geomprobe-pinned-ahead" for _, name in p.calls[1:])
    assert len(p.calls) == 4  # three handed out, one ahead: never more than one beyond


def test_the_cap_cuts_the_last_block_and_stops_allocating_ahead():
    p = _Counting(8, torch.float32, block=4, capacity=10)
    sizes = []
    for rows in (4, 4, 2):
        sizes.append(p.take(rows).shape[0])
        p.kick()
    p.close()
    assert sizes == [4, 4, 2]
    assert [r for r, _ in p.calls] == [4, 4, 2]  # nothing allocated past the cap


def test_a_block_of_another_size_is_allocated_directly_and_a_refusal_reaches_the_caller():
    p = _Counting(8, torch.float32, block=4)
    p.take(4)
    p.kick()
    assert p.take(3).shape == (3, 8)  # the one ahead had 4 rows
    q = _Counting(8, torch.float32, block=4, fail_at=2)
    q.take(4)
    q.kick()
    with pytest.raises(RuntimeError, match="out of memory"):
        q.take(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_real_blocks_are_page_locked():
    p = PinnedAhead(1024, torch.bfloat16, block=2)
    a = p.take(2)
    p.kick()
    assert a.is_pinned() and p.take(2).is_pinned()
    p.close()


def test_nothing_is_allocated_ahead_until_kicked():
    p = _Counting(8, torch.float32, block=4)
    p.take(4)
    assert len(p.calls) == 1
    p.kick()
    p.close()
    assert len(p.calls) == 2


def test_blocks_allocated_ahead_are_counted_with_their_time():
    from geomprobe.linalg import pinned_blocks
    before = pinned_blocks.ahead_stats()
    p = _Counting(8, torch.float32, block=2, capacity=6)
    for _ in range(3):
        p.take(2)
        p.kick()
    p.close()
    after = pinned_blocks.ahead_stats()
    assert after["blocks"] - before["blocks"] == 2 and after["bytes"] - before["bytes"] == 2 * 2 * 8 * 4
    assert after["seconds"] >= before["seconds"]


def test_a_lanczos_run_allocates_no_page_locked_block_ahead_beyond_its_step_limit(monkeypatch):
    # an offloaded basis of a run of at most 7 steps stores at most 7 rows: its blocks allocated ahead stop there
    # (a block allocated beside the run's last pass stalls that pass's copies from page-locked rows)
    import importlib

    from geomprobe.linalg import krylov_basis
    lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")
    made = []
    init = krylov_basis.LanczosBasis.__init__

    def basis_init(self, *a, **k):
        made.append(k.get("rows_limit"))
        init(self, *a, **k)

    monkeypatch.setattr(krylov_basis.LanczosBasis, "__init__", basis_init)
    H = torch.diag(torch.linspace(-1, 2, 50, dtype=torch.float64))
    lanczos_module.lanczos(lambda v: H @ v, 50, max_iter=7, tol=1e-12, dtype=torch.float64)
    assert made == [7]
    # and an offloaded basis (page-locked rows for a CUDA run; nothing is allocated here) caps its blocks ahead
    seen = []
    monkeypatch.setattr(krylov_basis, "PinnedAhead", lambda dim, dtype, block, cap=None: seen.append(cap))
    krylov_basis.LanczosBasis(50, torch.float64, "cpu", compute_device="cuda", pin=True, rows_limit=7)
    krylov_basis.LanczosBasis(50, torch.float64, "cpu", compute_device="cuda", pin=True, capacity=5, rows_limit=7)
    assert seen == [7, 5]
