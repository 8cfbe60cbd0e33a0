"""The Gram-Schmidt products over column segments (linalg/segmented.py), the CUDA path of row_dots and
sub_rows, run on the CPU by forcing the segment count: against float64 references for 1 to 129 rows, column
counts no segment count divides, float32/bf16/fp16, sliced and strided bases, the 32-bit BLAS limits lowered,
and a Lanczos run's Ritz values."""


import pytest
import torch
from tolerances import BF16_REL

from geomprobe.errors import ConfigurationError
from geomprobe.linalg import lanczos
from geomprobe.linalg import segmented as S
from geomprobe.linalg import vectors as V
from geomprobe.linalg.krylov_basis import LanczosBasis

ROWS = [1, 2, 7, 22, 64, 129]
HALF = [torch.bfloat16, torch.float16]
# unit roundoffs: of the accumulation (float32 for every input type here) and of each stored type
U32 = 2.0**-24
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def basis(n, d, dtype, seed=0):
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64).to(dtype)


def dots_bound(B, w):
    """|B w - fl(B w)| <= d u sum_j |B_ij w_j|: the worst case of any order of float32 summation of exact
    (half inputs) or float32-rounded (float32 inputs, one more u) products."""
    d = w.shape[0]
    return (d + 1) * U32 * (B.double().abs() @ w.double().abs())


def assert_dots(got, B, w):
    ref = B.double() @ w.double()
    assert got.dtype == V.accumulation_dtype(w.dtype) and got.shape == (B.shape[0],)
    err = (got.double() - ref).abs()
    bound = dots_bound(B, w)
    assert bool((err <= bound).all()), float((err / bound).max())


def residual_case(n, d, dtype, seed=1):
    """``w`` close to ``c B`` (what Gram-Schmidt meets: most of ``w`` is removed), so the result is small and
    a sum kept in the half type instead of float32 would miss it by many of its ulps."""
    B = basis(n, d, dtype, seed)
    c = torch.randn(n, generator=gen(seed + 1), dtype=torch.float64).to(torch.float32)
    cr = c.to(dtype).double()  # the fused paths take the coefficients in w's type
    small = 1e-2 * torch.randn(d, generator=gen(seed + 2), dtype=torch.float64)
    w = (cr @ B.double() + small).to(dtype)
    return B, c, w, cr


def assert_sub(out, w, cr, B):
    """One rounding of the float32-accumulated ``w - c B``: within half a unit of the stored type of the
    exact result, plus the float32 sum's own error over ``n + 1`` terms."""
    exact = w.double() - cr @ B.double()
    u = UNIT[w.dtype]
    terms = w.double().abs() + cr.abs() @ B.double().abs()
    bound = u * exact.abs() + (B.shape[0] + 2) * U32 * terms * (1 + u)
    # the smallest subnormal spacing of the type: a result that rounds to zero or a subnormal
    bound = bound + torch.finfo(w.dtype).smallest_normal * u
    err = (out.double() - exact).abs()
    assert out.dtype == w.dtype
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("n", ROWS)
def test_segmented_row_dots_match_float64(n, dtype):
    d = 4099  # prime: no segment count divides it, so every product has a tail
    B, w = basis(n, d, dtype), torch.randn(d, generator=gen(9), dtype=torch.float64).to(dtype)
    for s in (2, 16, 1000, 4099, 10_000):  # up to one column per segment, and more segments than columns
        assert_dots(V.row_dots(B, w, segments=s), B, w)
    assert_dots(V.row_dots(B, w), B, w)  # the CPU's own path


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("n", ROWS)
def test_segmented_sub_rows_match_float64(n, dtype):
    d = 1031
    B, c, w, cr = residual_case(n, d, dtype)
    for s in (3, 64, 1031):
        out = V.sub_rows(w.clone(), c, B, segments=s)
        assert_sub(out, w, cr, B)


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_sum_would_fail_the_sub_rows_check(dtype):
    # the check above can tell float32 accumulation from accumulation in the half type
    B, _, w, cr = residual_case(22, 1031, dtype)
    out = w.clone()
    for i in range(B.shape[0]):
        out = (out.double() - cr[i] * B[i].double()).to(dtype)
    with pytest.raises(AssertionError):
        assert_sub(out, w, cr, B)


