"""Tail-index estimators on samples of known tails (the accuracy table of docs/metrics.md#noise), Hill, pooling,
bad input."""

import math

import pytest
import torch
from tolerances import (
    COVERAGE_MIN,
    COVERAGE_SIGMAS,
    POOLED_ALPHA_ABS,
    SE_CALIBRATION,
    TAIL_MEAN_1E4,
    TAIL_MEAN_1E5,
    TAIL_STD_1E4,
    TAIL_STD_1E5,
    Z95,
)

import geomprobe as gp
from geomprobe.metrics.noise import noise_tail_indices
from geomprobe.stats.tails import hill_index, sample_sas, tail_index

REPS = 20
ALPHAS = [1.0, 1.5, 1.8, 2.0]


def _estimates(alpha, n, reps=REPS, **kw):
    gen = torch.Generator().manual_seed(int(alpha * 1000) + n)
    return [tail_index(sample_sas(alpha, n, gen), **kw) for _ in range(reps)]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n, mean_tol, std_tol", [(10**4, TAIL_MEAN_1E4, TAIL_STD_1E4),
                                                   (10**5, TAIL_MEAN_1E5, TAIL_STD_1E5)])
def test_spec_accuracy_table(alpha, n, mean_tol, std_tol):
    a = torch.tensor([r["alpha"] for r in _estimates(alpha, n)])
    assert abs(float(a.mean()) - alpha) <= mean_tol
    assert float(a.std()) <= std_tol
    assert _estimates(alpha, n, reps=1)[0]["k1"] == math.isqrt(n)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_plain_single_partition_estimator(alpha):
    """The estimator exactly as docs/metrics.md#noise writes it (one partition, the sample's order). At N = 1e4 its own
    std is ~0.1 for alpha = 2 (the table's 0.096), so only the mean is held to the table there."""
    for n, tol in ((10**4, TAIL_MEAN_1E4), (10**5, TAIL_MEAN_1E5)):
        a = torch.tensor([r["alpha"] for r in _estimates(alpha, n, partitions=1)])
        assert abs(float(a.mean()) - alpha) <= tol
    assert float(a.std()) <= TAIL_STD_1E5


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_reported_error_matches_the_spread(alpha):
    res = _estimates(alpha, 10**4, reps=40)
    a = torch.tensor([r["alpha"] for r in res])
    err = torch.tensor([r["alpha_err"] for r in res])
    z = (a - alpha) / err
    lo, hi = SE_CALIBRATION
    # The error is a standard error: standardized deviations have unit spread (conservative allowed).
    assert float(z.std()) <= hi and float(err.mean()) >= lo * float(a.std())


def test_k1_trims_to_a_multiple_and_zeros_are_dropped():
    x = sample_sas(1.5, 1000, torch.Generator().manual_seed(0))
    out = tail_index(x, k1=30)
    assert (out["k1"], out["k2"], out["n"], out["zeros"]) == (30, 33, 990, 0)
    with_zeros = torch.cat([x, torch.zeros(50, dtype=torch.float64)])
    out = tail_index(with_zeros, partitions=1)
    assert out["zeros"] == 50 and out["k1"] == 31
    assert out["alpha"] == tail_index(x, partitions=1)["alpha"]


