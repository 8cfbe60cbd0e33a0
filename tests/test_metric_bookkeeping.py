"""rmed's host work outside its HVPs (the screen, the candidates, the per-block statistics; diagshare's, precond's
and noise's are in tests/test_bookkeeping_shares_noise.py), vectorized over blocks: each rewritten function against the
per-block formula it replaced (a slow reference kept here), bit for bit, on random inputs with the edge cases
(a block of one entry, ties, zero entries, every coordinate known); and the number of device->host reads per
call, which no longer grows with the number of blocks."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bookkeeping_helpers import _blocks, _count_elements, _count_reads, _same

import geomprobe.metrics.rmed  # noqa: F401
from geomprobe.metrics._budget import plan_rmed
from geomprobe.metrics._common import quantile_ci
from geomprobe.metrics._reads import BlockDiag
from geomprobe.metrics._screen import Screen, screen_candidates, screen_facts

rm = sys.modules["geomprobe.metrics.rmed"]


# ----------------------------------------------------------------------------------- slow references
def _old_screen_candidates(screen, screen_se, known, scales, z, n_top):
    unknown = np.ones(len(screen), dtype=bool)
    unknown[known] = False
    chosen: set[int] = set()
    n = min(n_top, int(unknown.sum()))
    for s in scales:
        sc = 1.0 if s is None else s.abs().double().cpu().numpy()
        upper = np.where(unknown, sc * (np.abs(screen) + z * screen_se), -np.inf)
        chosen.update(np.argpartition(-upper, n - 1)[:n].tolist() if n else [])
    return np.array(sorted(chosen), dtype=int)


def _old_pool_candidates(parts, taken, scalings, z, pool):
    if pool <= 0:
        return [np.empty(0, dtype=int) for _ in parts]
    chosen: list[set[int]] = [set() for _ in parts]
    per = max(1, pool // max(1, len(scalings)))
    for s in scalings:
        best = []
        for j, p in enumerate(parts):
            b = p.block
            known = np.union1d(p.sample, taken[j]).astype(int)
            local = _old_screen_candidates(p.screen, p.screen_se, known,
                                           [None if s is None else s[b.start : b.stop]], z, per)
            sc = 1.0 if s is None else s[b.start : b.stop][local].abs().double().cpu().numpy()
            ub = sc * (np.abs(p.screen[local]) + z * p.screen_se[local])
            best.extend((float(u), j, int(i)) for u, i in zip(np.atleast_1d(ub), local))
        best.sort(key=lambda t: -t[0])
        for _, j, i in best[:per]:
            chosen[j].add(i)
    out = [np.array(sorted(c), dtype=int) for c in chosen]
    while sum(len(c) for c in out) > pool:
        j = max(range(len(out)), key=lambda i: len(out[i]))
        out[j] = out[j][:-1]
    return out


def _old_block_result(p, s, z, level):
    b = p.block
    sc = None if s is None else s[b.start : b.stop].abs().double().cpu().numpy()
    samp = np.abs(p.sample_h) * (1.0 if sc is None else sc[p.sample])
    if p.exact:
        med, q99, mx = float(np.median(samp)), float(np.quantile(samp, 0.99)), float(samp.max())
        out = {"max": mx, "max_upper": mx, "max_certified": True, "median": med, "median_ci": [med, med],
               "q99": q99, "exact": True, "size": b.size, "computed": b.size}
        out.update(rm._ratio_stats(mx, mx, med, (med, med), q99, (q99, q99), (med, med)))
        return out, {"values": samp, "weights": np.ones(len(samp)), "exact": True, "mx": mx, "mx_upper": mx,
                     "mx_lower": mx, "computed": b.size, "size": b.size, "scale": np.zeros(len(samp))}
    packed = p.sample_err is not None
    cand = np.abs(p.cand_h) * (1.0 if sc is None else sc[p.cand])
    s_samp = rm._noise_scale(p.sample_err * (1.0 if sc is None else sc[p.sample])) if packed else np.zeros(len(samp))
    s_cand = rm._noise_scale(p.cand_err * (1.0 if sc is None else sc[p.cand])) if packed else np.zeros(len(cand))
    read, read_s = np.concatenate([samp, cand]), np.concatenate([s_samp, s_cand])
    mx = float(read.max())
    lower, upper = np.maximum(read - z * read_s, 0.0), read + z * read_s
    if packed and p.screen is not None:
        at = np.concatenate([p.sample, p.cand])
        sc_at = 1.0 if sc is None else sc[at]
        lower = np.minimum(lower, np.maximum(np.abs(p.screen[at]) - z * p.screen_se[at], 0.0) * sc_at)
        upper = np.maximum(upper, (np.abs(p.screen[at]) + z * p.screen_se[at]) * sc_at)
    mx_lower, mx_read_upper = float(lower.max()), float(upper.max())
    unknown = np.ones(b.size, dtype=bool)
    unknown[p.sample] = False
    unknown[p.cand] = False
    screen_upper = -np.inf
    if p.screen is not None and unknown.any():
        ub = (np.abs(p.screen) + z * p.screen_se)[unknown]
        screen_upper = float((ub * (1.0 if sc is None else sc[unknown])).max())
    elif p.screen is None and unknown.any():
        screen_upper = float("inf")
    mx_upper = max(mx_read_upper, screen_upper)
    med, q99 = float(np.median(samp)), float(np.quantile(samp, 0.99))
    bonf = 1 - (1 - level) / 2
    whole = len(p.sample) == b.size
    med_ci = (med, med) if whole else quantile_ci(samp, 0.5, level)
    med_bonf = (med, med) if whole else quantile_ci(samp, 0.5, bonf)
    ceiling = mx_upper if np.isfinite(mx_upper) else None
    q99_ci = (q99, q99) if whole else quantile_ci(samp, 0.99, bonf, ceiling=ceiling)
    if packed:
        med_ci, med_bonf = rm._widen(med_ci, samp, s_samp, z), rm._widen(med_bonf, samp, s_samp, z)
        q99_ci = rm._widen(q99_ci, samp, s_samp, z)
        q99_ci = (q99_ci[0], min(q99_ci[1], mx_upper))
    certified = bool(screen_upper <= mx_lower) if packed else bool(mx_upper <= mx)
    out = {"max": mx, "max_upper": mx_upper if np.isfinite(mx_upper) else None, "max_certified": certified,
           "median": med, "median_ci": list(med_ci), "q99": q99, "exact": False, "size": b.size,
           "computed": int(len(p.sample) + len(p.cand))}
    if packed:
        out.update({"max_lower": mx_lower, "packed": True,
                    "contamination": float(np.sqrt(np.mean(s_samp**2)) / med) if med > 0 else None})
    out.update(rm._ratio_stats(mx, mx_upper, med, med_ci, q99, q99_ci, med_bonf, mx_lower))
    return out, {"values": samp, "weights": np.full(len(samp), b.size / len(samp)), "exact": False,
                 "mx": mx, "mx_upper": mx_upper, "mx_lower": mx_lower, "computed": out["computed"],
                 "size": b.size, "scale": s_samp, "certified": certified}


# ----------------------------------------------------------------------------------- rmed's reads
def _bound_with_ties(rng, n):
    """A screen whose upper bounds tie: repeated values and exact zeros (dead coordinates)."""
    mean = rng.choice([0.0, 1.0, -1.0, 2.5], n) * rng.choice([1.0, 1.0, 0.5], n)
    se = rng.choice([0.0, 0.25], n)
    return mean, se


def _screen(mean, se) -> Screen:
    return Screen(torch.from_numpy(np.asarray(mean, dtype=np.float64)), torch.from_numpy(np.asarray(se, np.float64)))


def _host_view(p):
    """``p`` as the old per-block formulas saw it: the block's screen as two float64 host arrays."""
    if p.screen is None:
        return SimpleNamespace(**{**vars(p), "screen_se": None})
    b = p.block
    return SimpleNamespace(**{**vars(p), "screen": p.screen.mean[b.start : b.stop].numpy(),
                              "screen_se": p.screen.se[b.start : b.stop].numpy()})


