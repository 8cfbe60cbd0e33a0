"""rmed and diagshare share their Hessian columns (docs/metrics.md#shared_work, metrics/_columns.py).

An exact diagonal entry of rmed is the HVP ``H e_j``, the column diagshare samples. Checked here: the per-block
orders both metrics draw their coordinates from (prefixes nest, every prefix a uniform sample); the store's
values against a dense float64 Hessian; in one probe each metric's estimate equals its solo estimate (same
seed) to float64 rounding, in either order and on rmed's exact, scaled and pilot-then-exact plans, for exactly
as many fewer HVPs as it received; the plan takes off the columns certain to be shared and stays an upper
bound; the intervals still cover the exact values over seeds with sharing on; a metric failing half way leaves
columns that serve the other unchanged."""

import math

import numpy as np
import pytest
import torch
from quadratic_models import Quadratic, covers, dense_share, exact_rmed, landscape
from test_budgeted_diagonal import _floor
from test_shared_work import assert_same, without_sharing
from tolerances import FLOAT32_REL, FLOAT64_EXACT, FLOAT64_REL
from torch import nn

import geomprobe as gp
from geomprobe.linalg.exact import dense_matrix
from geomprobe.metrics import diagshare, rmed
from geomprobe.metrics._budget import column_looks, plan_columns
from geomprobe.metrics._columns import WHOLE_PERMUTATION, ColumnReader, ColumnStore, block_order, draw_order_seed
from geomprobe.probe.progress import plan_probe

F64 = torch.float64
LEVEL = 0.95
# rmed on its exact plan with sampled blocks: blocks of <= k + top = 28 coordinates whole, the others 24 sampled
# + 4 screened; diagshare sampling (exact_threshold 0) up to 32 columns a block, every column of the budget
RMED = {"exact_threshold": 0, "k": 24, "top": 4, "screen_samples": 8, "bootstrap": 50}
DIAG = {"exact_threshold": 0, "k": 32, "hvps": 131, "bootstrap": 50, "rel_tol": 0}
# packed by the plan (budget), switched to exact entries by the pilot: the path GPT-2's 148 blocks take
PILOT = {**RMED, "hvps": 90, "min_k": 30, "pilot": 8}


