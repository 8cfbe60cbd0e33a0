"""Vector spaces of the Krylov kernels: sharded random vectors, reduced inner products, and Lanczos run on slices.

Two "ranks" are two threads of this process sharing a barrier-based sum, so the pure kernels are checked on
sharded vectors without torch.distributed (tests/test_fsdp.py checks the same through FSDP2 and gloo).
"""

from __future__ import annotations

import threading

import pytest
import torch

from geomprobe import ConfigurationError
from geomprobe.linalg.lanczos import lanczos
from geomprobe.linalg.space import RANDOM_CHUNK, ShardedSpace, VectorSpace, space_of
from geomprobe.linalg.vectors import default_generator


@pytest.mark.parametrize("draw", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_slice_draws_the_global_vector_restricted_to_its_ranges(draw, dtype):
    d = 2 * RANDOM_CHUNK + 123  # ranges across piece boundaries
    whole = getattr(ShardedSpace(d, [(0, d)]), draw)(default_generator(4), dtype)
    ranges = [(5, 17), (RANDOM_CHUNK - 3, RANDOM_CHUNK + 9), (d - 40, d)]
    part = getattr(ShardedSpace(d, ranges), draw)(default_generator(4), dtype)
    assert part.dtype == dtype and part.shape == (12 + 12 + 40,)
    assert torch.equal(part, torch.cat([whole[a:b] for a, b in ranges]))
    if draw == "gaussian":  # a standard normal vector, not a constant or a repeated piece
        assert abs(float(whole.double().std()) - 1.0) < 0.02 and not torch.equal(whole[:100], whole[RANDOM_CHUNK:RANDOM_CHUNK + 100])
    else:
        assert set(whole.double().unique().tolist()) == {-1.0, 1.0}


def test_each_draw_advances_the_callers_generator_by_one_number():
    g = default_generator(0)
    space = ShardedSpace(10, [(2, 6)])
    a, b = space.gaussian(g, torch.float64), space.gaussian(g, torch.float64)
    assert not torch.equal(a, b)
    ref = default_generator(0)
    torch.randint(0, 2**63 - 1, (1,), generator=ref)
    torch.randint(0, 2**63 - 1, (1,), generator=ref)
    assert torch.equal(torch.randint(0, 2**62, (3,), generator=ref), torch.randint(0, 2**62, (3,), generator=g))


def test_norms_and_inner_products_go_through_the_reduction():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    doubled = ShardedSpace(4, [(0, 2)], sum_=lambda t: t.mul_(2))  # as if the other half held the same values
    assert float(doubled.norm(w)) == pytest.approx(50**0.5, rel=1e-15)  # the squared norm is reduced, not the norm
    assert doubled.dots(B, w).tolist() == [14.0, 16.0]
    plain = VectorSpace(2)
    assert float(plain.norm(w)) == 5.0 and plain.dots(B, w).tolist() == [7.0, 8.0]


def test_bad_spaces_are_refused():
    with pytest.raises(ConfigurationError, match="ascending, disjoint"):
        ShardedSpace(10, [(4, 6), (2, 3)])
    with pytest.raises(ConfigurationError, match="ascending, disjoint"):
        ShardedSpace(10, [(8, 12)])
    with pytest.raises(ConfigurationError, match="dimension 10"):
        space_of(11, ShardedSpace(10, [(0, 10)]))
    with pytest.raises(ConfigurationError, match="v0 must have shape \\(4,\\)"):
        lanczos(lambda v: v, 10, v0=torch.ones(10, dtype=torch.float64), space=ShardedSpace(10, [(0, 4)]))


class _TwoRanks:
    """A sum over two threads: each adds its tensor, waits for the other, reads the total."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.parts: list[torch.Tensor | None] = [None, None]

    def sum_for(self, rank: int):
        def sum_(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = self.parts[0] + self.parts[1]
            self.barrier.wait()  # both have read before either writes again
            t.copy_(total)
            return t
        return sum_


def test_lanczos_on_slices_equals_the_dense_spectrum_and_both_ranks_agree():
    d = 60
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    eig = torch.cat([torch.tensor([9.0, 7.5, -3.0], dtype=torch.float64), torch.linspace(-1, 1, d - 3, dtype=torch.float64)])
    H = Q @ torch.diag(eig) @ Q.T
    ranges = [[(0, 17), (30, 41)], [(17, 30), (41, 60)]]  # interleaved slices of unequal length
    idx = [torch.cat([torch.arange(a, b) for a, b in r]) for r in ranges]
    world = _TwoRanks()
    results: list = [None, None]
    restarted: list = [None, None]

    def run(rank: int) -> None:
        space = ShardedSpace(d, ranges[rank], sum_=world.sum_for(rank))

        def matvec(v: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(d, dtype=torch.float64)
            full[idx[rank]] = v
            space.reduce(full)  # an all-gather by summation: every rank gets the whole vector
            return H[idx[rank]] @ full

        results[rank] = lanczos(matvec, d, k=2, tol=1e-10, generator=default_generator(7), space=space)
        # bounded memory on slices: thick restart with 8 stored vectors, the same reductions
        restarted[rank] = lanczos(matvec, d, k=1, tol=1e-9, generator=default_generator(7), space=space,
                                  max_basis=8, max_iter=400)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    a, b = results
    assert a is not None and b is not None and a.converged
    assert torch.equal(a.ritz_values, b.ritz_values) and a.steps == b.steps
    top, top_err = a.top(2)
    bottom, _ = a.bottom(1)
    assert top == pytest.approx([9.0, 7.5], abs=1e-9) and bottom[0] == pytest.approx(-3.0, abs=1e-9)
    assert all(e < 1e-8 for e in top_err)
    ra, rb = restarted
    assert ra.restarts > 0 and ra.converged and torch.equal(ra.ritz_values, rb.ritz_values)
    # partially after the cap too: both ranks take the same passes (each one a collective)
    assert ra.reorth_regime == rb.reorth_regime == "partial until the cap and after it (thick restart)"
    assert ra.reorthogonalizations == rb.reorthogonalizations < ra.matvecs
    assert ra.top(1)[0][0] == pytest.approx(9.0, abs=1e-8) and ra.bottom(1)[0][0] == pytest.approx(-3.0, abs=1e-8)
    # the start vector is the world-size-independent global one
    whole = lanczos(lambda v: H @ v, d, k=2, tol=1e-10, generator=default_generator(7),
                    space=ShardedSpace(d, [(0, d)]))
    assert a.steps == whole.steps and torch.allclose(a.ritz_values, whole.ritz_values, atol=1e-12)


def test_a_large_host_vector_is_drawn_by_threads_as_the_one_range_sharded_space_draws_it(monkeypatch):
    from geomprobe.linalg import space as space_mod
    from geomprobe.linalg.krylov_start import start_vector
    from geomprobe.linalg.vectors import gaussian

    monkeypatch.setattr(space_mod, "PARALLEL_DRAW_FROM", 1000)
    d = 200_003  # not a multiple of the pieces
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            drawn = VectorSpace(d).gaussian(torch.Generator().manual_seed(3), dtype)
            pieces = ShardedSpace(d, [(0, d)]).gaussian(torch.Generator().manual_seed(3), dtype)
            assert drawn.dtype == dtype and torch.equal(drawn, pieces)
        x = VectorSpace(d).gaussian(torch.Generator().manual_seed(4), torch.float64)
        # standard normal: mean within 5 standard errors of 0, variance within 5 of 1 (sd of s^2 is sqrt(2/d))
        assert abs(float(x.mean())) < 5 / d**0.5 and abs(float(x.var()) - 1) < 5 * (2 / d) ** 0.5
        q = start_vector(d, None, torch.Generator().manual_seed(3), torch.float32, "cpu")
        pieces = ShardedSpace(d, [(0, d)]).gaussian(torch.Generator().manual_seed(3), torch.float32)
        assert torch.allclose(q, pieces / pieces.norm(), rtol=0, atol=1e-7)
        torch.set_num_threads(1)  # one thread: the plain single draw, as below the threshold
        plain = VectorSpace(d).gaussian(torch.Generator().manual_seed(3), torch.float32)
        assert torch.equal(plain, gaussian(d, torch.Generator().manual_seed(3), torch.float32))
    finally:
        torch.set_num_threads(threads)
    small = VectorSpace(999).gaussian(torch.Generator().manual_seed(3), torch.float32)
    assert torch.equal(small, gaussian(999, torch.Generator().manual_seed(3), torch.float32))