def _scaled_bound(mean, se, s, z):
    return (1.0 if s is None else s.abs().double().numpy()) * (np.abs(mean) + z * se)


def _lowest_first(upper, known, n):
    """The documented tie rule by a full stable sort: the ``n`` unknown entries of largest ``upper``, ties to
    the lower index."""
    free = np.setdiff1d(np.arange(len(upper)), known)
    order = free[np.argsort(-upper[free], kind="stable")]
    return np.sort(order[:n])


def _assert_same_choice(new, old, upper, ref, ties):
    """Without ties the old choice exactly; with them the tie rule's, and the same bounds as the old one
    (among equal bounds the old argpartition took any)."""
    if not ties:
        assert np.array_equal(new, old)
    assert np.array_equal(new, ref)
    assert np.array_equal(np.sort(upper[new]), np.sort(upper[old]))


@pytest.fixture(params=["host", "device"])
def top_way(request, monkeypatch):
    """Each way of taking a block's top-k (:func:`_screen._top_host` reads the device, ``_top_device`` never,
    as on a GPU), both run here on the CPU."""
    from geomprobe.metrics import _screen as scr

    monkeypatch.setattr(scr, "_top", getattr(scr, f"_top_{request.param}"))
    return getattr(scr, f"_top_{request.param}")


