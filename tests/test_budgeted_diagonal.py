"""rmed and diagshare within a budget of HVPs: plans, packed reads, and coverage on real small networks.

References are exact: dense float64 Hessians of a digits MLP and a small CNN (computed once per module), and
tridiagonal quadratics with 200 blocks. Coverage is checked over seeds against the binomial noise of the
stated level."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from quadratic_models import Quadratic, banded, covers, dense_share, exact_rmed, landscape, spd
from tolerances import COVERAGE_SIGMAS, FLOAT64_EXACT, FLOAT64_REL, PACKED_CALIBRATION
from torch import nn

from geomprobe import ConfigurationError, Landscape
from geomprobe.linalg.diagonal import packed_diagonal
from geomprobe.linalg.exact import dense_matrix
from geomprobe.metrics import diagshare, get, rmed
from geomprobe.metrics._budget import plan_columns, plan_rmed
from geomprobe.metrics._common import t_quantile
from geomprobe.metrics.rmed import diagonal_ratios

F64 = torch.float64
LEVEL = 0.95


def _floor(n: int, level: float = LEVEL) -> float:
    return level - COVERAGE_SIGMAS * math.sqrt(level * (1 - level) / n)


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16, 10)

    def forward(self, x):
        x = torch.tanh(self.c1(x.view(-1, 1, 8, 8)))
        return self.fc(F.avg_pool2d(torch.tanh(self.c2(x)), 2).flatten(1))


def _network_hessian(kind: str) -> tuple[torch.Tensor, list[int]]:
    """The dense float64 Hessian of a briefly trained digits network and its block sizes."""
    from geomprobe.demo.data import load_digits_tensors

    torch.manual_seed(0)
    X, y, _, _ = load_digits_tensors(dtype=F64)
    n = 256 if kind == "mlp" else 64
    model = (nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)) if kind == "mlp" else _SmallCNN()).double()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(X[:n]), y[:n]).backward()
        opt.step()
    land = Landscape(model, nn.CrossEntropyLoss(), (X[:n], y[:n]))
    return dense_matrix(land.hvp, land.dim, batch=64), [b.size for b in land.space.blocks]



# ------------------------------------------------------------------------------------------- packed reads
def test_packed_reads_are_exact_without_coupling_and_for_single_coordinates():
    A = spd(30, seed=1)
    rows = torch.arange(30).reshape(30, 1)                     # one coordinate per row: no contamination
    est, err = packed_diagonal(lambda v: v @ A, 30, rows, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est[:, 0], torch.diagonal(A), rtol=0, atol=FLOAT64_EXACT) and err.abs().max() == 0
    D = torch.diag(torch.arange(1.0, 31.0, dtype=F64))        # diagonal: packing is free
    rows = torch.tensor([[0, 7, 13, -1], [29, 3, -1, -1]])     # padding must not disturb coordinate 0
    est, err = packed_diagonal(lambda v: v @ D, 30, rows, generator=torch.Generator().manual_seed(0))
    assert est.tolist() == [[1.0, 8.0, 14.0, 0.0], [30.0, 4.0, 0.0, 0.0]] and err.abs().max() == 0


def test_packed_error_is_calibrated_against_the_exact_contamination():
    g = torch.Generator().manual_seed(2)
    A = spd(200, seed=3) + 0.5 * torch.randn(200, 200, generator=g, dtype=F64)
    A = (A + A.T) / 2
    rows = torch.stack([torch.randperm(200, generator=g)[:20] for _ in range(2000)])
    est, err = packed_diagonal(lambda v: v @ A, 200, rows, generator=g)
    e = est - torch.diagonal(A)[rows]
    ratio = float((e**2).mean() / (err**2).mean())
    assert PACKED_CALIBRATION[0] <= ratio <= PACKED_CALIBRATION[1]
    assert abs(float(e.mean())) <= 4 * float(e.std()) / math.sqrt(e.numel())   # zero in mean over the signs


def test_packed_reads_reject_bad_input():
    mv = lambda v: v
    with pytest.raises(ConfigurationError, match="needs signs >= 2"):
        packed_diagonal(mv, 5, torch.zeros(1, 1, dtype=torch.long), signs=1)
    with pytest.raises(ConfigurationError, match=r"rows must be an \(R, m\) index tensor"):
        packed_diagonal(mv, 5, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigurationError, match=r"coordinates must lie in \[0, 5\)"):
        packed_diagonal(mv, 5, torch.tensor([[1, 5]]))


# ------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("n_blocks, mode", [(1, "exact"), (7, "exact"), (200, "packed")])
def test_rmed_never_spends_more_than_its_budget(n_blocks, mode):
    sizes = [20_000 // n_blocks] * n_blocks
    a, c = banded(sum(sizes), seed=n_blocks, spread=1.0, coupling=0.3)
    land = landscape(Quadratic(a, sizes, offdiag=c))
    before = land.hvps
    out = rmed(land, hvps=256, k=128, top=16, bootstrap=50, seed=0)
    assert out["hvps"] == land.hvps - before <= 256 and out["budget"] == 256 and out["mode"] == mode
    assert len(out["blocks"]) == n_blocks and all(b["computed"] >= 3 for b in out["blocks"].values())
    h = land.model.hessian_diagonal()
    assert covers(out["rmed_ci"], exact_rmed(h)[0]) and covers(out["rmed_q99_ci"], exact_rmed(h)[1])
    for size in (60, 600):     # the default budget over 200 blocks, by the plan's arithmetic
        plan = plan_rmed([size] * 200, budget=1024, exact_threshold=1024, k=512, top=64, screen_samples=32,
                         signs=2, min_k=24)
        assert plan.mode == "packed" and plan.hvps <= 1024 and plan.rows_sample >= min(size, 400)


def test_rmed_plan_prefers_exact_entries_while_they_buy_min_k():
    opts = {"budget": 1024, "exact_threshold": 1024, "k": 512, "top": 64, "screen_samples": 32, "signs": 2}
    # 4 blocks of 3000: the full layout costs 4 * 576 + 32; scaled down it still buys >= 24 exact entries each
    plan = plan_rmed([3000] * 4, min_k=24, **opts)
    assert plan.mode == "exact" and plan.hvps <= 1024 and plan.k >= 200 and plan.top >= 1
    # 29 blocks, most under exact_threshold (a small transformer): sampled exactly, the small ones too
    plan = plan_rmed([3000] * 4 + [32] * 20 + [1024] * 5, min_k=24, **opts)
    assert plan.mode == "exact" and plan.hvps <= 1024 and plan.k >= 24 and plan.threshold == 0
    assert plan.exact_blocks == tuple(n <= plan.k + plan.top for n in [3000] * 4 + [32] * 20 + [1024] * 5)
    # 40 such blocks cannot: packed rows read all of them at once
    plan = plan_rmed([3000] * 40, min_k=24, **opts)
    assert plan.mode == "packed" and plan.hvps <= 1024 and plan.rows_sample >= 400 and plan.rows_cand >= 40
    # a small model keeps its exact path at the default budget (existing exactness tests rely on it)
    assert plan_rmed([60], min_k=24, **opts).hvps == 60


def test_rmed_scaled_exact_plan_covers_the_truth():
    a, c = banded(12_000, seed=9, spread=1.0, coupling=0.3)
    model = Quadratic(a, [3000] * 4, offdiag=c)
    out = rmed(landscape(model), seed=0)
    h = model.hessian_diagonal()
    assert out["mode"] == "exact" and out["hvps"] <= 1024 and not out["exact"]
    assert covers(out["rmed_ci"], exact_rmed(h)[0]) and covers(out["rmed_q99_ci"], exact_rmed(h)[1])


@pytest.mark.parametrize("n_blocks", [3, 200])
def test_diagshare_never_spends_more_than_its_budget(n_blocks):
    sizes = [6000 // n_blocks] * n_blocks
    a, c = banded(sum(sizes), seed=4)
    land = landscape(Quadratic(a, sizes, offdiag=c))
    before = land.hvps
    out = diagshare(land, hvps=500, bootstrap=20, seed=0)
    assert out["hvps"] == land.hvps - before <= 500 and out["budget"] == 500
    cols = [b["columns"] for b in out["blocks"].values()]
    assert len(cols) == n_blocks and min(cols) >= 2 and max(cols) - min(cols) <= 1


def test_column_plan_water_fills():
    assert plan_columns([10, 5000, 5000], budget=1024, k=256) == [10, 256, 256]
    assert plan_columns([10, 5000, 5000], budget=100, k=256) == [10, 45, 45]
    cols = plan_columns([3, 900, 800, 700], budget=101, k=256)
    assert sum(cols) == 101 and cols[0] == 3 and max(cols[1:]) - min(cols[1:]) <= 1


# ------------------------------------------------------------------------------------------- coverage
def _rmed_coverage(H: torch.Tensor, sizes: list[int], seeds: int, budget: int, mode: str = "packed",
                   min_k: int = 10_000, pilot: int = 0) -> dict[str, np.ndarray]:
    # pilot 0: the packed reads themselves, which a pilot would replace by exact ones on these networks
    # (their coverage with the pilot: tests/test_rmed_pilot.py)
    h = torch.diagonal(H)
    starts = np.cumsum([0] + sizes)
    truth = {"whole": exact_rmed(h)}
    truth.update({f"b{j}": exact_rmed(h[starts[j] : starts[j + 1]]) for j in range(len(sizes))})
    med = {"whole": float(np.median(h.abs()))}
    med.update({f"b{j}": float(np.median(h[starts[j] : starts[j + 1]].abs())) for j in range(len(sizes))})
    blocks = [type("B", (), {"name": f"b{j}", "start": int(starts[j]), "stop": int(starts[j + 1]), "size": n})()
              for j, n in enumerate(sizes)]
    hits = {key: np.zeros(3) for key in truth}
    for s in range(seeds):
        (res,), spent = diagonal_ratios(lambda v: v @ H, H.shape[0], blocks, hvps=budget, k=64, top=8,
                                        screen_samples=16, bootstrap=100, level=LEVEL, min_k=min_k, pilot=pilot,
                                        generator=torch.Generator().manual_seed(s))
        assert spent <= budget and res["mode"] == mode
        for key, r in [("whole", res)] + list(res["blocks"].items()):
            (R, Q), (lo, hi), (qlo, qhi) = truth[key], r["rmed_ci"], r["rmed_q99_ci"]
            hits[key] += [lo <= R <= (math.inf if hi is None else hi), qlo <= Q <= (math.inf if qhi is None else qhi),
                          r["median_ci"][0] <= med[key] <= r["median_ci"][1]]
    return {key: v / seeds for key, v in hits.items()}


def test_packed_rmed_intervals_cover_on_a_real_mlp(mlp_hessian):
    H, sizes = mlp_hessian
    seeds = 60
    for key, rate in _rmed_coverage(H, sizes, seeds, budget=256).items():
        assert (rate >= _floor(seeds)).all(), (key, rate)


def test_scaled_exact_rmed_intervals_cover_on_a_real_mlp(mlp_hessian):
    # 112 HVPs over blocks of 1024, 16, 160, 10: ~30 exact entries per block, the small ones sampled too
    H, sizes = mlp_hessian
    seeds = 60
    for key, rate in _rmed_coverage(H, sizes, seeds, budget=112, mode="exact", min_k=24).items():
        assert (rate >= _floor(seeds)).all(), (key, rate)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_packed_rmed_intervals_cover_over_many_seeds(net, mlp_hessian, cnn_hessian):
    H, sizes = mlp_hessian if net == "mlp" else cnn_hessian
    seeds = 200
    for key, rate in _rmed_coverage(H, sizes, seeds, budget=128).items():
        assert (rate >= _floor(seeds)).all(), (key, rate)


def _diagshare_coverage(H: torch.Tensor, sizes: list[int], seeds: int, budget: int) -> np.ndarray:
    land = landscape(Quadratic(H, sizes))
    delta, per, bd = dense_share(H, sizes)
    hits = np.zeros(2 + len(sizes))
    for s in range(seeds):
        out = diagshare(land, hvps=budget, bootstrap=100, level=LEVEL, seed=s)
        assert out["hvps"] <= budget and not out["exact"]
        hits[0] += covers(out["diagshare_ci"], delta, rel=FLOAT64_REL)
        hits[1] += covers(out["blockdiag_share_ci"], bd, rel=FLOAT64_REL)
        for j, x in enumerate(per):
            hits[2 + j] += covers(out["blocks"][f"w{j}"]["diagshare_ci"], x, rel=FLOAT64_REL)
    return hits / seeds


def test_budgeted_diagshare_intervals_cover_on_a_real_mlp(mlp_hessian):
    # 24 columns over 4 blocks: 6 per block, the footing of a 150-block model at the default budget
    H, sizes = mlp_hessian
    seeds = 60
    rate = _diagshare_coverage(H, sizes, seeds, budget=24)
    assert (rate >= _floor(seeds)).all(), rate


@pytest.mark.slow
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_budgeted_diagshare_intervals_cover_over_many_seeds(net, mlp_hessian, cnn_hessian):
    H, sizes = mlp_hessian if net == "mlp" else cnn_hessian
    seeds = 200
    rate = _diagshare_coverage(H, sizes, seeds, budget=8 * len(sizes))
    assert (rate >= _floor(seeds)).all(), rate


# ------------------------------------------------------------------------------------------- options
def test_bad_budget_options_fail_with_one_clear_message():
    land = landscape(Quadratic(spd(10), [6, 4]))
    with pytest.raises(ConfigurationError, match="rmed needs an integer hvps >= 1, got hvps=0"):
        rmed(land, hvps=0)
    with pytest.raises(ConfigurationError, match="rmed needs an integer signs >= 2, got signs=1"):
        rmed(land, signs=1)
    with pytest.raises(ConfigurationError, match="rmed needs an integer hvps >= 1, got hvps=2.5"):
        rmed(land, hvps=2.5)
    a, c = banded(4000, seed=1)
    big = landscape(Quadratic(a, [2000, 2000], offdiag=c))
    with pytest.raises(ConfigurationError, match="budget hvps=20 buys fewer than 3 packed rows.*at least 38"):
        rmed(big, hvps=20)
    with pytest.raises(ConfigurationError, match="diagshare needs an integer budget hvps >= 1, got hvps=0"):
        diagshare(land, hvps=0)
    with pytest.raises(ConfigurationError, match="cannot give each of the 2 selected blocks one column"):
        diagshare(landscape(Quadratic(spd(10), [6, 4])), hvps=1, exact_threshold=0)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 30, 200):
        for p in (0.9, 0.975, 0.9995):
            assert t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=FLOAT64_REL)
    with pytest.raises(ConfigurationError, match="t_quantile needs 0.5 < p < 1 and an integer df >= 1"):
        t_quantile(0.975, 0)


def test_registered_costs_state_the_budget():
    assert "hvps" in get("rmed").cost and "1024" in get("rmed").cost
    assert "hvps" in get("diagshare").cost and "1024" in get("diagshare").cost


def test_stratified_quantile_interval():
    from geomprobe.metrics._common import stratified_quantile_ci, weighted_quantile

    g = np.random.default_rng(0)
    a, b = g.lognormal(size=300), g.lognormal(1.0, size=50)
    # whole strata: no sampling error, the interval collapses on the population quantile
    q = weighted_quantile(np.concatenate([a, b]), np.ones(350), 0.5)
    assert stratified_quantile_ci([(a, 300, True), (b, 50, True)], 0.5, LEVEL) == (q, q)
    # sampled strata: coverage of the population median over draws
    pop = [g.lognormal(size=5000), g.lognormal(2.0, size=500)]
    truth = weighted_quantile(np.concatenate(pop), np.ones(5500), 0.5)
    seeds = 200
    hits = 0
    for _ in range(seeds):
        strata = [(g.choice(p, 30, replace=False), len(p), False) for p in pop]
        lo, hi = stratified_quantile_ci(strata, 0.5, LEVEL)
        hits += lo <= truth <= hi
    assert hits / seeds >= _floor(seeds)
