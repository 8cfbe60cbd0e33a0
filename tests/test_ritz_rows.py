"""Ritz vectors written into a spent basis's own rows (``LanczosResult.take_ritz_vectors``): the same unit
vectors as a fresh copy, against a diagonal matrix whose eigenvectors are coordinate vectors, with no fresh host
memory where a block holds them; and warm starts that keep host vectors without copying them."""

import sys

import pytest
import torch

from geomprobe import ConfigurationError, linalg
from geomprobe.linalg import ritz
from geomprobe.linalg.ritz import spent_rows
from geomprobe.probe.warm_start import WarmStart

D = 200_000  # several column chunks of the host rotation, so writing into its own input rows is exercised


def diagonal_run():
    # outliers at both ends of a bulk: the extreme eigenvectors are the coordinate vectors e_7 (top) and e_11
    order = torch.randperm(D, generator=torch.Generator().manual_seed(1))
    eig = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)[order]
    eig[7], eig[11], eig[5] = 10.0, -6.0, 8.0
    r = linalg.lanczos(lambda v: v * eig, D, k=1, tol=1e-8, max_iter=60, keep_basis=True,
                       generator=torch.Generator().manual_seed(0))
    assert r.converged
    return r


def own_rows(blocks):
    # every row a block of its own (the layout of an offloaded basis whose rows exceed a page-locked block)
    return [B[i : i + 1].clone() for B in blocks for i in range(B.shape[0])]


def test_single_row_blocks_take_the_vectors_in_place_and_equal_the_formed_ones():
    r = diagonal_run()
    n = len(r.ritz_values)
    want = r.ritz_vectors([n - 1, n - 2, 0])
    r.basis_blocks = own_rows(r.basis_blocks)
    storages = {B.untyped_storage().data_ptr() for B in r.basis_blocks}
    top, pair, bottom = r.take_ritz_vectors([[n - 1], [n - 1, n - 2], [0]])
    assert r.basis_blocks is None  # released: a second use is refused with the fix
    with pytest.raises(ConfigurationError, match="keep_basis=True"):
        r.take_ritz_vectors([[0]])
    assert top.shape == (1, D) and pair.shape == (2, D) and bottom.shape == (1, D)
    # one-row groups went into the basis's rows; the two-row group fits no one-row block: fresh memory
    assert top.untyped_storage().data_ptr() in storages and bottom.untyped_storage().data_ptr() in storages
    assert top.untyped_storage().data_ptr() != bottom.untyped_storage().data_ptr()
    assert pair.untyped_storage().data_ptr() not in storages
    for got, ref in ((top[0], want[0]), (pair[0], want[0]), (pair[1], want[1]), (bottom[0], want[2])):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert abs(float(top[0, 7])) > 1 - 1e-8 and abs(float(bottom[0, 11])) > 1 - 1e-8
    assert abs(float(pair[1, 5])) > 1 - 1e-6
    assert float(top[0].norm()) == pytest.approx(1.0, abs=1e-12)