@pytest.mark.parametrize("seed", range(12))
def test_screen_candidates_equal_the_masked_formula(seed, top_way):
    rng = np.random.default_rng(seed)
    z = 4.0
    ties = bool(seed % 2)
    for n in (1, 2, 7, 64, 513):
        mean, se = _bound_with_ties(rng, n) if ties else (rng.normal(size=n), rng.random(n))
        for n_known in sorted({0, n // 3, n - 1, n}):
            known = rng.choice(n, n_known, replace=False)
            s = torch.tensor(rng.normal(size=n) * (rng.random(n) > 0.2), dtype=torch.float32)  # zeros in it
            for scales in ([None], [s], [None, s]):
                for n_top in (0, 1, 5, n + 3):
                    old = _old_screen_candidates(mean, se, known, scales, z, n_top)
                    (new,), (extra,) = screen_candidates(_screen(mean, se), _blocks([n]), [known], scales, n_top, z)
                    assert len(extra) == 0 and new.dtype == np.int64
                    if len(scales) == 1:
                        upper = _scaled_bound(mean, se, scales[0], z)
                        ref = _lowest_first(upper, known, n_top) if n_top else np.empty(0, int)
                        _assert_same_choice(new, old, upper, ref, ties)
                    elif not ties:
                        assert np.array_equal(new, old), (n, n_known, n_top)
                    else:  # the union of each scaling's choice under the tie rule
                        ref = [_lowest_first(_scaled_bound(mean, se, x, z), known, n_top) for x in scales]
                        assert np.array_equal(new, np.union1d(*ref) if n_top else np.empty(0, int))


def _screened_parts(rng, sizes, ties: bool):
    blocks = _blocks(sizes)
    d = blocks[-1].stop
    mean, se = _bound_with_ties(rng, d) if ties else (rng.normal(size=d), rng.random(d))
    screen = _screen(mean, se)
    parts = []
    for b in blocks:
        k = min(b.size, int(rng.integers(1, 6)))
        sample = np.sort(rng.choice(b.size, k, replace=False))
        p = BlockDiag(b, False, sample, rng.normal(size=k), np.empty(0, int), np.empty(0))
        p.screen = screen
        rest = np.setdiff1d(np.arange(b.size), sample)
        p.cand = np.sort(rng.choice(rest, min(len(rest), int(rng.integers(0, 3))), replace=False))
        p.cand_h = rng.normal(size=len(p.cand))
        parts.append(p)
    return parts, d, screen


@pytest.mark.parametrize("seed", range(8))
def test_pool_candidates_equal_the_per_block_formula(seed, top_way):
    rng = np.random.default_rng(seed)
    ties = bool(seed % 2)
    parts, d, screen = _screened_parts(rng, [1, 3, 40, 9, 200, 2], ties=ties)
    s = torch.tensor(rng.normal(size=d), dtype=torch.float64)
    blocks = [p.block for p in parts]
    for scalings in ([None], [s], [None, s]):
        for pool in (0, 1, 7, 40):
            taken = [p.cand for p in parts]
            old = _old_pool_candidates([_host_view(p) for p in parts], taken, scalings, 4.0, pool)
            _, new = screen_candidates(screen, blocks, [p.sample for p in parts], scalings, 0, 4.0, pool=pool,
                                       taken=taken)
            assert sum(len(c) for c in new) <= pool
            if not ties:
                assert all(np.array_equal(a, b) for a, b in zip(old, new))
            elif len(scalings) == 1:
                # ties: the largest bounds all the same, the lowest coordinates among equal ones
                upper = _scaled_bound(screen.mean.numpy(), screen.se.numpy(), scalings[0], 4.0)
                got = np.concatenate([b.start + c for b, c in zip(blocks, new)])
                was = np.concatenate([b.start + c for b, c in zip(blocks, old)])
                known = np.concatenate([b.start + np.union1d(p.sample, t) for b, p, t in zip(blocks, parts, taken)])
                ref = _lowest_first(upper, known, min(pool, d - len(known))) if pool else np.empty(0, int)
                _assert_same_choice(got, was, upper, ref, ties)


@pytest.mark.parametrize("seed", range(6))
def test_candidates_and_pool_of_one_call_equal_the_old_read_exact_steps(seed, top_way):
    """read_exact's top candidates and then the pool outside them, in one call, as the old two steps."""
    rng = np.random.default_rng(seed)
    parts, d, screen = _screened_parts(rng, [1, 2, 50, 9, 300, 4, 77], ties=False)
    s = torch.tensor(rng.normal(size=d), dtype=torch.float32)  # no zeros: no ties (those: the tests above)
    blocks = [p.block for p in parts]
    for scalings in ([None], [s], [None, s]):
        for top, pool in ((3, 0), (3, 11), (0, 5), (60, 9)):
            cand, extra = screen_candidates(screen, blocks, [p.sample for p in parts], scalings, top, 4.0, pool=pool)
            views = [_host_view(p) for p in parts]
            old_cand = [_old_screen_candidates(v.screen, v.screen_se, v.sample,
                                               [None if x is None else x[v.block.start : v.block.stop]
                                                for x in scalings], 4.0, top) for v in views]
            assert all(np.array_equal(a, b) for a, b in zip(cand, old_cand))
            old_extra = _old_pool_candidates(views, old_cand, scalings, 4.0, pool)
            assert all(np.array_equal(a, b) for a, b in zip(extra, old_extra))


def test_top_breaks_ties_to_the_lower_index_and_skips_known_ones(top_way):
    _top = top_way
    ub = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, -np.inf, 2.0], dtype=torch.float64)
    v, i = _top(ub.clone(), 4)
    assert v.tolist() == [3.0, 3.0, 2.0, 2.0] and sorted(i.tolist()) == [1, 2, 3, 4]
    for _ in range(3):  # the same whatever the call
        assert torch.equal(_top(ub.clone(), 4)[1], i)
    v, i = _top(ub.clone(), 2)  # no tie straddles the cut-off
    assert v.tolist() == [3.0, 3.0] and sorted(i.tolist()) == [1, 3]
    v, i = _top(ub.clone(), 50)  # more asked than there are: every entry, the known one last
    assert len(i) == 8 and v[-1] == -np.inf and i[-1] == 6
    zeros = torch.zeros(1000, dtype=torch.float64)
    assert sorted(_top(zeros, 5)[1].tolist()) == [0, 1, 2, 3, 4]
    assert _top(zeros, 0)[1].numel() == 0
    screen = _screen(np.zeros(10), np.zeros(10))
    (c,), _ = screen_candidates(screen, _blocks([10]), [np.arange(10)], [None], 3, 4.0)
    assert len(c) == 0  # every coordinate known: nothing to read
    (c,), (e,) = screen_candidates(screen, _blocks([10]), [np.array([0, 2])], [None], 3, 4.0, pool=4)
    assert c.tolist() == [1, 3, 4] and e.tolist() == [5, 6, 7, 8]


