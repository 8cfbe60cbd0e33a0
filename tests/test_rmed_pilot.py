"""rmed's pilot (docs/metrics.md#rmed): packed reads' contamination measured before the budget is committed.

Where the contamination would take most blocks' median intervals away (a digits MLP and CNN forced past the
exact plan, a 150-block low-rank-coupled matvec: the GPT-2 regime of ~6 exact entries per block), the rest of
the budget goes to exact entries and the intervals are finite and cover the exact diagonal's values at their
stated rate; where the reads are clean (a 200-block nearly diagonal quadratic), the packed plan continues from
the pilot's rows, read once. References are exact: dense float64 Hessians, closed-form diagonals."""

import math

import numpy as np
import pytest
import torch
from quadratic_models import Quadratic, banded, exact_rmed, landscape, spd
from test_budgeted_diagonal import _floor

from geomprobe import ConfigurationError
from geomprobe.metrics import rmed
from geomprobe.metrics._budget import FALLBACK_MIN_K, fallback_budget, plan_fallback, plan_rmed
from geomprobe.metrics._pilot import block_contamination, judge_pilot
from geomprobe.metrics.rmed import diagonal_ratios
from geomprobe.probe.progress import plan_probe

F64 = torch.float64
LEVEL = 0.95
OPTS = {"k": 64, "top": 8, "screen_samples": 16, "bootstrap": 100, "level": LEVEL}


def _blocks(sizes):
    starts = np.cumsum([0] + list(sizes))
    return [type("B", (), {"name": f"b{j}", "start": int(starts[j]), "stop": int(starts[j + 1]), "size": n})()
            for j, n in enumerate(sizes)]


def _truths(h: torch.Tensor, sizes) -> dict:
    """Exact (R_med, R_q99, median |h|) of the whole diagonal and of each block."""
    starts = np.cumsum([0] + list(sizes))
    pieces = {"whole": h} | {f"b{j}": h[starts[j] : starts[j + 1]] for j in range(len(sizes))}
    return {key: (*exact_rmed(x), float(np.median(x.abs()))) for key, x in pieces.items()}


def _hit(ci, value) -> bool:
    lo, hi = ci
    return lo <= value <= (math.inf if hi is None else hi)


def _pilot_coverage(matvec, h, sizes, seeds, **kw):
    """Per key (whole, b0, ...): coverage rates of (R_med, R_q99, median) and the decisions and spending."""
    truth, blocks, d = _truths(h, sizes), _blocks(sizes), len(h)
    hits = {key: np.zeros(3) for key in truth}
    runs = []
    for s in range(seeds):
        (res,), spent = diagonal_ratios(matvec, d, blocks, generator=torch.Generator().manual_seed(s), **kw)
        runs.append((res, spent))
        for key, r in [("whole", res)] + list(res["blocks"].items()):
            R, Q, med = truth[key]
            hits[key] += [_hit(r["rmed_ci"], R), _hit(r["rmed_q99_ci"], Q), _hit(r["median_ci"], med)]
    return {key: v / seeds for key, v in hits.items()}, runs


def _coupled(n_blocks: int = 150, size: int = 200, rank: int = 4, seed: int = 0):
    """``H = D + U U^T`` (log-normal D, Gaussian U): every pair of coordinates coupled, as in a real network,
    so packed reads are heavily contaminated; its HVP is cheap at any d and its diagonal is closed-form."""
    g = torch.Generator().manual_seed(seed)
    d = n_blocks * size
    D = torch.exp(torch.randn(d, generator=g, dtype=F64))
    U = torch.randn(d, rank, generator=g, dtype=F64)
    return (lambda V: V * D + (V @ U) @ U.T), D + (U**2).sum(1), [size] * n_blocks


# --------------------------------------------------------------------------------------- the rule
def test_contamination_ratio_and_rule():
    est = np.array([1.0, -2.0, 3.0, 4.0])
    assert block_contamination(est, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5 / 2.5)
    assert block_contamination(np.zeros(3), np.zeros(3)) == 0.0             # nothing to contaminate
    assert block_contamination(np.zeros(3), np.ones(3)) == math.inf
    blocks = _blocks([10, 10, 10])
    est = np.ones((8, 3))
    err = np.column_stack([np.full(8, 0.1), np.full(8, 0.1), np.full(8, 0.05)])  # c = 0.1, 0.1, 0.05; 0.25/z = 0.0625
    rec = judge_pilot(blocks, est, err, z=4.0, signs=2, fallback=True)
    assert rec["decision"] == "exact" and rec["contaminated"] == 2 and rec["hvps"] == 16 and rec["rows"] == 8
    assert rec["threshold"] == 0.0625 and rec["contamination"]["b2"] == pytest.approx(0.05)
    # a majority is needed; and without a fallback the packed reads continue, saying what budget would switch
    assert judge_pilot(blocks, est, err, z=8.0, signs=2, fallback=True)["decision"] == "exact"
    assert judge_pilot(blocks, est, err, z=2.0, signs=2, fallback=True)["decision"] == "packed"
    rec = judge_pilot(blocks, est, err, z=4.0, signs=2, fallback=False, fallback_hvps=999)
    assert rec["decision"] == "packed" and "hvps >= 999" in rec["why"]