def test_page_locked_blocks_take_several_groups_rows_that_are_also_the_inputs(monkeypatch):
    # a page-locked block holds any group that fits in its unclaimed rows (torch keeps such blocks cached, so a
    # whole block held for a few rows costs nothing); the rows written are rows the rotation also reads
    r = diagonal_run()
    n = len(r.ritz_values)
    want = r.ritz_vectors([n - 1, n - 2, 0])
    monkeypatch.setattr(ritz, "_pinned", lambda t: True)
    first = r.basis_blocks[0]
    assert first.shape[0] >= 3
    top, bottom = r.take_ritz_vectors([[n - 1, n - 2], [0]])
    ptr, row = first.untyped_storage().data_ptr(), D * first.element_size()
    assert top.data_ptr() == ptr and bottom.data_ptr() == ptr + 2 * row  # rows 0-1 and 2 of the first block
    torch.testing.assert_close(top, want[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(bottom, want[2:], rtol=0, atol=1e-12)


def test_pageable_rows_are_taken_only_where_the_view_is_the_whole_storage():
    big = torch.zeros(16, 10)
    alone = torch.zeros(1, 10)
    got = spent_rows([big[:1], alone, big[1:3]], [1, 1, 2, 0])
    # the first filled row of a 16-row block would hold all 16 rows; the one-row block is its own storage; a
    # 2-row view of the larger block is refused too; an empty group takes nothing
    assert got[0].data_ptr() == alone.data_ptr() and got[1] is None and got[2] is None and got[3] is None


def test_warm_start_keeps_host_vectors_without_copying_them():
    class Land:
        model = torch.nn.Linear(2, 2)
        params = list(model.parameters())
        param_names = ["weight", "bias"]
        dim, dtype = 6, torch.float32

    land = Land()
    warm = WarmStart(max_vectors=2)
    tops = [torch.nn.functional.normalize(torch.randn(1, 6), dim=1) for _ in range(3)]
    bottoms = [torch.nn.functional.normalize(torch.randn(1, 6), dim=1) for _ in range(3)]
    for t, b in zip(tops, bottoms):
        warm.keep(land, t, b)
    assert warm.top.data_ptr() == tops[-1].data_ptr() and warm.bottom.data_ptr() == bottoms[-1].data_ptr()
    assert warm.previous["top"].data_ptr() == tops[-2].data_ptr()  # the last probe's vector, not a copy
    # a few rows of a larger pageable tensor are copied out (a view would hold the rest)
    many = torch.nn.functional.normalize(torch.randn(5, 6), dim=1)
    warm.keep(land, many, many)
    assert warm.top.data_ptr() != many.data_ptr() and torch.equal(warm.top, many[:1])


def _offloaded_diagonal_run(lean: bool = False):
    """Lanczos on the GPU for a diagonal matrix with outliers at 7 (10) and 11 (-6), its basis in host memory."""
    eig = torch.linspace(-1.0, 1.0, D, dtype=torch.float32, device="cuda")
    eig[7], eig[11] = 10.0, -6.0
    return linalg.lanczos(lambda v: v * eig, D, k=1, tol=1e-6, dtype=torch.float32, device="cuda",
                          basis_device="cpu", keep_basis=True, lean=lean, generator=torch.Generator().manual_seed(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_offloaded_run_takes_its_vectors_into_its_page_locked_rows():
    r = _offloaded_diagonal_run()
    n = len(r.ritz_values)
    want = r.ritz_vectors([n - 1, 0])
    storages = {B.untyped_storage().data_ptr() for B in r.basis_blocks}
    assert r.basis_blocks[0].is_pinned()
    top, bottom = r.take_ritz_vectors([[n - 1], [0]])
    assert top.is_pinned() and top.untyped_storage().data_ptr() in storages
    torch.testing.assert_close(torch.cat([top, bottom]), want, rtol=0, atol=1e-6)
    assert abs(float(top[0, 7])) > 1 - 1e-4 and abs(float(bottom[0, 11])) > 1 - 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_lean_run_forms_its_ritz_vectors_whole_in_the_room_its_working_vectors_left():
    r = _offloaded_diagonal_run(lean=True)
    assert r.work_room_bytes == 3 * D * 4  # the step's three working vectors
    n = len(r.ritz_values)
    want = r.ritz_vectors([n - 1, 0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    top, bottom = r.take_ritz_vectors([[n - 1], [0]])
    peak = torch.cuda.max_memory_allocated() - base
    assert top.is_pinned() and bottom.is_pinned()
    torch.testing.assert_close(torch.cat([top, bottom]), want, rtol=0, atol=1e-6)
    assert float(top[0].norm()) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(top[0, 7])) > 1 - 1e-4 and abs(float(bottom[0, 11])) > 1 - 1e-4
    assert 2 * D * 4 <= peak <= 3 * D * 4 + 2**20  # the two accumulators, a row's slice and a rounded slice


def test_a_spectrum_keeps_one_copy_of_its_ritz_vectors_for_the_warm_start_and_the_views():
    # the warm start and the recorded Ritz pairs (the direction metric, the views) share the vectors the run
    # handed over: no second host copy of each d-vector at the end of every spectrum
    from reference import TanhMLP, dense_hessian

    import geomprobe as gp
    from geomprobe.metrics import spectrum
    from geomprobe.metrics.ritz_vectors import extreme_ritz

    torch.manual_seed(0)
    model = TanhMLP().double()
    X, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    loss_fn = torch.nn.CrossEntropyLoss()
    land = gp.Landscape(model, loss_fn, (X, y))
    warm = WarmStart()
    out = spectrum(land, tol=1e-8, warm=warm)
    top = extreme_ritz(land, "top")  # the recorded pair: no HVP
    assert warm.top.data_ptr() == top.vectors.data_ptr()
    assert top.values[0] == pytest.approx(out["lambda_max"], rel=1e-12)
    # and it is the top eigenvector of the dense float64 Hessian, to the run's bound
    evals, evecs = torch.linalg.eigh(dense_hessian(model, loss_fn, [(X, y)]))
    assert top.values[0] == pytest.approx(float(evals[-1]), rel=1e-8)
    assert abs(float(top.vectors[0] @ evecs[:, -1])) == pytest.approx(1.0, abs=1e-6)


def test_offered_host_tensors_take_the_groups_no_block_takes():
    r = diagonal_run()
    n = len(r.ritz_values)
    want = r.ritz_vectors([n - 1, 0])
    top_out, wrong = torch.empty(1, D, dtype=torch.float64), torch.empty(1, D, dtype=torch.float32)
    top, bottom = r.take_ritz_vectors([[n - 1], [0]], out=[top_out, wrong])
    assert top.data_ptr() == top_out.data_ptr()  # written where offered
    assert bottom.data_ptr() != wrong.data_ptr() and bottom.dtype == torch.float64  # the wrong type: fresh memory
    torch.testing.assert_close(torch.cat([top, bottom]), want, rtol=0, atol=1e-12)
    r = diagonal_run()
    with pytest.raises(ConfigurationError, match="one tensor \\(or None\\) per group"):
        r.take_ritz_vectors([[0], [1]], out=[None])


def test_blocks_populated_ahead_only_where_a_thread_runs_beside_the_caller(monkeypatch):
    from geomprobe.linalg import host_blocks

    monkeypatch.setattr(host_blocks, "MAP_BYTES", 1 << 12)
    monkeypatch.setattr(host_blocks, "PREFETCH", False)
    assert host_blocks.populated_ahead(2, 4096, torch.float32) is None  # nothing beside the caller: fresh later
    monkeypatch.setattr(host_blocks, "PREFETCH", True)
    faulted: list[tuple[int, int]] = []
    monkeypatch.setattr(host_blocks, "populate", lambda t: faulted.append((t.data_ptr(), t.numel())) or True)
    block = host_blocks.populated_ahead(2, 4096, torch.float32)
    assert block is not None and block.shape == (2, 4096) and block.dtype == torch.float32
    assert host_blocks.populated_ahead(1, 16, torch.float32) is None  # below MAP_BYTES: a fresh tensor is as cheap
    host_blocks._WORKER.flush()
    assert faulted == [(block.data_ptr(), 2 * 4096)]  # the whole block, once, on the background thread


def test_a_host_spectrum_writes_its_ritz_vectors_into_blocks_populated_during_the_run(monkeypatch):
    from reference import TanhMLP

    import geomprobe as gp
    from geomprobe.linalg import host_blocks
    from geomprobe.metrics.spectrum import spectrum

    spectrum_module = sys.modules["geomprobe.metrics.spectrum"]  # the package exports the function by that name

    monkeypatch.setattr(host_blocks, "MAP_BYTES", 1)
    monkeypatch.setattr(host_blocks, "PREFETCH", True)
    made = []

    def recording(rows, dim, dtype):
        block = host_blocks.populated_ahead(rows, dim, dtype)
        made.append(block)
        return block

    monkeypatch.setattr(spectrum_module, "populated_ahead", recording)
    torch.manual_seed(0)
    land = gp.Landscape(TanhMLP().double(), torch.nn.CrossEntropyLoss(),
                        (torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))))
    warm = WarmStart()
    out = spectrum(land, tol=1e-8, warm=warm)
    assert len(made) == 2 and all(b is not None for b in made)  # allocated before the run, one per end
    assert warm.top.data_ptr() == made[0].data_ptr() and warm.bottom.data_ptr() == made[1].data_ptr()
    assert float(warm.top[0].norm()) == pytest.approx(1.0, abs=1e-12)
    assert out["converged"]


@pytest.mark.parametrize("whole", [None, "acc", "own"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_streamed_ritz_vectors_into_host_rows_go_a_slice_of_columns_at_a_time(dtype, whole, monkeypatch):
    # the offloaded run's pass into host targets, here with the CPU as the "device": slices of 30,000 columns
    # (a ragged last one), the same vectors as the host's pass, also when the targets are the basis's own rows;
    # whole: the accumulators whole on the "device", divided there and copied out once (a lean run's room), or
    # the vectors whole in their own type beside one slice's accumulators
    monkeypatch.setattr(ritz, "RITZ_COLUMNS", 30_000)
    whole = {None: None, "acc": ritz.accumulation_dtype(dtype), "own": dtype}[whole]
    r = diagonal_run()
    n = len(r.ritz_values)
    blocks = [B.to(dtype) for B in own_rows(r.basis_blocks)]
    Uk = r.U[:, [n - 1, 0]]
    want = ritz.form_ritz_vectors([B.double() for B in blocks], Uk)
    fresh = [torch.empty(1, D, dtype=dtype), torch.empty(1, D, dtype=dtype)]
    ritz._streamed_ritz_into(blocks, Uk, torch.device("cpu"), fresh, whole=whole)
    # one rounding of the sum to the type and one of the quotient
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(torch.cat(fresh).double(), want, rtol=0, atol=tol)
    own = [blocks[0], blocks[1]]  # written in place: each slice is read by every row before it is written
    ritz._streamed_ritz_into(blocks, Uk, torch.device("cpu"), own, whole=whole)
    torch.testing.assert_close(torch.cat(own).double(), want, rtol=0, atol=tol)
    assert abs(float(own[0][0, 7])) > 1 - 1e-2 and abs(float(own[1][0, 11])) > 1 - 1e-2


def test_ritz_vectors_are_held_whole_in_the_widest_type_their_room_holds():
    d = 16 * ritz.RITZ_COLUMNS  # the 1B models' length (no tensor is made)
    cols = ritz.RITZ_COLUMNS
    # float32 accumulators where two fit; else a half type's own, beside one slice of accumulators; else slices
    assert ritz.whole_room(2, d, torch.bfloat16, 2 * d * 4) == torch.float32
    assert ritz.whole_room(2, d, torch.bfloat16, 2 * d * 4 - 1) == torch.bfloat16
    assert ritz.whole_room(2, d, torch.bfloat16, 2 * (2 * d + 4 * cols)) == torch.bfloat16
    assert ritz.whole_room(2, d, torch.bfloat16, 2 * (2 * d + 4 * cols) - 1) is None
    assert ritz.whole_room(2, d, torch.float32, 2 * d * 4 - 1) is None  # no narrower type to hold them in
    assert ritz.whole_room(1, d, torch.float64, d * 8) == torch.float64
    assert ritz.whole_room(2, d, torch.float32, 0) is None

