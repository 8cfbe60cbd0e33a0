"""The Gram-Schmidt update ``w -= c B`` as one block-diagonal GEMM (linalg/blockdiag.py), the CUDA path of
sub_rows for 2-22 and 300+ rows of half types, run on the CPU by forcing the block count (or by the automatic
CUDA choice with the device test stubbed): against float64 references for every dtype, row lengths no block
count divides, the 32-bit BLAS limits lowered, rows on the thresholds, and a Lanczos run's Ritz values."""

import pytest
import torch
from test_segmented_products import HALF, Householder, assert_sub, gen, residual_case
from tolerances import BF16_REL

from geomprobe.errors import ConfigurationError
from geomprobe.linalg import blockdiag as BD
from geomprobe.linalg import lanczos
from geomprobe.linalg import vectors as V
from geomprobe.linalg.krylov_basis import LanczosBasis

DTYPES = [torch.float32, *HALF]


@pytest.fixture
def calls(monkeypatch):
    """The block counts of every block-diagonal update sub_rows makes (the kernel still runs)."""
    seen = []

    def spy(w, c, B, blocks, update, width):
        seen.append(blocks)
        return BD.blockdiag_sub(w, c, B, blocks, update, width)

    monkeypatch.setattr(V, "blockdiag_sub", spy)
    return seen


@pytest.fixture
def as_on_cuda(monkeypatch):
    """sub_rows's automatic choice as on CUDA (segments chosen per device) for CPU tensors."""
    real = V._segments

    def cuda_like(B, w, segments):
        got = real(B, w, segments)
        return 0 if got is None and segments is None and V.SEGMENTS is None and _plain_layout(B, w) else got

    monkeypatch.setattr(V, "_segments", cuda_like)


def _plain_layout(B, w):
    return B.dim() == 2 and (B.shape[1] <= 1 or B.stride(1) == 1) and (w.shape[0] <= 1 or w.stride(0) == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1031), (1, 16), (1, 7), (2, 16 * 67), (7, 16 * 67), (22, 16 * 67),
                                 (23, 20 * 53), (64, 16 * 31), (300, 16 * 9)])
def test_blockdiag_sub_rows_match_float64(n, d, dtype, calls):
    # one rounding of the float32-accumulated w - c B (the same bound as the fused product), with the
    # coefficients rounded to w's type; one row takes any length (its tail by one more product)
    B, c, w, cr = residual_case(n, d, dtype)
    k = 20 if d % 16 else 16
    out = V.sub_rows(w.clone(), c, B, blocks=k)
    assert calls == [k]
    assert_sub(out, w, cr, B)


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_sum_would_fail_the_blockdiag_check(dtype, monkeypatch):
    # the check above tells float32 accumulation from a half one: the same kernel whose update rounds every
    # partial result to the half type fails it
    B, c, w, cr = residual_case(22, 16 * 67, dtype)

    def half_update(out, C, Y):
        for j in range(C.shape[1]):
            out.copy_((out.float() - C[:, j : j + 1].float() * Y[j].float()).to(out.dtype))

    monkeypatch.setattr(V, "_float32_sub_mm", half_update)
    out = V.sub_rows(w.clone(), c, B, blocks=16)
    with pytest.raises(AssertionError):
        assert_sub(out, w, cr, B)


def test_blockdiag_is_exact_bookkeeping_in_float64(calls):
    # in float64 the block-diagonal update equals w - c B to float64 rounding: a block read from the wrong row,
    # a shifted window or a lost tail would not
    for n, d, k in [(1, 5003, 16), (1, 5003, 64), (1, 15, 16), (2, 4000, 16), (5, 4000, 20), (40, 64 * 7, 64),
                    (3, 16, 16)]:
        B = torch.randn(n, d, generator=gen(n), dtype=torch.float64)
        w, c = torch.randn(d, generator=gen(n + 1), dtype=torch.float64), torch.randn(n, generator=gen(n + 2))
        out = V.sub_rows(w.clone(), c, B, blocks=k)
        assert torch.allclose(out, w - c.double() @ B, rtol=1e-12, atol=1e-12 * n), (n, d, k)
    assert calls == [16, 64, 16, 16, 20, 64, 16]


def test_coefficient_matrix_is_block_diagonal():
    c = torch.tensor([2.0, -3.0, 5.0])
    C = BD.coefficient_matrix(c, 4)
    assert C.shape == (4, 12)
    for k in range(4):
        for i in range(3):
            for kk in range(4):
                assert float(C[k, i * 4 + kk]) == (float(c[i]) if kk == k else 0.0)