def test_plans_state_the_most_they_may_spend():
    # GPT-2 124M's 148 blocks at the default budget: packed, with a fallback of 6 exact entries per block
    sizes = [50257 * 768, 1024 * 768] + [768, 768, 768 * 2304, 2304, 768 * 768, 768, 768, 768, 768 * 3072, 3072,
                                         3072 * 768, 768] * 12 + [768, 768]
    assert len(sizes) == 148
    opts = {"budget": 1024, "exact_threshold": 1024, "k": 512, "top": 64, "screen_samples": 32, "signs": 2,
            "min_k": 24}
    plan = plan_rmed(sizes, pilot=8, **opts)
    fb = plan.fallback
    assert plan.mode == "packed" and plan.pilot == 8 and fb is not None and fb.mode == "exact"
    assert fb.k == FALLBACK_MIN_K and fb.screen == 32 and fb.hvps == 1024 - 16
    assert fb.pool == 1024 - 16 - 32 - 148 * (fb.k + fb.top) >= 0
    assert plan.hvps == max(plan.packed_hvps, 16 + fb.hvps) <= 1024
    # without a pilot the packed plan is today's, and a pilot does not change the packed reads' cost
    assert plan_rmed(sizes, pilot=0, **opts).hvps == plan.packed_hvps
    # 200 blocks: no fallback fits; the budget at which one does is what the pilot quotes
    plan = plan_rmed([5000] * 200, pilot=8, **opts)
    assert plan.fallback is None and plan.hvps == plan.packed_hvps
    need = fallback_budget([5000] * 200, k=512, top=64, screen_samples=32, signs=2, pilot=8)
    assert plan_fallback([5000] * 200, budget=need - 16, k=512, top=64, screen_samples=32) is not None
    assert plan_fallback([5000] * 200, budget=need - 17, k=512, top=64, screen_samples=32) is None


def test_bad_pilot_option_fails_with_one_clear_message():
    land = landscape(Quadratic(spd(10), [6, 4]))
    with pytest.raises(ConfigurationError, match="rmed needs an integer pilot >= 0, got pilot=-1"):
        rmed(land, pilot=-1)


# --------------------------------------------------------------------------------------- contaminated
def test_pilot_switches_to_exact_on_a_real_mlp_and_its_intervals_cover(mlp_hessian):
    H, sizes = mlp_hessian
    seeds = 40
    mv = lambda v: v @ H
    # min_k beyond reach forces the packed plan: the case of a model with too many blocks for the exact one
    rates, runs = _pilot_coverage(mv, torch.diagonal(H), sizes, seeds, hvps=256, min_k=10_000, **OPTS)
    for key, rate in rates.items():
        assert (rate >= _floor(seeds)).all(), (key, rate)
    # the MLP's contamination (median c ~0.13 per block) sits above the rule's 0.25 / z = 0.0625 in most pilots
    switched = [(res, spent) for res, spent in runs if res["pilot"]["decision"] == "exact"]
    assert len(switched) >= 0.85 * seeds, len(switched)
    for res, spent in runs:
        assert spent <= 256 and res["pilot"]["hvps"] == 16
        assert res["mode"] == res["pilot"]["decision"]
        assert (res["pilot"]["contaminated"] > len(sizes) / 2) == (res["mode"] == "exact")
    for res, _ in switched:
        # bounded where the exact entries are nonzero: the whole model and every block
        for r in [res] + list(res["blocks"].values()):
            assert r["median_ci"][0] > 0 and r["rmed_ci"][1] is not None and math.isfinite(r["rmed_ci"][1])
    # what the switch bought over the packed reads of the same budget (the same seeds, no pilot)
    _, packed = _pilot_coverage(mv, torch.diagonal(H), sizes, 10, hvps=256, min_k=10_000, pilot=0, **OPTS)
    width = lambda runs: np.median([math.inf if r["rmed_ci"][1] is None else r["rmed_ci"][1] / r["rmed_ci"][0]
                                    for r, _ in runs])
    assert all(r["mode"] == "packed" for r, _ in packed)
    assert width(switched) * 5 < width(packed), (width(switched), width(packed))