def test_no_whole_model_array_crosses_to_the_host_while_reading():
    """read_exact (screen, candidates, pool), read_scaled_candidates and the statistics move only candidate
    indices, per-block maxima and values at read coordinates to the host: the largest crossing is far below
    the model's size, where the screen's mean and error (d entries each) crossed before."""
    from geomprobe.metrics._reads import DiagonalReads, read_exact, read_scaled_candidates

    blocks = _blocks([3] + [2000] * 12)
    d = blocks[-1].stop
    g = torch.Generator().manual_seed(0)
    D = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))
    u = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5

    def mv(V):
        return V * D + (V @ u)[..., None] * u

    s = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    opts = {"exact_threshold": 0, "k": 6, "top": 2, "screen_samples": 4, "z": 4.0, "dtype": torch.float64,
            "device": None, "batch": 16}
    plan = plan_rmed([b.size for b in blocks], budget=10**6, exact_threshold=0, k=6, top=2, screen_samples=4,
                     signs=2, min_k=3, pilot=0)
    with _count_elements() as sizes:
        parts, _ = read_exact(mv, d, blocks, [None], generator=torch.Generator().manual_seed(1), pool=8, **opts)
        reads = DiagonalReads(tuple(parts), plan, 0, g.get_state())
        more, _ = read_scaled_candidates(mv, d, reads, s, z=4.0, generator=g, dtype=torch.float64, device=None,
                                         batch=16)
        rm.diagonal_statistics(more, plan, [None, s], z=4.0, level=0.95, bootstrap=20, budget=10**6, generator=g)
    assert max(sizes) < d / 50, (max(sizes), d)
    assert sum(sizes) < d / 2, (sum(sizes), d)
    assert sum(len(p.cand) for p in parts) > 12 * 2  # the pool was read too
    assert all(p.screen is parts[1].screen for p in parts[1:]) and parts[0].screen is None