def test_views_copy_nothing():
    # the GEMM works on views of w and of the basis (on CUDA they go to cuBLAS as they are)
    big, wbig = torch.randn(10, 480), torch.randn(500)
    B, w = big[2:5], wbig[7:487]  # rows back to back at an offset in their storage
    seen = []

    def update(out, C, Y):
        seen.append((out, C, Y))
        out.addmm_(C, Y, alpha=-1)

    BD.blockdiag_sub(w, torch.ones(3), B, 16, update, width=10**6)
    ((out, C, Y),) = seen
    assert out.data_ptr() == w.data_ptr() and Y.data_ptr() == B.data_ptr()
    assert out.shape == (16, 30) and out.stride() == (30, 1) and Y.shape == (48, 30) and Y.stride() == (30, 1)
    assert C.shape == (16, 48)
    # windows of the block columns when one product may not take them all
    seen.clear()
    BD.blockdiag_sub(w, torch.ones(3), B, 16, update, width=7)
    assert [o.shape[1] for o, _, _ in seen] == [7, 7, 7, 7, 2]
    assert all(o.stride() == (30, 1) and y.stride() == (30, 1) for o, _, y in seen)


def test_storage_around_the_views_is_untouched():
    d = 16 * 50
    big = torch.randn(8, d, generator=gen(1)).to(torch.bfloat16)
    wb = torch.randn(d + 9, generator=gen(2)).to(torch.bfloat16)
    c = torch.randn(3, generator=gen(3))
    before = wb.clone()
    V.sub_rows(wb[4 : 4 + d], c, big[2:5], blocks=16)
    assert torch.equal(wb[:4], before[:4]) and torch.equal(wb[4 + d :], before[4 + d :])
    assert_sub(wb[4 : 4 + d], before[4 : 4 + d], c.to(torch.bfloat16).double(), big[2:5])


def test_layouts_without_the_block_form_take_the_other_paths(calls):
    # several rows whose length no count divides, or rows with gaps between them: no block-diagonal view, so a
    # forced count falls back to the plain update (same numbers); one row takes any length
    d = 1001
    big = torch.randn(6, 2 * d, generator=gen(4), dtype=torch.float64)
    c, w = torch.randn(3, generator=gen(5), dtype=torch.float64), torch.randn(d, generator=gen(6), dtype=torch.float64)
    for B in (big[:3, :d].contiguous(), big[:3, :d], big[::2, :d]):
        out = V.sub_rows(w.clone(), c, B, blocks=16)
        assert torch.allclose(out, w - c @ B, rtol=1e-12, atol=1e-12)
    assert calls == []
    V.sub_rows(w.clone(), c[:1], big[:1, :d], blocks=16)
    assert calls == [16]
    assert not BD.blockdiag_layout(big[:3, :d], w, 7) and BD.blockdiag_layout(big[:1, :d], w, 16)