def test_segmentation_is_exact_bookkeeping_in_float64():
    # in float64 the segmented products equal the plain ones to float64 rounding: a lost, doubled or shifted
    # segment or tail would not
    d = 5003
    for n in (1, 5, 40):
        B, w = basis(n, d, torch.float64, n), torch.randn(d, generator=gen(n + 7), dtype=torch.float64)
        c = torch.randn(n, generator=gen(n + 8), dtype=torch.float64)
        for s in (1, 7, 64, 5003):
            assert torch.allclose(V.row_dots(B, w, segments=s), B @ w, rtol=1e-12, atol=1e-12 * d)
            assert torch.allclose(V.sub_rows(w.clone(), c, B, segments=s), w - c @ B, rtol=1e-12, atol=1e-12 * n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_and_strided_bases(dtype):
    d = 2053
    big = basis(40, 3 * d, dtype, 3)
    wbig = torch.randn(3 * d + 5, generator=gen(4), dtype=torch.float64).to(dtype)
    c = torch.randn(20, generator=gen(5))
    w = wbig[5 : 5 + d]  # a vector at an offset in its storage
    cases = {
        "every other row, a column window": big[::2, 7 : 7 + d],
        "one row, offset": big[3:4, d : 2 * d],
        "transposed storage": big[:, :d].T.contiguous().T[:20],  # column stride != 1: the plain path
    }
    for B in cases.values():
        n = B.shape[0]
        assert_dots(V.row_dots(B, w, segments=9), B, w)
        out = V.sub_rows(w.clone(), c[:n], B, segments=9)
        assert_sub(out, w, c[:n].to(dtype).double() if B.stride(1) == 1 else c[:n].double(), B)
    # a strided vector: the plain path, same numbers
    ws = wbig[: 2 * d : 2]
    B = big[:4, :d]
    assert_dots(V.row_dots(B, ws, segments=9), B, ws)
    # the untouched storage around a sliced vector stays as it was
    wb = wbig.clone()
    V.sub_rows(wb[5 : 5 + d], c[:4], big[:4, :d], segments=9)
    assert torch.equal(wb[:5], wbig[:5])


def test_views_copy_nothing():
    # the segmented views share the basis' and the vector's memory (on CUDA they go to cuBLAS as they are)
    B, w = basis(5, 1000, torch.float32)[:, 3:990], torch.randn(987)
    seen = []

    def bmm(X, Y):
        seen.append((X, Y))
        return torch.bmm(X, Y)

    S.segmented_dots(B, w, 10, bmm)
    (X, Y), (Xt, Yt) = seen  # the segments, then the 7 columns left over
    assert X.data_ptr() == B.data_ptr() and Y.data_ptr() == w.data_ptr()
    assert X.stride() == (98, 1000, 1) and Y.stride() == (98, 1, 98)
    assert X.shape == (10, 5, 98) and Y.shape == (10, 98, 1)
    assert Xt.shape == (1, 5, 7) and Xt.data_ptr() == B[:, 980:].data_ptr() and Yt.data_ptr() == w[980:].data_ptr()


def test_bad_segment_arguments():
    B, w = basis(3, 100, torch.float32), torch.randn(100)
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ConfigurationError, match="segments"):
            V.row_dots(B, w, segments=bad)
    with pytest.raises(ValueError, match="unit column strides"):
        S.segmented_dots(B.T.contiguous().T, w, 4, torch.bmm)
    with pytest.raises(ValueError, match="B \\(n, m\\)"):
        S.segmented_dots(B, w[:50], 4, torch.bmm)
    with pytest.raises(ValueError, match="c must have shape"):
        S.segmented_sub(w, torch.ones(2), B, 4, lambda o, X, Y: None)


def test_segment_count_rule():
    assert S.segment_count(1) == 1 and S.segment_count(8191) == 1
    assert S.segment_count(1 << 20) == 256
    assert S.segment_count(124_439_808) == S.SEGMENT_MAX
    assert S.segment_count(1 << 28) == S.SEGMENT_MAX


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_segmentation_within_the_32_bit_limits(monkeypatch, dtype):
    # column slices of PRODUCT_COLUMNS and rows farther apart than LD_LIMIT (one at a time), lowered so a
    # small basis crosses both: the segmented products must give the whole product to rounding
    n, d = 6, 1001
    B, c, w, cr = residual_case(n, d, dtype, seed=13)
    monkeypatch.setattr(V, "PRODUCT_COLUMNS", 97)
    for ld_limit in (V.LD_LIMIT, 100):  # 100 < d: every row of B is "too far" from the next
        monkeypatch.setattr(V, "LD_LIMIT", ld_limit)
        for s in (1, 5, 97):
            got = V.row_dots(B, w, segments=s)
            out = V.sub_rows(w.clone(), c, B, segments=s)
            if dtype == torch.float64:
                assert torch.allclose(got, B @ w, rtol=1e-12, atol=1e-12 * d)
                assert torch.allclose(out, w - c.double() @ B, rtol=1e-12, atol=1e-12)
                continue
            assert_dots(got, B, w)
            # rows taken one at a time accumulate the float32 coefficients as they are; the fused paths
            # take them rounded to w's type
            assert_sub(out, w, c.double() if ld_limit == 100 else cr, B)


class Householder:
    """``H = P diag(evals) P`` with ``P = I - 2 u u^T``: a dense symmetric matrix of known spectrum whose
    matvec costs O(d)."""

    def __init__(self, evals, u):
        self.evals, self.u = evals, u / u.norm()

    def __call__(self, v):
        p = v - 2 * (v @ self.u)[..., None] * self.u
        p = p * self.evals
        return p - 2 * (p @ self.u)[..., None] * self.u


