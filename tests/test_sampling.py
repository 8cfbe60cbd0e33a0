"""random_prefix: the first k of a uniformly random permutation, at O(k) cost for k small against n."""

import itertools
import math
import time

import numpy as np
import pytest
import torch

from geomprobe.errors import ConfigurationError
from geomprobe.stats.sampling import random_prefix


@pytest.mark.parametrize(("n", "k"), [(12, 2), (12, 3), (40, 2)])
def test_every_ordered_tuple_is_equally_likely(n, k):
    # the rejection path (k <= n/4): ordered tuples uniform, chi-square against n!/(n-k)! equal cells
    gen = torch.Generator().manual_seed(7)
    draws = 30 * math.perm(n, k)
    counts: dict[tuple, int] = {}
    for _ in range(draws):
        t = tuple(random_prefix(n, k, gen).tolist())
        assert len(set(t)) == k and all(0 <= x < n for x in t)
        counts[t] = counts.get(t, 0) + 1
    cells = math.perm(n, k)
    assert len(counts) == cells
    obs = np.array([counts.get(t, 0) for t in itertools.permutations(range(n), k)], float)
    chi2 = float(((obs - 30) ** 2 / 30).sum())
    # chi-square with cells-1 dof: mean cells-1, sd sqrt(2(cells-1)); 5 sd is far beyond chance
    assert abs(chi2 - (cells - 1)) < 5 * math.sqrt(2 * (cells - 1))


def test_first_draw_is_uniform_and_position_matters_not():
    # each position of the prefix is marginally uniform over range(n) (a sorted sample would fail this)
    gen = torch.Generator().manual_seed(3)
    n, k, reps = 50, 5, 20000
    pos = np.zeros((k, n))
    for _ in range(reps):
        for i, x in enumerate(random_prefix(n, k, gen).tolist()):
            pos[i, x] += 1
    expected = reps / n
    assert np.abs(pos - expected).max() < 6 * math.sqrt(expected)


def test_large_n_costs_k_not_n():
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(10):
        s = random_prefix(38_597_376, 6, gen)  # GPT-2's token embedding: randperm takes seconds
    assert time.perf_counter() - t0 < 0.5
    assert s.numel() == 6 and s.unique().numel() == 6 and int(s.max()) < 38_597_376


def test_dense_and_edge_cases():
    gen = torch.Generator().manual_seed(1)
    full = random_prefix(9, 9, gen)
    assert sorted(full.tolist()) == list(range(9))
    assert random_prefix(5, 0, gen).numel() == 0
    assert random_prefix(1, 1, gen).tolist() == [0]
    a = random_prefix(10**6, 1000, torch.Generator().manual_seed(5))
    b = random_prefix(10**6, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.unique().numel() == 1000


@pytest.mark.parametrize(("n", "k"), [(5, 6), (5, -1), (-1, 0), (5.0, 2)])
def test_bad_input(n, k):
    with pytest.raises(ConfigurationError, match="0 <= k <= n"):
        random_prefix(n, k, torch.Generator())