def test_the_device_way_reads_the_device_once_per_call_whatever_the_blocks(monkeypatch):
    """With the top-k a GPU takes (fixed shapes), choosing candidates and pool, and the statistics' screen
    facts, read the device once per call: nothing waits for it block by block."""
    from geomprobe.metrics import _screen as scr

    monkeypatch.setattr(scr, "_top", scr._top_device)
    counts = []
    for n_blocks in (3, 30):
        rng = np.random.default_rng(0)
        parts, d, screen = _screened_parts(rng, [1] + [40] * (n_blocks - 1), ties=True)
        s = torch.rand(d, dtype=torch.float64)
        blocks = [p.block for p in parts]
        with _count_reads() as c:
            screen_candidates(screen, blocks, [p.sample for p in parts], [None, s], 3, 4.0, pool=7,
                              taken=[p.cand for p in parts])
        with _count_reads() as f:
            screen_facts(parts, [None, s], 4.0)
        counts.append((c["n"], f["n"]))
    assert counts == [(1, 1), (1, 1)], counts


def _all_kinds_of_parts(rng):
    """Exact blocks (one of one entry), sampled exact entries with and without a screen, packed reads with
    their errors, a block whose every coordinate was read, tied and zero entries."""
    blocks = _blocks([1, 5, 60, 33, 120, 8, 8])
    d = blocks[-1].stop
    screen = _screen(*_bound_with_ties(rng, d))
    parts = []
    for j, b in enumerate(blocks):
        if j <= 1:
            h = rng.choice([0.0, 1.0, -2.0], b.size)
            parts.append(BlockDiag(b, True, np.arange(b.size), h, np.empty(0, int), np.empty(0)))
            continue
        k = b.size if j == 5 else min(b.size - 2, 12)
        sample = np.sort(rng.choice(b.size, k, replace=False))
        h = rng.choice([0.0, 0.5, 3.0, -3.0], k) + (0 if j == 3 else rng.normal(size=k))
        p = BlockDiag(b, False, sample, h, np.empty(0, int), np.empty(0))
        rest = np.setdiff1d(np.arange(b.size), sample)
        p.cand = np.sort(rng.choice(rest, min(len(rest), 2), replace=False))
        p.cand_h = rng.normal(size=len(p.cand))
        if j != 6:  # block 6: no screen (the unread entries are unbounded)
            p.screen = screen
        if j in (4, 5):  # packed reads
            p.sample_err, p.cand_err = rng.random(k), rng.random(len(p.cand))
        parts.append(p)
    return parts, d


@pytest.mark.parametrize("seed", range(10))
def test_block_result_equals_the_per_block_formula(seed):
    rng = np.random.default_rng(seed)
    parts, d = _all_kinds_of_parts(rng)
    s = torch.tensor(rng.normal(size=d) * (rng.random(d) > 0.1), dtype=torch.float32)
    facts = screen_facts(parts, [None, s], 4.0)
    for scaling, row in zip((None, s), facts):
        for p, f in zip(parts, row):
            assert _same(_old_block_result(_host_view(p), scaling, 4.0, 0.95), rm._block_result(p, f, 4.0, 0.95))


def test_diagonal_statistics_reads_the_scaling_once_whatever_the_blocks():
    """One device->host read per scaling (the whole |s|), where one per block was made before."""
    counts = []
    for n_blocks in (3, 30):
        rng = np.random.default_rng(0)
        blocks = _blocks([1] + [50] * (n_blocks - 1))
        d = blocks[-1].stop
        screen = _screen(rng.normal(size=d), rng.random(d))
        parts = []
        for b in blocks:
            if b.size == 1:
                parts.append(BlockDiag(b, True, np.arange(1), rng.normal(size=1), np.empty(0, int), np.empty(0)))
                continue
            p = BlockDiag(b, False, np.arange(10), rng.normal(size=10), np.arange(10, 12), rng.normal(size=2))
            p.screen = screen
            parts.append(p)
        plan = plan_rmed([b.size for b in blocks], budget=10**6, exact_threshold=1, k=10, top=2, screen_samples=2,
                         signs=2, min_k=3, pilot=0)
        s = torch.rand(d, dtype=torch.float64) + 0.5
        gen = torch.Generator().manual_seed(0)
        with _count_reads() as c:
            rm.diagonal_statistics(parts, plan, [None, s], z=4.0, level=0.95, bootstrap=20, budget=10**6,
                                   generator=gen)
        counts.append(c["n"])
    assert counts[0] == counts[1] <= 4, counts