def test_block_count_rule():
    assert BD.block_count(16 * 7_777_488, 2**31 - 1) == 16  # GPT-2 124M: 124,439,808 parameters
    assert BD.block_count(1009 * 18, 10**9) == 18  # 16 does not divide it: the smallest divisor from 16 on
    assert BD.block_count(1009 * 35, 10**9) == 35
    assert BD.block_count(1009 * 2, 10**9) is None and BD.block_count(1001, 10**9) is None
    # the largest leading dimension: 2000 = 16 x 125, 20 x 100, 25 x 80, 40 x 50, 50 x 40
    assert BD.block_count(2000, 100) == 25 and BD.block_count(2000, 50) == 50 and BD.block_count(2000, 39) is None
    assert BD.block_count(2020, 101) == 20  # 20 x 101: no aligned count fits
    # blocks whose length is a multiple of 8 (16-byte aligned half rows) where a count gives them
    assert BD.block_count(2**5 * 3**2 * 7, 10**9) == 18  # 16 leaves blocks of 126, 18 of 112
    assert BD.block_count(2**5 * 3 * 1009, 10**9) == 16  # no count gives aligned blocks: the smallest divisor
    assert BD.block_count(2**7 * 3 * 5, 10**9) == 16  # 120


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blockdiag_within_the_32_bit_limits(monkeypatch, dtype, calls, as_on_cuda):
    # the automatic choice with the limits lowered: blocks of at most LD_LIMIT entries (a larger count where 16
    # would make them longer), windows of at most PRODUCT_COLUMNS (half types on the CPU: CPU_CHUNK_ELEMENTS of
    # float32 scratch) block columns; rows farther apart than LD_LIMIT are no obstacle (their stride is never
    # a leading dimension here)
    n, d = 6, 2048
    B, c, w, cr = residual_case(n, d, dtype, seed=13)
    monkeypatch.setattr(V, "BLOCKDIAG_DTYPES", (torch.float64, torch.float32, torch.bfloat16))
    monkeypatch.setattr(V, "PRODUCT_COLUMNS", 7)
    monkeypatch.setattr(V, "CPU_CHUNK_ELEMENTS", 7 * 16 * (n + 2))
    for ld_limit, k in ((V.LD_LIMIT, 16), (100, 32), (40, 64), (31, None)):
        monkeypatch.setattr(V, "LD_LIMIT", ld_limit)
        calls.clear()
        out = V.sub_rows(w.clone(), c, B)
        assert calls == ([] if k is None else [k])
        if dtype == torch.float64:
            assert torch.allclose(out, w - c.double() @ B, rtol=1e-12, atol=1e-12)
        else:  # the fallback at LD_LIMIT 31 takes rows one at a time with the float32 coefficients as they are
            assert_sub(out, w, cr if k is not None else c.double(), B)


def test_sub_rows_kernel_follows_the_h200_measurement():
    """profile_rowdots on an H200 (d = 124M, bf16, K = 16): the block-diagonal update 0.44 / 0.77 / 1.24 / 1.76 /
    17.9 ms against 1.56 / 1.95 / 1.96 / 4.43 / 47.4 ms for the fused product at 2 / 8 / 16 / 22 / 300 rows,
    but 4.19 against 3.92 at 64 and 7.91 against 7.54 at 128; one row keeps its elementwise pass. Rows not
    measured (23-63, 129-299) and float32 keep the product."""
    rows = [0, 1, 2, 3, 8, 16, 22, 23, 47, 63, 64, 128, 299, 300, 301, 4096]
    want = ["product", "elementwise"] + ["block-diagonal"] * 5 + ["product"] * 6 + ["block-diagonal"] * 3
    for dtype in HALF:
        assert [V.sub_rows_kernel(n, dtype) for n in rows] == want
    for dtype in (torch.float32, torch.float64):
        assert [V.sub_rows_kernel(n, dtype) for n in rows] == ["product", "elementwise"] + ["product"] * 14
    for bad in (-1, 2.0):
        with pytest.raises(ValueError):
            V.sub_rows_kernel(bad, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_automatic_choice_takes_the_blockdiag_update_as_stated(dtype, calls, as_on_cuda):
    # sub_rows itself, with the device choice as on CUDA: the block-diagonal update exactly at the rows
    # sub_rows_kernel names (half types), for lengths a count from 16 to 64 divides; never on the CPU
    expected = {n for n in (1, 2, 22, 23, 64, 299, 300) if V.sub_rows_kernel(n, dtype) == "block-diagonal"}
    assert expected == ({2, 22, 300} if dtype in HALF else set())
    for d, k in ((128 * 11, 16), (18 * 11, 18), (11 * 13, None)):
        for n in (1, 2, 22, 23, 64, 299, 300):
            B, c, w, cr = residual_case(n, d, dtype, seed=n)
            calls.clear()
            out = V.sub_rows(w.clone(), c, B)
            assert calls == ([k] if n in expected and k is not None else []), (n, d)
            # the fused paths take the coefficients rounded to w's type, the CPU's plain products as they are
            assert_sub(out, w, cr if n == 1 or calls else c.double(), B)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cpu_keeps_its_products(dtype, calls):
    # the automatic choice on the CPU: the plain products (measured faster there: benchmarks/RESULTS.md)
    B, c, w, _ = residual_case(22, 16 * 67, dtype)
    V.sub_rows(w.clone(), c, B)
    assert calls == []


def test_blocks_off_and_bad_arguments(calls, as_on_cuda):
    B, c, w, _ = residual_case(8, 16 * 67, torch.bfloat16)
    V.sub_rows(w.clone(), c, B, blocks=0)  # off: the path before the block-diagonal update
    assert calls == []
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ConfigurationError, match="blocks"):
            V.sub_rows(w.clone(), c, B, blocks=bad)
    with pytest.raises(ValueError, match="rows back to back"):
        BD.blockdiag_sub(w, c, B, 7, lambda o, C, Y: None, 10)
    with pytest.raises(ValueError, match="c must have shape"):
        BD.blockdiag_sub(w, c[:3], B, 16, lambda o, C, Y: None, 10)
    with pytest.raises(ValueError, match="width"):
        BD.blockdiag_sub(w, c, B, 16, lambda o, C, Y: None, 0)
    BD.blockdiag_sub(w[:0], c[:0], B[:0, :0], 16, lambda o, C, Y: pytest.fail("nothing to do"), 10)