def test_sampler_matches_known_laws():
    g = torch.Generator().manual_seed(0)
    assert abs(float(sample_sas(2.0, 200_000, g).var()) - 2.0) < 0.03           # N(0, 2)
    assert abs(float(sample_sas(1.0, 200_000, g).abs().median()) - 1.0) < 0.02   # standard Cauchy
    assert sample_sas(1.5, 10, g, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(sample_sas(1.3, 5, torch.Generator().manual_seed(1)),
                       sample_sas(1.3, 5, torch.Generator().manual_seed(1)))


def test_hill_on_pareto_samples_and_its_interval_covers():
    covered = 0
    for seed in range(20):
        u = torch.rand(5000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out = hill_index(u ** (-1 / 1.5), n_boot=100, seed=seed)
        covered += out["alpha_lo"] <= 1.5 <= out["alpha_hi"]
        assert out["k"] == 70 and out["alpha_err"] > 0
    assert covered / 20 >= COVERAGE_MIN


@pytest.mark.parametrize("sd, expected", [(0.0, 2.03), (0.5, 1.87), (1.0, 1.52), (2.0, 0.93)])
def test_pooled_gaussians_with_lognormal_scales(sd, expected):
    """Pooling Gaussian coordinates of log-normal scales fakes a heavy tail; standardizing removes it
    (docs/metrics.md#noise)."""
    g = torch.Generator().manual_seed(7)
    scales = torch.exp(sd * torch.randn(1000, generator=g, dtype=torch.float64))
    xi = torch.randn(200, 1000, generator=g, dtype=torch.float64) * scales
    out = noise_tail_indices(xi)
    assert abs(out["alpha_pooled"] - expected) <= POOLED_ALPHA_ABS
    assert abs(out["alpha_standardized"] - 2.0) <= POOLED_ALPHA_ABS
    assert out["scale_heterogeneity"] == (sd >= 1.0)
    assert out["gap"] == pytest.approx(out["alpha_standardized"] - out["alpha_pooled"])


def test_bad_samples_raise_clear_errors():
    x = sample_sas(1.5, 1000, torch.Generator().manual_seed(0))
    with pytest.raises(gp.ConfigurationError, match="takes a 1-D sample, got shape"):
        tail_index(x.reshape(10, 100))
    with pytest.raises(gp.ConfigurationError, match="at least 100 nonzero values, got 50"):
        tail_index(x[:50])
    with pytest.raises(gp.ConfigurationError, match="after dropping 950 exact zeros"):
        tail_index(torch.cat([x[:50], torch.zeros(950, dtype=torch.float64)]))
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(gp.ConfigurationError, match="1 non-finite value"):
        tail_index(bad)
    with pytest.raises(gp.ConfigurationError, match=r"k1 must be an integer in \[2, N/2\]"):
        tail_index(x, k1=1)
    with pytest.raises(gp.ConfigurationError, match="partitions must be >= 1"):
        tail_index(x, partitions=0)
    with pytest.raises(gp.ConfigurationError, match="alpha must lie in"):
        sample_sas(2.5, 10)
    with pytest.raises(gp.ConfigurationError, match="positive values"):
        hill_index(x)
    with pytest.raises(gp.ConfigurationError, match="at least 20 values"):
        hill_index(x.abs()[:10])
    with pytest.raises(gp.ConfigurationError, match="non-finite"):
        hill_index(torch.cat([x.abs(), torch.tensor([float("inf")], dtype=torch.float64)]))
    with pytest.raises(gp.ConfigurationError, match="P x m matrix"):
        noise_tail_indices(x)


def _coverage(alphas, n, trials):
    """(share of [alpha_lo, alpha_hi] covering the truth, share of alpha ± 1.96 alpha_err covering it)."""
    inside = plus_minus = total = 0
    for alpha in alphas:
        gen = torch.Generator().manual_seed(int(alpha * 7919) + n)
        for _ in range(trials):
            out = tail_index(sample_sas(alpha, n, gen))
            hi = out["alpha_hi"] if out["alpha_hi"] is not None else math.inf
            inside += out["alpha_lo"] <= alpha <= hi
            plus_minus += abs(out["alpha"] - alpha) <= Z95 * out["alpha_err"]
            total += 1
    return inside / total, plus_minus / total, total


def _within_binomial_noise(share, level, trials):
    return abs(share - level) <= COVERAGE_SIGMAS * math.sqrt(level * (1 - level) / trials)


def test_the_interval_covers_at_its_stated_rate():
    # 400 SaS samples of N = 1e4 with known alpha (100 each of 1, 1.5, 1.8, 2): the studentized interval
    # (t with 11 df over 12 independent groups of blocks) covers at 95 % within binomial noise, both as
    # [alpha_lo, alpha_hi] and as alpha ± 1.96 alpha_err (the previous formula: 92 % over 600 trials)
    inside, plus_minus, total = _coverage(ALPHAS, 10**4, 100)
    assert total == 400
    assert _within_binomial_noise(inside, 0.95, total), inside
    assert _within_binomial_noise(plus_minus, 0.95, total), plus_minus


@pytest.mark.slow
@pytest.mark.parametrize("n", [10**3, 10**4, 10**5])
def test_the_interval_covers_at_its_stated_rate_over_1200_samples(n):
    inside, plus_minus, total = _coverage([1.0, 1.3, 1.5, 1.8, 2.0, 0.8], n, 200)
    assert _within_binomial_noise(inside, 0.95, total), (n, inside)
    assert _within_binomial_noise(plus_minus, 0.95, total), (n, plus_minus)


def test_the_pooled_estimate_depends_on_the_values_only_not_their_layout():
    # Gaussian noise whose coordinates are correlated within a sample (rho = 0.7): every entry is Gaussian,
    # so the pooled law has alpha = 2. Consecutive coordinates of one sample (row-major blocks, the plain
    # estimator on xi.reshape(-1)) sum correlated values and fake a heavy tail; the default random blocks
    # give the pooled law's alpha, and exactly the same number for any layout of the same values.
    g = torch.Generator().manual_seed(3)
    P, m, rho = 400, 300, 0.7
    xi = rho * torch.randn(P, 1, generator=g, dtype=torch.float64) + math.sqrt(1 - rho**2) * torch.randn(
        P, m, generator=g, dtype=torch.float64)
    xi = xi - xi.mean(0)  # noise is centred per coordinate, as the noise metric's is
    out = noise_tail_indices(xi)
    assert out["blocking"] == "random" and out["zeros_pooled"] == 0 and out["entries"] == P * m
    assert abs(out["alpha_pooled"] - 2.0) <= 4 * out["alpha_pooled_err"] + 0.02, out
    assert out["alpha_pooled_lo"] < out["alpha_pooled"] < out["alpha_pooled_hi"]
    row_major = tail_index(xi.reshape(-1), partitions=1)
    assert row_major["order"] == "given" and row_major["alpha"] < 1.3  # what consecutive blocks would say
    shuffled = xi[torch.randperm(P, generator=g)][:, torch.randperm(m, generator=g)]
    for same in (xi.T.contiguous().reshape(-1), shuffled.reshape(-1), xi.reshape(-1).flip(0)):
        assert tail_index(same)["alpha"] == tail_index(xi.reshape(-1))["alpha"]
    assert noise_tail_indices(shuffled)["alpha_pooled"] == out["alpha_pooled"]


def test_dead_coordinates_are_counted_and_change_nothing_else():
    g = torch.Generator().manual_seed(4)
    xi = torch.randn(200, 100, generator=g, dtype=torch.float64)
    dead = torch.cat([xi, torch.zeros(200, 25, dtype=torch.float64)], 1)  # 25 units without noise
    a, b = noise_tail_indices(xi), noise_tail_indices(dead)
    assert b["zeros_pooled"] == 200 * 25 and b["entries"] == 200 * 125 and b["values"] == a["values"]
    assert b["alpha_pooled"] == a["alpha_pooled"] and b["alpha_standardized"] == a["alpha_standardized"]
    with pytest.raises(gp.ConfigurationError, match="level must lie in"):
        tail_index(xi.reshape(-1), level=1.5)