class _Net(nn.Module):
    """Six blocks: weights of 240, 240 and 36 coordinates (sampled), biases of 20, 12 and 3 (read whole)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 20), nn.Linear(20, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _setting(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(64, 12, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    return _Net().double(), (X, y)


def _probe(metrics: dict, seed: int = 0) -> tuple[dict, dict]:
    model, data = _setting()
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), data, metrics=metrics, seed=seed, warm_start=False)
    record = probe.probe(0)
    probe.close()
    assert "errors" not in record, record.get("errors")
    return record, probe.cost_plan


def _blocks(sizes):
    starts = np.cumsum([0] + list(sizes))
    return [type("B", (), {"name": f"b{j}", "start": int(starts[j]), "stop": int(starts[j + 1]), "size": n})()
            for j, n in enumerate(sizes)]


# ------------------------------------------------------------------------------------------- the orders
@pytest.mark.parametrize("size", [300, WHOLE_PERMUTATION + 1], ids=["permutation", "stream"])
def test_block_orders_nest_and_depend_on_the_seed_and_the_block_alone(size):
    a, b = _blocks([50, size])
    long, short = block_order(7, b, 400), block_order(7, b, 40)
    assert len(long) == min(400, size) and len(set(long.tolist())) == len(long)  # distinct coordinates
    assert (long[:40] == short).all() and long.min() >= 0 and long.max() < size
    twin = type("B", (), {"name": "other", "start": b.start, "stop": b.stop, "size": size})()
    assert (block_order(7, twin, 40) == short).all()  # where the block lies and its size, not its name
    assert not (block_order(8, b, 40) == short).all()
    assert len(block_order(7, a, 10**6)) == 50  # a prefix longer than the block is the whole block
    assert sorted(block_order(7, a, 50).tolist()) == list(range(50))


@pytest.mark.parametrize("size", [40, WHOLE_PERMUTATION + 40], ids=["permutation", "stream"])
def test_every_position_of_a_block_order_is_uniform(size):
    # 4,000 seeds: the 1st and 5th coordinates of the order, in 8 equal bins, against the uniform law (chi-square
    # with 7 degrees of freedom: 24.3 is its 0.999 quantile)
    (b,) = _blocks([size])
    first = np.array([block_order(s, b, 5) for s in range(4000)])
    for pos in (0, 4):
        counts = np.bincount(first[:, pos] * 8 // size, minlength=8)
        chi2 = float(((counts - 500.0) ** 2 / 500.0).sum())
        assert chi2 < 24.3, (pos, counts)


def test_the_order_seed_is_the_generators_first_draw():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert draw_order_seed(g1) == draw_order_seed(g2) != draw_order_seed(torch.Generator().manual_seed(4))


# ------------------------------------------------------------------------------------------- the store
def test_stored_columns_are_the_dense_hessians_diagonal_and_block_masses():
    model, data = _setting()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data)
    H = dense_matrix(land.hvp, land.dim, batch=64)
    reader = ColumnReader.on(land, "rmed")
    idx = np.array([3, 250, 400, 3, 530, 260])  # a repeat is read once
    before = land.hvps
    h, mass = reader.read(idx)
    assert land.hvps - before == 5 == reader.spent and reader.received == {}
    assert np.allclose(h, torch.diagonal(H)[idx].numpy(), rtol=0, atol=FLOAT64_EXACT)
    for i, j in enumerate(idx):
        expect = [float(H[j, b.start : b.stop].abs().sum()) for b in land.space.blocks]
        assert np.allclose(mass[i], expect, rtol=FLOAT64_EXACT, atol=0)
    other = ColumnReader.on(land, "diagshare")
    h2, mass2 = other.read(np.array([250, 1, 3]))
    assert other.spent == 1 and other.received == {"rmed": 2} and land.hvps - before == 6
    assert h2[0] == h[1] and (mass2[2] == mass[0]).all()
    assert isinstance(land.results[("hessian columns",)], ColumnStore)


def test_float32_columns_sum_their_block_masses_in_float32_within_rounding():
    # below float64 the block norms accumulate in float32 (no float64 copy of each slice): within FLOAT32_REL of
    # the float64 Hessian, and diagshare after rmed is still its solo self on a float32 model
    model, data = _setting()
    H = dense_matrix(gp.Landscape(model, nn.CrossEntropyLoss(), data).hvp, 551, batch=64)
    model32, data32 = model.float(), (data[0].float(), data[1])
    land = gp.Landscape(model32, nn.CrossEntropyLoss(), data32)
    reader = ColumnReader.on(land, "diagshare")
    idx = np.array([5, 300, 520])
    h, mass = reader.read(idx)
    assert mass.dtype == np.float64 and np.allclose(h, torch.diagonal(H)[idx].numpy(), rtol=FLOAT32_REL, atol=1e-6)
    for i, j in enumerate(idx):
        expect = [float(H[j, b.start : b.stop].abs().sum()) for b in land.space.blocks]
        assert np.allclose(mass[i], expect, rtol=FLOAT32_REL, atol=1e-6)
    land = gp.Landscape(model32, nn.CrossEntropyLoss(), data32)
    rmed(land, **RMED)
    ds = diagshare(land, **DIAG)
    alone = diagshare(gp.Landscape(model32, nn.CrossEntropyLoss(), data32), **DIAG)
    assert ds["shared"] == ["hessian columns from rmed"] and ds["hvps"] < alone["hvps"]
    assert ds["diagshare"] == pytest.approx(alone["diagshare"], rel=FLOAT32_REL)
    assert ds["diagshare_ci"] == pytest.approx(alone["diagshare_ci"], rel=FLOAT32_REL)


def test_a_refused_call_leaves_no_store():
    model, data = _setting()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(gp.ConfigurationError):
        diagshare(land, hvps=3)  # fewer columns than blocks
    with pytest.raises(gp.ConfigurationError):
        rmed(land, k=1)
    assert land.hvps == 0 and land.results == {}


# ------------------------------------------------------------------------------------------- in one probe
@pytest.mark.parametrize("rmed_opts", [RMED, {**RMED, "hvps": 100, "min_k": 8}, PILOT], ids=["exact", "scaled", "pilot-exact"])
@pytest.mark.parametrize("first", ["rmed", "diagshare"])
def test_each_metric_gets_its_solo_estimate_for_exactly_the_hvps_it_did_not_receive(rmed_opts, first):
    options = {"rmed": rmed_opts, "diagshare": DIAG}
    order = [first, "diagshare" if first == "rmed" else "rmed"]
    full, plan = _probe({m: options[m] for m in order})
    alone = {m: _probe({m: options[m]})[0][m] for m in order}
    assert full["rmed"]["mode"] == "exact" and not full["rmed"]["exact"]
    assert (full["rmed"].get("pilot", {}).get("decision") == "exact") == (rmed_opts is PILOT)
    second = order[1]
    assert "shared" not in full[first] and full[first]["hvps"] == alone[first]["hvps"]
    # same seed, same coordinates, the same values up to HVPs batched with other vectors
    for m in order:
        assert_same(without_sharing(full[m]), without_sharing(alone[m]), m)
    got = full[second]["shared_hvps"]["hessian columns"]
    assert full[second]["shared"] == [f"hessian columns from {first}"]
    assert full[second]["hvps"] == alone[second]["hvps"] - got
    assert full["cost"]["hvps"] == full["rmed"]["hvps"] + full["diagshare"]["hvps"]  # every HVP counted once
    # what is certainly shared: whole blocks (20 + 12 + 3) and, of the three sampled blocks, the shorter prefix:
    # rmed's k (24, or the scaled k) inside diagshare's 32; screened candidates may add a few more
    k = 24 if rmed_opts is RMED else None
    if k is not None:
        assert 35 + 3 * k <= got <= 35 + 3 * k + 3 * rmed_opts["top"]
    assert got >= 35 + 3 * 6  # the fallback's fewest sampled entries
    # the plan is an upper bound that counts the certain part once (none when rmed's pilot may keep packed reads)
    for m in order:
        assert full[m]["hvps"] <= plan[m]["hvps"], (m, full[m]["hvps"], plan[m])
    if rmed_opts is RMED:
        assert plan[second]["shared"] == [f"hessian columns from {first}"] and not plan[second]["exact"]
        assert plan[second]["shared_hvps"] == {"hessian columns": 35 + 3 * 24}
        assert plan[second]["hvps"] == (131 if second == "diagshare" else 127) - (35 + 3 * 24)
    elif rmed_opts is PILOT:
        assert "shared" not in plan[second]


def test_the_plan_counts_a_stopping_diagshare_by_its_first_look():
    model, data = _setting()
    space = gp.GeometryProbe(model, nn.CrossEntropyLoss(), data).space
    sizes = [b.size for b in space.blocks]
    stopping = {**DIAG, "rel_tol": 0.2}
    first_look = column_looks(sizes, budget=131, k=32)[0]
    plan = plan_probe({"diagshare": stopping, "rmed": RMED}, space, dtype=F64)
    certain = sum(min(24 if n > 28 else n, c) for n, c in zip(sizes, first_look))
    assert plan["rmed"]["shared_hvps"] == {"hessian columns": certain} and plan["rmed"]["hvps"] == 127 - certain
    assert plan["diagshare"]["hvps"] == sum(plan_columns(sizes, budget=131, k=32)) and "shared" not in plan["diagshare"]
    # other seeds draw other orders: nothing planned (a column met by chance is still reused, never planned)
    apart = plan_probe({"rmed": {**RMED, "seed": 1}, "diagshare": DIAG}, space, dtype=F64)
    assert "shared" not in apart["diagshare"] and apart["diagshare"]["hvps"] == 131 and apart["diagshare"]["exact"]


def test_diagshares_dense_path_hands_rmed_every_entry():
    # d = 551 <= exact_threshold: diagshare reads every column for its dense Hessian and stores them; rmed,
    # reading every entry of every block (its default exact plan), then spends nothing
    model, data = _setting()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data)
    ds = diagshare(land)
    r = rmed(land)
    assert ds["exact"] and ds["hvps"] == 551 and r["exact"] and r["hvps"] == 0
    assert r["shared"] == ["hessian columns from diagshare"] and r["shared_hvps"] == {"hessian columns": 551}
    assert_same(without_sharing(r), without_sharing(rmed(gp.Landscape(model, nn.CrossEntropyLoss(), data))))
    # the other way round the dense path takes nothing (it needs whole columns) and says so by saying nothing
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data)
    rmed(land)
    again = diagshare(land)
    assert again["hvps"] == 551 and "shared" not in again


def test_different_seeds_share_only_what_they_meet_and_stay_their_solo_selves():
    model, data = _setting()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data)
    r = rmed(land, **RMED, seed=1)
    ds = diagshare(land, **DIAG, seed=0)
    alone = diagshare(gp.Landscape(model, nn.CrossEntropyLoss(), data), **DIAG, seed=0)
    assert_same(without_sharing(ds), without_sharing(alone))
    got = ds.get("shared_hvps", {}).get("hessian columns", 0)
    assert 35 <= got < 35 + 3 * 24 and ds["hvps"] == alone["hvps"] - got  # whole blocks, and chance meetings
    assert r["hvps"] == 127


def test_columns_read_before_a_failure_serve_the_other_metric_unchanged():
    model, data = _setting()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data)
    inner, calls = land.hvp, []

    def failing(v):
        calls.append(v.reshape(-1, land.dim).shape[0])
        if len(calls) > 3:  # after three chunks of columns
            raise RuntimeError("boom")
        return inner(v)

    land.hvp = failing
    with pytest.raises(RuntimeError, match="boom"):
        rmed(land, **RMED)
    land.hvp = inner
    stored = len(land.results[("hessian columns",)].index)
    assert stored == sum(calls[:3]) > 2 * land.chunk_size  # the first chunk may be short (aligned to the top)
    ds = diagshare(land, **DIAG)
    alone = diagshare(gp.Landscape(model, nn.CrossEntropyLoss(), data), **DIAG)
    assert_same(without_sharing(ds), without_sharing(alone))
    assert 0 < ds["shared_hvps"]["hessian columns"] <= stored and ds["shared"] == ["hessian columns from rmed"]


# ------------------------------------------------------------------------------------------- coverage
def _shared_coverage(H: torch.Tensor, sizes: list[int], seeds: int, rmed_hvps: int, ds_hvps: int) -> dict:
    """Coverage rates with sharing on: rmed (its scaled exact plan) and diagshare on one Landscape, rmed first
    on even seeds and diagshare first on odd ones. Keys: rmed's (R_med, R_q99, median) per piece, diagshare's
    (whole, block-diagonal, per block)."""
    land_of = Quadratic(H, sizes)
    h = torch.diagonal(H)
    starts = np.cumsum([0] + sizes)
    pieces = {"whole": h} | {f"w{j}": h[starts[j] : starts[j + 1]] for j in range(len(sizes))}
    truth = {key: (*exact_rmed(x), float(np.median(x.abs()))) for key, x in pieces.items()}
    delta, per, bd = dense_share(H, sizes)
    hits = {key: np.zeros(3) for key in truth}
    ds_hits = np.zeros(2 + len(sizes))
    received = 0
    for s in range(seeds):
        land = landscape(land_of)
        calls = [("rmed", {"hvps": rmed_hvps, "k": 64, "top": 8, "screen_samples": 16, "min_k": 24}),
                 ("diagshare", {"hvps": ds_hvps, "rel_tol": 0})]
        out = {}
        for name, opts in (calls if s % 2 == 0 else calls[::-1]):
            fn = rmed if name == "rmed" else diagshare
            out[name] = fn(land, bootstrap=100, level=LEVEL, seed=s, **opts)
        r, ds = out["rmed"], out["diagshare"]
        assert r["mode"] == "exact" and not r["exact"] and not ds["exact"]
        received += sum(x.get("shared_hvps", {}).get("hessian columns", 0) for x in (r, ds))
        for key, res in [("whole", r)] + list(r["blocks"].items()):
            R, Q, med = truth[key]
            hi, qhi = res["rmed_ci"][1], res["rmed_q99_ci"][1]
            hits[key] += [res["rmed_ci"][0] <= R <= (math.inf if hi is None else hi),
                          res["rmed_q99_ci"][0] <= Q <= (math.inf if qhi is None else qhi),
                          res["median_ci"][0] <= med <= res["median_ci"][1]]
        ds_hits[0] += covers(ds["diagshare_ci"], delta, rel=FLOAT64_REL)
        ds_hits[1] += covers(ds["blockdiag_share_ci"], bd, rel=FLOAT64_REL)
        for j, x in enumerate(per):
            ds_hits[2 + j] += covers(ds["blocks"][f"w{j}"]["diagshare_ci"], x, rel=FLOAT64_REL)
    assert received > 0  # sharing was on
    return {key: v / seeds for key, v in hits.items()} | {"diagshare": ds_hits / seeds}


def test_intervals_cover_with_sharing_on_a_real_mlp(mlp_hessian):
    # the digits MLP (blocks of 1024, 16, 160, 10; dense float64 Hessian): rmed's 112 HVPs read ~30 exact entries
    # a block, diagshare's 24 columns are 6 a block, all inside rmed's prefixes
    H, sizes = mlp_hessian
    seeds = 60
    for key, rate in _shared_coverage(H, sizes, seeds, rmed_hvps=112, ds_hvps=24).items():
        assert (rate >= _floor(seeds)).all(), (key, rate)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_intervals_cover_with_sharing_over_many_seeds(net, mlp_hessian, cnn_hessian):
    # diagshare's budget larger than rmed's sample on some blocks: both top up
    H, sizes = mlp_hessian if net == "mlp" else cnn_hessian
    seeds = 200
    for key, rate in _shared_coverage(H, sizes, seeds, rmed_hvps=112, ds_hvps=12 * len(sizes)).items():
        assert (rate >= _floor(seeds)).all(), (key, rate)
