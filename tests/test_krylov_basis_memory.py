"""Where a host-resident Lanczos basis lives: page-locked blocks of bounded size, pageable when refused."""

import torch

from geomprobe.linalg.krylov_basis import LanczosBasis


def test_offloaded_blocks_are_bounded_and_a_refused_pin_falls_back_to_pageable(monkeypatch):
    monkeypatch.setattr(LanczosBasis, "PIN_BLOCK_BYTES", 3 * 1000 * 4)  # three float32 rows of 1000
    basis = LanczosBasis(1000, torch.float32, "cpu", compute_device="cuda")
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
    assert calls == [True, False, False, False]  # refused once, then pageable without asking again
    assert basis.pin is False and "out of memory" in basis.pin_refused
    assert [b.shape[0] for b in basis.blocks] == [3, 3, 3]
    assert torch.equal(basis.matrix(), rows)


def test_one_row_per_block_when_a_row_exceeds_the_bound_and_device_bases_keep_their_blocks(monkeypatch):
    monkeypatch.setattr(LanczosBasis, "PIN_BLOCK_BYTES", 100)
    assert LanczosBasis(1000, torch.bfloat16, "cpu", compute_device="cuda").block == 1
    assert LanczosBasis(1000, torch.bfloat16, "cpu").block == LanczosBasis.BLOCK  # not offloaded
    assert LanczosBasis(1000, torch.bfloat16, "cpu", capacity=5, contiguous=True).block == 5
