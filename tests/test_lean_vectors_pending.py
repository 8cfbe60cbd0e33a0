"""A streamed input's row handed to the product while its copy from the device may still run
(linalg/lean_vectors.py): the reader that takes its event reads the values the copy writes, and the host does not
wait for the copy before the product."""

from __future__ import annotations

import pytest
import torch

from geomprobe.linalg.lean_vectors import LeanVectors, take_pending


def test_take_pending_knows_nothing_of_other_tensors():
    assert take_pending(torch.zeros(4)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_pending_row_is_read_after_its_copy_without_the_host_waiting():
    d = 1 << 26  # 256 MB of float32: a copy of several milliseconds
    lean = LeanVectors(d, torch.float32, "cuda", side_stream=True, mode="streamed")
    row = torch.zeros(d, dtype=torch.float32, pin_memory=True)
    for trial in range(3):
        v = torch.full((d,), float(trial + 1), device="cuda")
        lean.pair[0] = v
        lean.store(row, v, non_blocking=True)
        got = lean.input_for(v, row)
        assert got is row and v.untyped_storage().nbytes() == 0  # given back during the product
        ready = take_pending(row)
        assert ready is not None and take_pending(row) is None  # taken once
        # the reader's copy, ordered after the row's write on the device: the new values, never the old ones
        torch.cuda.current_stream().wait_event(ready)
        back = row.to("cuda", non_blocking=True)
        assert float(back.min()) == float(back.max()) == trial + 1
    lean.release()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_pageable_row_makes_the_host_wait():
    d = 1 << 20
    lean = LeanVectors(d, torch.float32, "cuda", side_stream=True, mode="streamed")
    row = torch.zeros(d, dtype=torch.float32)  # pageable: read by the host when copied
    v = torch.full((d,), 3.0, device="cuda")
    lean.pair[0] = v
    lean.store(row, v, non_blocking=True)
    lean.input_for(v, row)
    assert take_pending(row) is None and float(row.min()) == 3.0
    lean.release()
