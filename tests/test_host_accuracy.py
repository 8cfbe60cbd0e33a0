"""Inner products and norms of host (CPU) vectors are summed pairwise (linalg/host_arith.py ``chunk_dot``,
linalg/vectors.py ``vector_norm``): on vectors whose mass sits in a few entries, as Lanczos vectors along a
converged outlier do, sums in order (BLAS ``dot``, ``mv``, ``torch.linalg.vector_norm``) were 1e-5-1e-4 off in
float32, which Lanczos read as its matvec's asymmetry and answered with a whole-basis pass at every step."""

from __future__ import annotations

import torch

from geomprobe.linalg import host_arith as ha
from geomprobe.linalg.host_fused import host_combine, host_project
from geomprobe.linalg.lanczos import lanczos
from geomprobe.linalg.vectors import row_dots, vector_norm

U32 = 2**-24  # float32's unit roundoff


def _spiky(n: int, seed: int) -> torch.Tensor:
    """A float32 vector of n entries with 0.9 of its norm in its first entry, the rest spread thin."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * (0.44 / n**0.5)
    x[0] = 0.9
    return x


def test_norms_and_dots_of_spiky_vectors_are_accurate_to_a_few_roundoffs():
    n = 700_000
    x, y = _spiky(n, 0), _spiky(n, 1)
    B = torch.stack([x, y])
    exact_dots = B.double() @ y.double()
    exact_nsq = float(y.double().square().sum())
    dots, nsq = ha.lanczos_pass(y.clone(), [B], dots=True, norm=True)
    # summed in order these were 1.5e-6 (mv) and 2.9e-5 (dot) of ||y||^2 off: 25-500 roundoffs
    assert float((dots - exact_dots).abs().max()) <= 20 * U32 * exact_nsq
    assert abs(float(nsq) - exact_nsq) <= 20 * U32 * exact_nsq
    assert abs(float(ha.host_norm_sq(y)) - exact_nsq) <= 20 * U32 * exact_nsq
    # the generic row products on the CPU too (Ritz vectors kept by selective orthogonalization, sharded norms)
    got = row_dots(B, y)
    assert got.dtype == torch.float32 and float((got.double() - exact_dots).abs().max()) <= 20 * U32 * exact_nsq
    # the fused passes of the host loop too (their norms and products)
    z, u = torch.zeros(n), torch.zeros(n)
    got = host_project(y, [B[:1]], torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), z, u)
    assert abs(got - exact_nsq) <= 20 * U32 * exact_nsq
    out = torch.empty(n)
    pre = host_combine(out, [(y, 1.0), (x, 0.0)], before=[(0, 1)], after=[-1])
    assert abs(float(pre[0]) - float(exact_dots[0])) <= 20 * U32 * exact_nsq
    assert abs(float(pre[1]) - exact_nsq) <= 20 * U32 * exact_nsq


def test_the_norm_of_a_large_float32_host_vector_is_accurate():
    x = torch.randn(4_000_000, generator=torch.Generator().manual_seed(2))
    exact = float(x.double().norm())
    # torch.linalg.vector_norm: 3.6e-4 off at 5e7 entries, summing squares of similar size in order
    assert abs(float(vector_norm(x)) - exact) <= 10 * U32 * exact
    assert vector_norm(x).dtype == torch.float32


def test_an_exactly_symmetric_float32_product_is_not_taken_for_asymmetric():
    # a diagonal with two outliers: its product is exactly symmetric in floating point; the coupling Lanczos
    # measures ((H v_j)^T v_{j-1} against beta_{j-1}) differs only by the inner products' and norms' rounding
    d = 1_000_000
    g = torch.Generator().manual_seed(0)
    diag = torch.cat([torch.tensor([8.0, 6.0]), torch.rand(d - 2, generator=g) * 2 - 1])
    r = lanczos(lambda v: diag * v, d, k=1, tol=0, max_iter=20, dtype=torch.float32, device="cpu",
                generator=torch.Generator().manual_seed(1))
    # summed in order: 2.8e-5 here, 4.8e-5 at 1e7 entries and 3.7e-4 at 5e7 (whole-basis from step 4)
    assert r.asymmetry < 2e-7
    assert "asymmetry" not in r.reorth_regime and r.reorthogonalizations <= 6
    assert abs(float(r.ritz_values[-1]) - 8.0) < 1e-5


def test_chunk_norm_sq_by_row_norms_matches_the_exact_square_norm():
    # row norms of NORM_ROW entries (in order within a row, pairwise over rows) and the tail's products
    out = torch.empty(())
    for n in (ha.NORM_ROW - 1, ha.NORM_ROW, 5 * ha.NORM_ROW + 17, 1_000_003):
        x = _spiky(n, n)
        exact = float(x.double().square().sum())
        assert abs(float(ha.chunk_norm_sq(x, out)) - exact) <= 20 * U32 * exact, n
    # similar entries, many of them: where a sum in order drifts (3.6e-4 at 5e7 entries)
    x = torch.rand(3_000_000, generator=torch.Generator().manual_seed(3))
    exact = float(x.double().square().sum())
    assert abs(float(ha.chunk_norm_sq(x, out)) - exact) <= 20 * U32 * exact
    # a strided chunk takes the pairwise product instead; float64 keeps float64
    y = torch.randn(2 * 4096, generator=torch.Generator().manual_seed(4))[::2]
    exact = float(y.double().square().sum())
    assert abs(float(ha.chunk_norm_sq(y, out)) - exact) <= 20 * U32 * exact
    z = torch.randn(4097, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    o64 = torch.empty((), dtype=torch.float64)
    assert abs(float(ha.chunk_norm_sq(z, o64)) - float(z.square().sum())) <= 1e-13 * float(z.square().sum())
