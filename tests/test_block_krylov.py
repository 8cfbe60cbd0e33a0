"""Block Lanczos on matrices with known spectra: values within their bounds, like single-vector Lanczos."""

import pytest
import torch

from geomprobe import ConfigurationError, linalg
from geomprobe.linalg.block_lanczos import block_lanczos


def sym_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


EIGS = torch.cat([torch.tensor([-2.0], dtype=torch.float64), torch.linspace(0.0, 1.0, 196, dtype=torch.float64),
                  torch.tensor([1.3, 1.6, 4.0], dtype=torch.float64)])


@pytest.mark.parametrize("block", [2, 4, 8])
def test_extremes_within_their_bounds(block):
    A = sym_with_spectrum(EIGS, seed=1)
    r = block_lanczos(lambda V: V @ A, 200, block=block, k=2, tol=1e-8)
    assert r.converged and r.matvecs % block == 0
    top, top_err = r.top(2)
    bot, bot_err = r.bottom(1)
    for got, err, want in zip(top + bot, top_err + bot_err, [4.0, 1.6, -2.0]):
        assert abs(got - want) <= err * (1 + 1e-9) + 1e-12
        assert abs(got - want) <= 1e-7


def test_block_of_one_is_single_vector_lanczos():
    A = sym_with_spectrum(EIGS, seed=2)
    g = lambda: torch.Generator().manual_seed(5)
    one = block_lanczos(lambda V: V @ A, 200, block=1, tol=1e-6, generator=g())
    # block Lanczos stops on residual bounds alone: compare with the single-vector run without its certificate
    ref = linalg.lanczos(lambda v: v @ A, 200, tol=1e-6, generator=g(), risk=None)
    assert one.matvecs == ref.matvecs
    assert torch.allclose(one.ritz_values, ref.ritz_values, rtol=0, atol=1e-9)


def test_an_exhausted_space_is_exact():
    A = sym_with_spectrum(torch.linspace(1.0, 3.0, 12), seed=3)
    r = block_lanczos(lambda V: V @ A, 12, block=5, tol=0.0, max_iter=100)
    assert r.converged and r.matvecs <= 15
    assert r.top(1)[0][0] == pytest.approx(3.0, abs=1e-12) and r.bottom(1)[0][0] == pytest.approx(1.0, abs=1e-12)


def test_bad_input_is_refused():
    with pytest.raises(ConfigurationError, match="block >= 1"):
        block_lanczos(lambda V: V, 10, block=0)
    with pytest.raises(ConfigurationError, match="which must be"):
        block_lanczos(lambda V: V, 10, which="middle")
    with pytest.raises(FloatingPointError, match="non-finite"):
        block_lanczos(lambda V: V * float("nan"), 10, block=2)
