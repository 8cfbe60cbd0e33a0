"""diagshare: exact shares from the dense Hessian, column sampling within its interval, the baselines of
docs/metrics.md#diagshare."""

import json
import math

import numpy as np
import pytest
import torch
from quadratic_models import Quadratic, covers, dense_share, indefinite, landscape, spd
from tolerances import (
    BASELINE_ABS,
    COVERAGE_MIN,
    FLOAT64_REL,
    MC_BASELINE_ABS,
    OLS_ASYMPTOTIC_ABS,
    SIGMAS,
    WIGNER_MC_ABS,
    Z95,
)

from geomprobe import ConfigurationError, NonFiniteLossError
from geomprobe.metrics import diagshare, get
from geomprobe.metrics.diagshare import diagonal_share, ols_baseline, wigner_baseline

F64 = torch.float64


# ------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("d, n, closed", [(50, 128, 0.2244), (10, 32, 0.4406), (100, 4096, 0.4476)])
def test_ols_baseline_matches_spec_closed_form(d, n, closed):
    assert abs(ols_baseline(d, n) - closed) <= BASELINE_ABS


def test_wigner_baseline_matches_spec_closed_form():
    assert abs(wigner_baseline(100) - 0.01000) <= BASELINE_ABS
    assert wigner_baseline(1) == 1.0 and wigner_baseline(3, sigma_diag=2.0, sigma_off=1.0) == 0.5


def _share_of_mean(H: torch.Tensor) -> float:
    # delta(E|H|): the baselines are shares of the entrywise mean, a ratio of Monte Carlo means
    A = H.abs()
    return float(torch.diagonal(A, dim1=-2, dim2=-1).sum() / A.sum())


def test_ols_baseline_monte_carlo():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20_000, 32, 10, generator=g, dtype=F64)
    mc = _share_of_mean(X.transpose(1, 2) @ X / 32)
    assert abs(mc - 0.4420) <= MC_BASELINE_ABS                      # the Monte Carlo value of docs/metrics.md#diagshare
    assert abs(mc - ols_baseline(10, 32)) <= OLS_ASYMPTOTIC_ABS     # the closed form is the large-n limit


def test_wigner_baseline_monte_carlo():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 100, 100, generator=g, dtype=F64)
    W = torch.triu(X) + torch.triu(X, 1).transpose(1, 2)             # i.i.d. N(0, 1) entries, symmetric
    mc = _share_of_mean(W)
    assert abs(mc - 0.01010) <= WIGNER_MC_ABS and abs(mc - wigner_baseline(100)) <= WIGNER_MC_ABS


def test_baselines_reject_impossible_sizes():
    with pytest.raises(ConfigurationError, match="dimension d must be a positive integer, got 0"):
        ols_baseline(0, 10)
    with pytest.raises(ConfigurationError, match="batch size n must be a positive integer, got 0"):
        ols_baseline(10, 0)
    with pytest.raises(ConfigurationError, match="dimension d must be a positive integer"):
        wigner_baseline(-3)


# ------------------------------------------------------------------------------------------- exact
SIZES = [20, 15, 5]


def _matrices():
    g = torch.Generator().manual_seed(2)
    return {
        "diagonal": torch.diag(torch.rand(40, generator=g, dtype=F64) + 0.5),
        "block-diagonal": torch.block_diag(spd(20, seed=1), spd(15, seed=2), spd(5, seed=3)),
        "spd": spd(40, seed=4),
        "indefinite": indefinite(40, neg=10, seed=5),
    }


@pytest.mark.parametrize("kind", ["diagonal", "block-diagonal", "spd", "indefinite"])
def test_exact_shares_match_the_dense_hessian(kind):
    A = _matrices()[kind]
    out = diagshare(landscape(Quadratic(A, SIZES), n=64))
    delta, per, bd = dense_share(A, SIZES)
    assert out["exact"] and out["hvps"] == 40 and out["diagshare_err"] == 0.0
    assert out["diagshare"] == pytest.approx(delta, rel=FLOAT64_REL)
    assert out["blockdiag_share"] == pytest.approx(bd, rel=FLOAT64_REL)
    for i, (n, x) in enumerate(zip(SIZES, per)):
        b = out["blocks"][f"w{i}"]
        assert b["diagshare"] == pytest.approx(x, rel=FLOAT64_REL) and b["d"] == n
        assert b["wigner"] == wigner_baseline(n) and b["ols"] == ols_baseline(n, 64)
    assert out["d"] == 40 and out["n"] == 64
    assert out["wigner"] == wigner_baseline(40) and out["ols"] == ols_baseline(40, 64)
    json.dumps(out, allow_nan=False)