def spectrum_case(seed):
    """A 20,011-dimensional dense operator whose extremes (two at each end, a bulk of spread 10 close below
    them) take Lanczos 30 to 45 steps: two or three blocks of basis rows."""
    d = 20_011
    g = gen(seed)
    evals = torch.cat([torch.tensor([45.0, 44.0, -45.0]), 10 * torch.randn(d - 3, generator=g)])
    return d, Householder(evals, torch.randn(d, generator=g)), evals.double().sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lanczos_ritz_values_unchanged_by_segmentation(monkeypatch, dtype):
    # the whole Lanczos run with every product segmented (the CUDA arithmetic, forced on the CPU) against the
    # plain run: float32 vectors give the same Ritz values to float32 rounding; bf16 vectors (whose fused
    # path also rounds the coefficients to bf16 on the way in) stay within bf16 Lanczos accuracy
    d, H, exact = spectrum_case(21)
    want = exact[[0, 1, -2, -1]]

    def run(segments):
        monkeypatch.setattr(V, "SEGMENTS", segments)
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        return lanczos(lambda v: H(v.float()).to(v.dtype), d, k=2, tol=tol, max_iter=80, dtype=dtype,
                       generator=gen(5))

    plain, seg = run(None), run(7)
    assert plain.converged and seg.converged and seg.steps > LanczosBasis.BLOCK  # two blocks of rows at least
    a, b = plain.ritz_values[[0, 1, -2, -1]], seg.ritz_values[[0, 1, -2, -1]]
    if dtype == torch.float32:
        assert plain.steps == seg.steps
        # the runs differ only in the order of float32 sums: relative 1e-5 of the spectral radius covers the
        # run's own rounding, where a lost segment or row would move the values by O(1)
        assert float((a - b).abs().max()) <= 1e-5 * 47.2
        assert torch.allclose(b, want, rtol=1e-5, atol=0)
    else:
        assert torch.allclose(a, want, rtol=BF16_REL, atol=0)
        assert torch.allclose(b, want, rtol=BF16_REL, atol=0)


def test_out_dtype_probe_falls_back():
    # a torch whose products lack ``out_dtype`` (before 2.8) is detected, and the paths that need it are not taken
    assert V._probe_out_dtype(torch.bmm, (1, 1, 1), (1, 1, 1)) is V._HAS_BMM_OUT_DTYPE
    assert V._probe_out_dtype(lambda a, b: torch.mm(a, b), (1, 1), (1, 1)) is False  # no out_dtype keyword

    def wrong_dtype(a, b, out_dtype):
        return torch.mm(a, b)  # accepts the keyword, ignores it

    assert V._probe_out_dtype(wrong_dtype, (1, 1), (1, 1)) is False


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("n", ROWS)
def test_cuda_products_match_float64(n, dtype):
    # the automatic CUDA path (segment_count segments, fused float32 accumulation, addcmul for one row) on a
    # vector long enough to be segmented, with a tail
    d = (1 << 20) + 4099
    B = basis(n, d, dtype).cuda()
    w = torch.randn(d, generator=gen(9), dtype=torch.float64).to(dtype).cuda()
    assert_dots(V.row_dots(B, w).cpu(), B.cpu(), w.cpu())
    Bc, c, wc, cr = residual_case(n, d, dtype)
    out = V.sub_rows(wc.cuda(), c.cuda(), Bc.cuda()).cpu()
    assert_sub(out, wc, cr, Bc)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_products_allocate_no_copy_of_the_basis(dtype):
    # views, not copies, go to cuBLAS: the peak during the products stays far below one basis
    n, d = 22, 1 << 24
    B = basis(n, d, dtype).cuda()[:, 5:]  # sliced rows: leading dimension d, not the row length
    w = torch.randn(d - 5, device="cuda").to(dtype)
    c = torch.randn(n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    V.row_dots(B, w)
    V.sub_rows(w, c, B)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < B.numel() * B.element_size() / 8


def test_the_automatic_choice_follows_the_h200_measurement():
    """profile_rowdots on an H200 (d = 124M, bf16): segmented row_dots 0.91 / 2.26 ms against 2.40 / 5.82 ms
    plain at 8 / 22 rows, but 0.72 against 0.47 at 2 rows and 5.84 against 3.72 at 64; the segmented update
    only wins for one row (0.50 against 3.41 ms). The automatic choice takes the faster form at each."""
    from geomprobe.linalg.vectors import auto_segmented

    assert [auto_segmented("row_dots", n) for n in (1, 2, 8, 16, 22, 64, 128)] == [
        False, False, True, True, True, False, False]
    assert [auto_segmented("sub_rows", n) for n in (1, 2, 8, 22, 64)] == [True, False, False, False, False]
    with pytest.raises(ValueError):
        auto_segmented("norm", 3)
