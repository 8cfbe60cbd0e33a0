"""The stratified bootstrap's weighted quantiles from draw counts (geomprobe.stats.bootstrap)."""

import time

import numpy as np
import pytest

from geomprobe.metrics._common import weighted_quantile
from geomprobe.stats.bootstrap import count_quantiles, stratified_bootstrap_quantiles


def test_counts_give_the_quantiles_of_the_expanded_resamples():
    rng = np.random.default_rng(0)
    values = np.sort(np.round(rng.lognormal(size=60), 1))  # ties included
    weights = rng.choice([1.0, 3.5, 40.0], size=60)
    counts = rng.integers(0, 3, size=(25, 60)).astype(float)
    counts[:, 0] = 0  # an entry drawn by no resample
    got = count_quantiles(values, weights, counts, [0.5, 0.99, 0.1])
    for r in range(25):
        keep = np.repeat(np.arange(60), counts[r].astype(int))
        for j, p in enumerate([0.5, 0.99, 0.1]):
            assert got[j, r] == weighted_quantile(values[keep], weights[keep], p)


def test_stratified_bootstrap_matches_the_resample_loop_in_distribution():
    rng = np.random.default_rng(1)
    fixed = rng.normal(size=30)
    strata = [(rng.lognormal(size=k), w) for k, w in ((6, 200.0), (12, 50.0), (40, 10.0))]
    fast = stratified_bootstrap_quantiles(fixed, strata, [0.5, 0.99], 4000, np.random.default_rng(2))
    loop = np.empty((2, 4000))
    g = np.random.default_rng(3)
    for r in range(4000):
        vs = [fixed] + [v[g.integers(0, len(v), len(v))] for v, _ in strata]
        ws = [np.ones(len(fixed))] + [np.full(len(v), w) for v, w in strata]
        v, w = np.concatenate(vs), np.concatenate(ws)
        loop[:, r] = weighted_quantile(v, w, 0.5), weighted_quantile(v, w, 0.99)
    for j in range(2):  # the percentile interval's ends agree within Monte Carlo noise
        for q in (0.025, 0.5, 0.975):
            a, b = np.quantile(fast[j], q), np.quantile(loop[j], q)
            assert abs(a - b) <= 0.1 * (np.quantile(loop[j], 0.975) - np.quantile(loop[j], 0.025)) + 1e-12


def test_no_strata_is_the_fixed_sample_every_time_and_chunks_do_not_change_the_law(monkeypatch):
    fixed = np.array([3.0, 1.0, 2.0])
    out = stratified_bootstrap_quantiles(fixed, [], [0.5], 7, np.random.default_rng(0))
    assert (out == 2.0).all()
    import geomprobe.stats.bootstrap as b

    strata = [(np.arange(10.0), 2.0)]
    whole = stratified_bootstrap_quantiles(fixed, strata, [0.5], 50, np.random.default_rng(5))
    monkeypatch.setattr(b, "CHUNK_ENTRIES", 13)  # one resample per chunk
    chunked = stratified_bootstrap_quantiles(fixed, strata, [0.5], 50, np.random.default_rng(5))
    assert whole.shape == chunked.shape == (1, 50) and set(np.unique(chunked)) <= set(range(10)) | {1.0, 2.0, 3.0}


@pytest.mark.parametrize("blocks", [148])
def test_many_strata_are_fast(blocks):
    rng = np.random.default_rng(0)
    strata = [(rng.lognormal(size=450), 100.0) for _ in range(blocks)]
    t = time.perf_counter()
    stratified_bootstrap_quantiles(np.empty(0), strata, [0.5, 0.99], 400, rng)
    # the loop sorted 800 arrays of 66,600 values: 5.6 s on one thread of this machine
    assert time.perf_counter() - t < 3.0