@pytest.mark.parametrize("seeds", [8, pytest.param(100, marks=pytest.mark.slow)])
def test_pilot_switches_with_six_exact_entries_per_block_on_150_coupled_blocks(seeds):
    # the GPT-2 regime: 150 blocks at the default budget leave ~6 exact entries per block after the pilot
    # (~3 s a seed, mostly the whole-model interval over 150 strata)
    mv, h, sizes = _coupled()
    rates, runs = _pilot_coverage(mv, h, sizes, seeds, bootstrap=100, level=LEVEL)
    for res, spent in runs:
        assert res["mode"] == "exact" and res["pilot"]["decision"] == "exact" and spent <= 1024
        assert res["pilot"]["median_contamination"] > 1.0      # contamination dominates the reads
        assert all(b["computed"] >= FALLBACK_MIN_K for b in res["blocks"].values())
        assert res["median_ci"][0] > 0 and math.isfinite(res["rmed_ci"][1])
        for b in res["blocks"].values():
            # six entries bound the median (2 * 0.5**6 < 0.05) but leave q99's ratio without an upper end
            assert b["median_ci"][0] > 0 and b["rmed_ci"][1] is not None and b["rmed_q99_ci"][1] is None
    whole = rates.pop("whole")
    assert (whole >= _floor(seeds)).all(), whole
    # 150 blocks x the seeds: the per-block rates pooled, against the binomial noise of that many trials
    pooled = np.mean(list(rates.values()), axis=0)
    assert (pooled >= _floor(seeds * len(rates))).all(), pooled


@pytest.mark.slow
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_pilot_exact_intervals_cover_over_many_seeds(net, mlp_hessian, cnn_hessian):
    H, sizes = mlp_hessian if net == "mlp" else cnn_hessian
    seeds = 200
    rates, runs = _pilot_coverage(lambda v: v @ H, torch.diagonal(H), sizes, seeds, hvps=128, min_k=10_000, **OPTS)
    assert all(r["mode"] == r["pilot"]["decision"] and s <= 128 for r, s in runs)
    # the CNN's contamination is far past the rule's threshold; the MLP's near it (most pilots switch)
    switched = sum(r["mode"] == "exact" for r, _ in runs) / seeds
    assert switched == 1.0 if net == "cnn" else switched >= 0.85, switched
    for key, rate in rates.items():
        assert (rate >= _floor(seeds)).all(), (key, rate)


# --------------------------------------------------------------------------------------- clean
def test_pilot_keeps_packed_reads_when_they_are_clean_and_reads_its_rows_once():
    # 200 blocks of a quadratic whose only coupling is a tiny first off-diagonal: packed reads are clean
    a, c = banded(20_000, seed=3, spread=1.0, coupling=1e-6)
    sizes = [100] * 200
    model = Quadratic(a, sizes, offdiag=c)
    land = landscape(model)
    before = land.hvps
    out = rmed(land, hvps=256, k=128, top=16, bootstrap=50, seed=0)
    plan = plan_rmed(sizes, budget=256, exact_threshold=1024, k=128, top=16, screen_samples=32, signs=2, min_k=24,
                     pilot=8)
    assert out["mode"] == "packed" and out["pilot"]["decision"] == "packed" and out["pilot"]["contaminated"] == 0
    # the pilot's rows are the packed reads' first rows: spent once, the packed plan's cost exactly
    assert out["hvps"] == land.hvps - before == plan.packed_hvps <= plan.hvps <= 256 and out["pilot"]["hvps"] == 16
    alone = rmed(landscape(model), hvps=256, k=128, top=16, bootstrap=50, seed=0, pilot=0)
    for key in ("rmed", "rmed_ci", "median_ci", "rmed_q99_ci", "hvps"):
        assert out[key] == alone[key], key
    assert "pilot" not in alone
    R, _ = exact_rmed(model.hessian_diagonal())
    assert out["rmed_ci"][0] <= R <= out["rmed_ci"][1] and out["median_ci"][0] > 0


def test_the_pilots_hvps_are_counted_once_and_the_plan_bounds_them():
    # a dense coupled quadratic of 30 blocks at 256 HVPs: packed by the plan, exact by the pilot
    sizes = [20] * 30
    model = Quadratic(spd(600, seed=4, cond=1e3), sizes)
    land = landscape(model)
    before = land.hvps
    out = rmed(land, hvps=256, bootstrap=50, seed=1)
    planned = plan_probe({"rmed": {"hvps": 256}}, land.space, dtype=F64)["rmed"]
    assert out["pilot"]["decision"] == "exact" and out["mode"] == "exact"
    assert out["hvps"] == land.hvps - before <= planned["hvps"] <= 256 and not planned["exact"]
    plan = plan_rmed(sizes, budget=256, exact_threshold=1024, k=512, top=64, screen_samples=32, signs=2, min_k=24,
                     pilot=8)
    fb = plan.fallback
    # the pilot's 16, then the fallback's own reads: sampled, screened, pooled candidates
    assert out["hvps"] == 16 + 30 * fb.k + fb.screen + sum(b["computed"] - fb.k for b in out["blocks"].values())
    R, _ = exact_rmed(model.hessian_diagonal())
    assert out["rmed_ci"][0] <= R <= out["rmed_ci"][1]
