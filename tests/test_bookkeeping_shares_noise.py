"""The host work of diagshare, precond and noise outside their HVPs, vectorized over blocks: each rewritten
function against the per-block formula it replaced (a slow reference kept here), bit for bit, and the number of
device->host reads per call, which no longer grows with the number of blocks (split from
tests/test_metric_bookkeeping.py, which holds rmed's)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from bookkeeping_helpers import _Block, _blocks, _count_reads, _Rows, _same

import geomprobe.metrics.diagshare
import geomprobe.metrics.precond  # noqa: F401
from geomprobe.metrics.noise import _block_tails, noise_tail_indices
from geomprobe.stats import gradient_noise as gn

ds = sys.modules["geomprobe.metrics.diagshare"]
pc = sys.modules["geomprobe.metrics.precond"]


def _old_summarize(strata, level, bootstrap, rng):
    def stats(draws):
        num = den = inn = 0.0
        per = []
        for st, ix in zip(strata, draws):
            dg, tt, ii = st["diag"][ix].sum(), st["tot"][ix].sum(), st["inner"][ix].sum()
            num, den, inn = num + st["w"] * dg, den + st["w"] * tt, inn + st["w"] * ii
            per.append(dg / ii if ii > 0 else np.nan)
        return (num / den if den > 0 else np.nan), (inn / den if den > 0 else np.nan), per

    full = [np.arange(len(st["diag"])) for st in strata]
    d0, bd0, per0 = stats(full)
    boots = []
    for _ in range(bootstrap):
        draws = [f if st["exact"] else rng.integers(0, len(f), len(f)) for st, f in zip(strata, full)]
        dd, bb, pp = stats(draws)
        boots.append([dd, bb] + pp)
    return (d0, bd0, per0), np.array(boots)


# ----------------------------------------------------------------------------------- diagshare
def _strata(rng, ks, exact_at=()):
    out = []
    for j, k in enumerate(ks):
        n = k if j in exact_at else k * 3 + 1
        diag = np.abs(rng.normal(size=k)) * rng.choice([0.0, 1.0, 1.0], k)  # zero diagonals
        inner = diag + np.abs(rng.normal(size=k)) * (j != 1)  # block 1: inner 0 where diag is 0
        tot = inner + np.abs(rng.normal(size=k))
        if j == 2:
            diag[:] = inner[:] = tot[:] = np.round(tot, 0)  # ties
        out.append({"block": _Block(f"b{j}", 0, n), "exact": j in exact_at, "w": n / k,
                    "diag": diag, "tot": tot, "inner": inner})
    return out


@pytest.mark.parametrize("seed", range(10))
def test_diagshare_resamples_equal_the_loop_over_resamples(seed):
    """Same draws from the same stream (one call with one bound per entry), same sums bit for bit."""
    rng0 = np.random.default_rng(seed)
    strata = _strata(rng0, [1, 4, 7, 1, 30, 2, 9], exact_at=(3, 6))
    if seed == 0:
        for st in strata:
            st["inner"][:] = 0.0  # every share undefined
    old_point, old_boot = _old_summarize(strata, 0.95, 150, np.random.default_rng(seed + 100))
    rng = np.random.default_rng(seed + 100)
    full = [np.arange(len(st["diag"]))[None, :] for st in strata]
    first = ds._share_stats(strata, full)[0]
    boot = ds._share_stats(strata, ds._resamples(strata, 150, rng))
    assert np.array_equal(boot, old_boot, equal_nan=True)
    assert _same([float(first[0]), float(first[1])], [float(old_point[0]), float(old_point[1])])
    assert np.array_equal(first[2:], np.array(old_point[2], dtype=float), equal_nan=True)
    # and the stream is left where the loop left it
    ref = np.random.default_rng(seed + 100)
    _old_summarize(strata, 0.95, 150, ref)
    assert rng.integers(0, 2**62) == ref.integers(0, 2**62)


def test_diagshare_summary_draws_once_whatever_the_resamples():
    strata = _strata(np.random.default_rng(3), [5, 8, 3, 12])
    calls = {"n": 0}

    class Counting:
        def __init__(self, rng):
            self.rng = rng

        def integers(self, *a, **k):
            calls["n"] += 1
            return self.rng.integers(*a, **k)

    out = ds._summarize(strata, 0.95, 400, Counting(np.random.default_rng(1)))
    assert calls["n"] == 1
    lo, hi = out["diagshare_ci"]
    assert lo <= out["diagshare"] <= hi and 0 < out["diagshare_err"] < 1


def test_diagshare_all_exact_draws_nothing():
    strata = _strata(np.random.default_rng(4), [3, 2], exact_at=(0, 1))
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    out = ds._summarize(strata, 0.95, 50, rng)
    assert rng.integers(0, 2**62) == ref.integers(0, 2**62)
    assert out["exact"] and out["diagshare_err"] == 0.0
    num = sum(st["diag"].sum() for st in strata)
    assert out["diagshare"] == pytest.approx(num / sum(st["tot"].sum() for st in strata), rel=1e-14)


# ----------------------------------------------------------------------------------- precond, noise
def test_p_ranges_equal_per_block_reads_and_read_once():
    torch.manual_seed(0)
    counts = []
    for n_blocks in (2, 40):
        blocks = _blocks([1] + [7] * (n_blocks - 1))
        p = torch.rand(blocks[-1].stop, dtype=torch.float32)
        p[3:6] = 0.25  # ties
        with _count_reads() as c:
            got = pc._p_ranges(p, blocks)
        counts.append(c["n"])
        for b in blocks:
            pb = p[b.start : b.stop]
            assert got[b.name] == {"p_min": float(pb.min()), "p_max": float(pb.max()), "p_median": float(pb.median())}
    assert counts == [1, 1]
    assert pc._p_ranges(torch.ones(3), []) == {}


def test_block_norms_and_cvs_equal_per_block_formulas_and_read_once():
    g = torch.Generator().manual_seed(0)
    counts = []
    for n_blocks in (3, 50):
        blocks = _blocks([1] + [6] * (n_blocks - 2) + [4])
        x = torch.randn(blocks[-1].stop, generator=g, dtype=torch.float64)
        x[-4:] = 0.0  # a block without variance: cv undefined
        with _count_reads() as c:
            norms, cvs = gn._block_norms2(x, blocks), gn._block_cvs(x.abs(), blocks)
        counts.append(c["n"])
        assert norms == [float(x[b.slice] @ x[b.slice]) for b in blocks]
        assert cvs == [gn._cv(x.abs()[b.slice]) for b in blocks]
        assert cvs[-1] is None and cvs[0] == 0.0
    assert counts == [2, 2]



def _noise_stats(n_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = _blocks([300] * n_blocks)
    scale = torch.exp(torch.randn(blocks[-1].stop, generator=g, dtype=torch.float64))
    X = torch.randn(64, blocks[-1].stop, generator=g, dtype=torch.float64) * scale
    X[:, :5] = 0.0  # coordinates without noise
    return gn.collect_noise(_Rows(X), blocks, generator=torch.Generator().manual_seed(seed))


def test_block_tails_equal_the_per_block_formula():
    stats = _noise_stats(4)
    out = _block_tails(stats, 4, 0)
    raw = stats.views["raw"]
    for j, b in enumerate(stats.blocks):
        cols = (stats.coords >= b.start) & (stats.coords < b.stop)
        t = noise_tail_indices(stats.sub[:, cols], partitions=4, seed=2 + 2 * j)
        tr = gn.trace_estimates(stats, raw, block=j)
        e = out[b.name]
        assert e["coordinates"] == int(cols.sum())
        assert (e["alpha"], e["alpha_standardized"], e["scale_heterogeneity"]) == (
            t["alpha_pooled"], t["alpha_standardized"], t["scale_heterogeneity"])
        assert e["trace_cov"] == tr["trace"]


def test_overlapping_blocks_are_those_of_the_full_scan():
    rng = np.random.default_rng(0)
    blocks = _blocks([int(n) for n in rng.integers(0, 9, 40)])  # empty blocks among them
    d = blocks[-1].stop
    ov = gn._Overlaps(blocks)
    assert ov.ordered
    for _ in range(300):
        a = int(rng.integers(0, d))
        cs = slice(a, min(d, a + int(rng.integers(1, 25))))
        full = [j for j, b in enumerate(blocks) if max(b.start, cs.start) < min(b.stop, cs.stop)]
        got = list(ov(cs))
        assert [j for j in got if blocks[j].size] == full
        assert all(blocks[j].size == 0 or j in full for j in got)
    shuffled = [blocks[3], blocks[1], blocks[2]]
    assert not gn._Overlaps(shuffled).ordered and list(gn._Overlaps(shuffled)(slice(0, 1))) == [0, 1, 2]


def test_group_sums_by_bisection_equal_the_full_scan(monkeypatch):
    """Many column slices (a small max_elements) and ragged blocks: the sums bit for bit those of the scan
    over every block at every slice."""
    g = torch.Generator().manual_seed(1)
    blocks = _blocks([1, 37, 5, 120, 2, 64])
    X = torch.randn(40, blocks[-1].stop, generator=g, dtype=torch.float64)

    def run():
        return gn.collect_noise(_Rows(X, 8), blocks, max_elements=2048, generator=torch.Generator().manual_seed(0))

    fast = run()
    monkeypatch.setattr(gn._Overlaps, "__call__", lambda self, cs: range(len(self.starts)))
    slow = run()
    a, b = fast.views["raw"], slow.views["raw"]
    assert not fast.exact and torch.equal(a.block_sq, b.block_sq) and torch.equal(a.sq, b.sq)
    assert a.g_block_snorm2 == b.g_block_snorm2 and a.block_cv_R == b.block_cv_R and a.block_cv == b.block_cv
    direct = ((X - X.mean(0)) ** 2)
    ref = torch.stack([direct[:, bl.slice].sum(1) for bl in blocks], 1)
    assert torch.allclose(a.block_sq, ref, rtol=1e-12, atol=0)


def test_column_batches_equal_hessian_columns_and_allocate_once(monkeypatch):
    from geomprobe.errors import ConfigurationError
    from geomprobe.linalg.exact import hessian_columns
    from geomprobe.metrics._common import column_batches, exact_diagonal_chunked

    g = torch.Generator().manual_seed(0)
    A = torch.randn(23, 23, generator=g, dtype=torch.float64)
    H = A + A.T
    seen = []

    def mv(V):
        seen.append(V.clone())
        return V @ H

    idx = torch.tensor([5, 0, 22, 5, 7, 13, 1])  # a repeat, the ends, a ragged last batch of 3
    got = list(column_batches(mv, 23, idx, batch=4, dtype=torch.float64, device=None))
    ref = hessian_columns(lambda V: V @ H, 23, idx, batch=4, dtype=torch.float64)
    assert [p.tolist() for p, _ in got] == [[5, 0, 22, 5], [7, 13, 1]]
    assert torch.equal(torch.cat([c for _, c in got]), ref)
    # every batch saw exactly its own unit vectors (the ones of the last batch were cleared)
    assert torch.equal(seen[1], torch.eye(23, dtype=torch.float64)[[7, 13, 1]])
    assert torch.equal(exact_diagonal_chunked(mv, 23, idx, batch=4, dtype=torch.float64, device=None),
                       H[idx, idx])
    zeros = {"n": 0}
    real = torch.zeros

    def counting(*a, **k):
        zeros["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch, "zeros", counting)
    list(column_batches(mv, 23, torch.arange(23), batch=2, dtype=torch.float64, device=None))
    assert zeros["n"] == 1  # one block of unit vectors for 12 batches
    monkeypatch.setattr(torch, "zeros", real)
    with pytest.raises(ConfigurationError, match="column indices"):
        list(column_batches(mv, 23, torch.tensor([3, 23]), batch=4, dtype=torch.float64, device=None))
    assert list(column_batches(mv, 23, torch.tensor([], dtype=torch.long), batch=4, dtype=torch.float64,
                               device=None)) == []