def test_a_non_finite_basis_entry_reaches_its_block_column():
    # as documented: 0 * inf in the zero part of C makes NaN in the other blocks' entries of the same column
    d, k = 16 * 10, 16
    B = torch.randn(3, d, generator=gen(7))
    B[1, 23] = float("inf")
    out = V.sub_rows(torch.randn(d, generator=gen(8)), torch.ones(3), B, blocks=k)
    bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
    assert bad == [23 % 10 + 10 * j for j in range(k)]


def test_lanczos_ritz_values_unchanged_by_the_blockdiag_update(monkeypatch, calls):
    # a whole Lanczos run (basis blocks of up to 16 rows) with every update block-diagonal against the plain run
    d = 20_000  # 16 divides it
    g = gen(31)
    evals = torch.cat([torch.tensor([45.0, 44.0, -45.0]), 10 * torch.randn(d - 3, generator=g)])
    H, exact = Householder(evals, torch.randn(d, generator=g)), evals.double().sort().values

    def run(blocks, dtype):
        monkeypatch.setattr(V, "BLOCKS", blocks)
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        return lanczos(lambda v: H(v.float()).to(v.dtype), d, k=2, tol=tol, max_iter=80, dtype=dtype,
                       generator=gen(5))

    want = exact[[0, 1, -2, -1]]
    for dtype in (torch.float32, torch.bfloat16):
        plain = run(None, dtype)
        calls.clear()
        bd = run(16, dtype)
        assert plain.converged and bd.converged and bd.steps > LanczosBasis.BLOCK and set(calls) == {16}
        a, b = plain.ritz_values[[0, 1, -2, -1]], bd.ritz_values[[0, 1, -2, -1]]
        if dtype == torch.float32:
            assert plain.steps == bd.steps
            assert float((a - b).abs().max()) <= 1e-5 * 47.2  # float32 sums in another order
            assert torch.allclose(b, want, rtol=1e-5, atol=0)
        else:
            assert torch.allclose(b, want, rtol=BF16_REL, atol=0)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 16, 22, 23, 64, 300])
def test_cuda_blockdiag_matches_float64(n, dtype, calls):
    # the automatic CUDA path at and around the thresholds, on a length 16 divides, one only 19 divides
    # (5 x 19 x 733) and a prime one (no block count: the fused product)
    for d, k in ((1 << 17, 16), (69_635, 19), (65_537, None)):
        assert BD.block_count(d, V.LD_LIMIT) == k
        B, c, w, cr = residual_case(n, d, dtype)
        calls.clear()
        out = V.sub_rows(w.cuda(), c.cuda(), B.cuda()).cpu()
        blockdiag = V.sub_rows_kernel(n, dtype) == "block-diagonal" and k is not None and not (
            dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
        assert calls == ([k] if blockdiag else [])
        assert_sub(out, w, cr, B)  # every CUDA path takes the coefficients rounded to w's type


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_blockdiag_allocates_no_d_vector(dtype, calls):
    # views of w and B go to cuBLAS; the float32 products go through windows of at most HALF_CHUNK_ELEMENTS
    # entries (an in-place half GEMM would need none but rounds C B to the half type first), far less than the
    # float32 d-vector of the fused product
    n, d = 16, 1 << 26
    B = torch.randn(n, d, device="cuda", dtype=dtype)
    w = torch.randn(d, device="cuda", dtype=dtype)
    c = torch.randn(n, device="cuda")
    V.sub_rows(w, c, B)  # once before measuring: cuBLAS's workspace comes from the same allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    V.sub_rows(w, c, B)
    torch.cuda.synchronize()
    assert calls == [16, 16]
    assert torch.cuda.max_memory_allocated() - base <= 4 * V.HALF_CHUNK_ELEMENTS + (1 << 20) < d * 4 / 2
