"""Where a host-resident Lanczos basis lives: page-locked blocks of bounded size, pageable when refused."""

import torch

from geomprobe.linalg.krylov_basis import LanczosBasis


def test_offloaded_blocks_are_bounded_and_a_refused_pin_falls_back_to_pageable(monkeypatch):
    import geomprobe.linalg.krylov_basis as kb

    monkeypatch.setattr(LanczosBasis, "PIN_BLOCK_BYTES", 3 * 1000 * 4)  # three float32 rows of 1000
    touched = []
    monkeypatch.setattr(kb, "populate", lambda t: touched.append(t.data_ptr()) or True)
    monkeypatch.setattr(kb, "populate_wanted", lambda: True)
    monkeypatch.setattr(kb, "prefetch_wanted", lambda: False)
    basis = LanczosBasis(1000, torch.float32, "cpu", compute_device="cuda", pin=True)
    assert basis.offloaded and basis.block == 3
    calls = []
    real_empty = torch.empty

    def refusing_empty(*args, pin_memory=False, **kwargs):
        calls.append(pin_memory)
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refusing_empty)
    rows = torch.randn(7, 1000, generator=torch.Generator().manual_seed(0))
    for r in rows:
        basis.append(r)
    monkeypatch.setattr(torch, "empty", real_empty)
    # refused once, then pageable without asking again
    assert calls[0] is True and len(calls) > 3 and not any(calls[1:])
    assert basis.pin is False and "out of memory" in basis.pin_refused
    assert [b.shape[0] for b in basis.blocks] == [3, 3, 3]
    assert torch.equal(basis.matrix(), rows)
    # the pageable rows that replaced the refused ones are populated before the copies write them
    assert basis.populate_rows and touched == [basis.blocks[k // 3][k % 3].data_ptr() for k in range(7)]


def test_one_row_per_block_when_a_row_exceeds_the_bound_and_device_bases_keep_their_blocks(monkeypatch):
    monkeypatch.setattr(LanczosBasis, "PIN_BLOCK_BYTES", 100)
    assert LanczosBasis(1000, torch.bfloat16, "cpu", compute_device="cuda").block == 1
    assert LanczosBasis(1000, torch.bfloat16, "cpu").block == LanczosBasis.BLOCK  # not offloaded
    assert LanczosBasis(1000, torch.bfloat16, "cpu", capacity=5, contiguous=True).block == 5



def test_pageable_offloaded_rows_are_populated_before_the_copy_writes_them(monkeypatch):
    # page-locked by default (LanczosBasis.PIN); pageable where told, or where the driver refuses, and then each
    # fresh row is populated in one call (beside the product where a prefetcher runs) instead of being faulted
    # in page by page by the copy from the device
    import geomprobe.linalg.krylov_basis as kb

    assert LanczosBasis(1000, torch.float32, "cpu", compute_device="cuda").pin is True
    touched = []
    monkeypatch.setattr(kb, "populate", lambda t: touched.append(t.data_ptr()) or True)
    monkeypatch.setattr(kb, "populate_wanted", lambda: True)
    monkeypatch.setattr(kb, "prefetch_wanted", lambda: False)
    basis = LanczosBasis(1000, torch.float32, "cpu", compute_device="cuda", pin=False)
    assert basis.pin is False and basis.pinned is None and basis.populate_rows
    rows = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    for r in rows:
        basis.append(r)
    assert torch.equal(basis.matrix(), rows)
    assert touched == [basis.blocks[0][i].data_ptr() for i in range(3)]
    monkeypatch.setattr(LanczosBasis, "PIN", False)  # the class default, where pin is not given
    assert LanczosBasis(1000, torch.bfloat16, "cpu", compute_device="cuda").pin is False
    assert LanczosBasis(1000, torch.bfloat16, "cpu", compute_device="cuda", pin=True).pin is True