def test_structure_extremes():
    diag = diagshare(landscape(Quadratic(_matrices()["diagonal"], SIZES)))
    assert diag["diagshare"] == 1.0 and diag["blockdiag_share"] == pytest.approx(1.0, rel=FLOAT64_REL)
    blocks = diagshare(landscape(Quadratic(_matrices()["block-diagonal"], SIZES)))
    assert blocks["blockdiag_share"] == pytest.approx(1.0, rel=FLOAT64_REL) and blocks["diagshare"] < 1.0


def test_blockdiag_baselines():
    out = diagshare(landscape(Quadratic(spd(40), SIZES), n=32))
    inner = sum(s * s for s in SIZES)
    c = math.sqrt(2 / (math.pi * 32))
    assert out["blockdiag_wigner"] == pytest.approx(inner / 40**2)
    assert out["blockdiag_ols"] == pytest.approx((40 + c * (inner - 40)) / (40 + c * (40 * 40 - 40)))


def test_diagonal_share_helper():
    assert diagonal_share(torch.eye(3)) == 1.0
    assert diagonal_share(torch.ones(4, 4)) == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------- sampled
def _heterogeneous(d: int, seed: int) -> torch.Tensor:
    """Diagonal plus coupling with log-normal column scales (diagonal sd of log 1): sampling must cope."""
    g = torch.Generator().manual_seed(seed)
    r = torch.exp(0.5 * torch.randn(d, generator=g, dtype=F64))
    G = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    G = (G + G.T) / 2 * r[:, None] * r[None, :] * 0.1
    return G + torch.diag(3 * r**2)


def test_column_sampling_within_its_interval():
    sizes = [1200, 700, 100]
    A = _heterogeneous(2000, seed=6)
    out = diagshare(landscape(Quadratic(A, sizes)), exact_threshold=500, k=150, seed=0, rel_tol=0)
    delta, per, bd = dense_share(A, sizes)
    assert not out["exact"] and out["hvps"] == 150 + 150 + 100 and out["columns"] == 400
    # One draw of a 95 % interval misses 1 time in 20 (the coverage test checks that rate); a single draw is
    # held to SIGMAS standard errors, the half-width being Z95 of them.
    wide = SIGMAS / Z95
    assert abs(out["diagshare"] - delta) <= wide * out["diagshare_err"]
    assert abs(out["blockdiag_share"] - bd) <= wide * out["blockdiag_share_err"]
    for i, x in enumerate(per):
        b = out["blocks"][f"w{i}"]
        assert abs(b["diagshare"] - x) <= wide * b["diagshare_err"] + FLOAT64_REL
    # a block no larger than k is computed whole: an exact stratum
    small = out["blocks"]["w2"]
    assert small["exact"] and small["diagshare_err"] == 0.0
    assert small["diagshare"] == pytest.approx(per[2], rel=FLOAT64_REL)


def test_column_sampling_interval_coverage():
    sizes = [350, 250]
    A = _heterogeneous(600, seed=7)
    land = landscape(Quadratic(A, sizes))
    delta = dense_share(A, sizes)[0]
    hits = [covers(diagshare(land, exact_threshold=100, k=40, bootstrap=300, seed=s)["diagshare_ci"], delta)
            for s in range(20)]
    assert np.mean(hits) >= COVERAGE_MIN


# ------------------------------------------------------------------------------------------- errors
def test_no_selected_block_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="no parameter block matches blocks=\\['fc\\*'\\]"):
        diagshare(landscape(Quadratic(spd(10), [5, 5])), blocks=["fc*"])


def test_selected_blocks_are_the_sub_hessian():
    A = spd(40, seed=8)
    out = diagshare(landscape(Quadratic(A, SIZES)), blocks="w1")
    assert out["d"] == 15 and list(out["blocks"]) == ["w1"]
    assert out["diagshare"] == pytest.approx(diagonal_share(A[20:35, 20:35]), rel=FLOAT64_REL)


def test_non_finite_loss_is_a_clear_error():
    with pytest.raises(NonFiniteLossError, match="loss on probe batch 0 is"):
        diagshare(landscape(Quadratic(spd(4), [4], w=torch.tensor([1.0, float("inf"), 0.0, 0.0]))))


def test_registered_with_its_cost():
    m = get("diagshare")
    assert m.fn is diagshare and "HVP" in m.cost
