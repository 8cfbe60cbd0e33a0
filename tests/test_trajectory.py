"""Trajectory analytics (issue 11): the (L0, L1) envelope of docs/metrics.md#smoothness and the edge-of-stability
crossing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import ENVELOPE_REL, FLOAT64_EXACT, LP_OBJECTIVE_REL

from geomprobe.errors import ConfigurationError
from geomprobe.runs.reader import RunReader
from geomprobe.runs.writer import RunWriter
from geomprobe.trajectory.edge_of_stability import edge_of_stability, stability_threshold
from geomprobe.trajectory.smoothness import MIN_FIT_POINTS, fit_l0_l1, smoothness_fit, spearman

# ------------------------------------------------------------------------------------ (L0, L1) fit


def x4_trajectory(x0: float = 1.5, eta: float = 0.01, steps: int = 40) -> np.ndarray:
    """Gradient descent on f(x) = x**4: x <- x - eta * 4 x**3."""
    xs = [x0]
    for _ in range(steps - 1):
        xs.append(xs[-1] - eta * 4 * xs[-1] ** 3)
    return np.asarray(xs)


def test_x4_points_lie_on_the_curve_and_the_envelope_bounds_them_tight_at_two():
    x = x4_trajectory()
    G, L = np.abs(4 * x**3), 12 * x**2   # |f'(x)|, f''(x)
    np.testing.assert_allclose(L, 12 * (G / 4) ** (2 / 3), rtol=FLOAT64_EXACT)
    fit = fit_l0_l1(G, L)
    assert fit.points == len(x) and fit.L0 >= 0 and fit.L1 >= 0
    assert (fit.envelope(G) >= L - ENVELOPE_REL * L.max()).all()
    assert len(fit.tight) == 2
    np.testing.assert_allclose(fit.envelope(G[list(fit.tight)]), L[list(fit.tight)], rtol=ENVELOPE_REL)
    assert fit.spearman == pytest.approx(1.0)  # both shrink together along the trajectory


def test_x4_fit_from_a_run_matches_the_arrays(tmp_path):
    x = x4_trajectory()
    with RunWriter(tmp_path / "x4", {"model": "x^4"}) as w:
        for t, xt in enumerate(x):
            h = 12 * xt**2  # the 1-D Hessian: lambda_max = lambda_min
            w.append({"step": t, "loss": xt**4, "grad_norm": abs(4 * xt**3),
                      "spectrum": {"lambda_max": h, "lambda_min": h}})
    fit = smoothness_fit(RunReader(tmp_path / "x4").records)
    direct = fit_l0_l1(np.abs(4 * x**3), 12 * x**2)
    assert (fit.L0, fit.L1, fit.tight) == (direct.L0, direct.L1, direct.tight)
    assert fit.to_dict()["tight_steps"] == [int(t) for t in fit.tight]


def test_the_exact_solution_is_the_lp_optimum():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    clouds = [
        (rng.uniform(0, 5, 30), rng.uniform(1, 10, 30)),               # generic
        (np.linspace(0.1, 3, 20), 10 - np.linspace(0.1, 3, 20)),        # falling: L1 = 0 binds
        (np.linspace(1, 4, 15), 2.0 * np.linspace(1, 4, 15) ** 1.5),    # convex through ~0: L0 = 0 binds
        (np.array([0.0, 1.0, 2.0, 2.0]), np.array([1.0, 3.0, 2.0, 4.0])),  # repeated G and G = 0
    ]
    for G, L in clouds:
        fit = fit_l0_l1(G, L)
        lp = optimize.linprog(c=[len(G), G.sum()], A_ub=-np.column_stack([np.ones_like(G), G]), b_ub=-L,
                              bounds=[(0, None), (0, None)], method="highs")
        assert lp.status == 0
        ours = len(G) * fit.L0 + G.sum() * fit.L1
        assert ours == pytest.approx(lp.fun, rel=LP_OBJECTIVE_REL)
        assert (fit.envelope(G) >= L - ENVELOPE_REL * L.max()).all()


def test_too_few_points_say_how_many_are_needed():
    with pytest.raises(ConfigurationError, match=f"at least {MIN_FIT_POINTS}.*got 2"):
        fit_l0_l1([1.0, 2.0, float("nan")], [3.0, 4.0, 5.0])
    records = [{"step": 0, "grad_norm": 1.0, "spectrum": {"lambda_max": 2.0}}, {"step": 1, "loss": 0.5}]
    with pytest.raises(ConfigurationError, match="too few iterates.*got 1"):
        smoothness_fit(records)


def test_spearman_with_ties_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = [1, 2, 2, 3, 5, 5, 5, 8]
    y = [2, 1, 4, 4, 3, 9, 9, 7]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=FLOAT64_EXACT)
    assert np.isnan(spearman([1, 2], [3, 4])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------------------------ edge of stability

LAMBDAS = np.array([4.0, 1.0, 0.25])  # H = diag(LAMBDAS): lambda_max = 4, so GD is stable for eta < 0.5


def gd_records(etas: list[float]) -> tuple[list[dict], np.ndarray]:
    """Gradient descent on f(w) = 1/2 w^T H w with step eta_t, probed at every step; returns records, losses."""
    H = np.diag(LAMBDAS)
    lam_max = float(np.linalg.eigvalsh(H).max())
    w = np.ones(len(LAMBDAS))
    records, losses = [], []
    for t, eta in enumerate(etas):
        g = H @ w
        loss = 0.5 * w @ H @ w
        losses.append(loss)
        records.append({"step": t, "loss": loss, "grad_norm": float(np.linalg.norm(g)), "lr": [eta],
                        "spectrum": {"lambda_max": lam_max, "lambda_max_err": 0.0, "lambda_min": 0.25}})
        w = w - eta * g
    return records, np.asarray(losses)


SGD_META = {"optimizer": "SGD", "optimizer_hparams": [{"lr": 0.1, "momentum": 0.0, "dampening": 0, "nesterov": False}]}


def test_gd_above_two_over_lambda_max_is_found_at_the_first_step_and_diverges():
    records, losses = gd_records([1.05 * 2 / LAMBDAS.max()] * 30)
    eos = edge_of_stability(records, SGD_META)
    assert eos.crossed and eos.first_step == 0 and eos.above_at_end and eos.duration == 29
    assert eos.probes_above == 30 and eos.episodes == 1
    assert losses[-1] > losses[0]  # the threshold is the physical one: past it, GD diverges


def test_gd_below_two_over_lambda_max_reports_no_crossing():
    records, losses = gd_records([0.95 * 2 / LAMBDAS.max()] * 30)
    eos = edge_of_stability(records, SGD_META)
    assert not eos.crossed and eos.first_step is None and eos.probes_above == 0
    assert eos.peak_ratio == pytest.approx(0.95)
    assert losses[-1] < losses[0]


def test_warmup_crossing_step_is_exact():
    etas = [0.305 + 0.01 * t for t in range(40)]          # passes 2/lambda_max = 0.5 between steps 19 and 20
    records, _ = gd_records(etas)
    eos = edge_of_stability(records, SGD_META)
    expected = next(t for t, e in enumerate(etas) if e * LAMBDAS.max() > 2)
    assert eos.first_step == expected == 20
    assert eos.duration == 19 and eos.above_at_end


def test_a_run_that_leaves_the_edge_counts_episodes(tmp_path):
    etas = [0.4] * 5 + [0.6] * 5 + [0.4] * 5 + [0.6] * 5
    records, _ = gd_records(etas)
    with RunWriter(tmp_path / "run", SGD_META) as w:
        for r in records:
            w.append(r)
    reader = RunReader(tmp_path / "run")
    eos = edge_of_stability(reader.records, reader.meta)
    assert (eos.first_step, eos.duration, eos.episodes, eos.probes_above) == (5, 4, 2, 10)


@pytest.mark.parametrize("momentum, nesterov, dampening", [(0.0, False, 0.0), (0.9, False, 0.0), (0.5, True, 0.0),
                                                           (0.9, False, 0.5)])
def test_threshold_matches_torch_sgd_on_a_quadratic(momentum, nesterov, dampening):
    """The threshold is where torch's own SGD turns from converging to diverging on f(w) = lambda w^2 / 2."""
    lam = 3.0
    update = "nesterov" if nesterov else "heavy-ball"
    # The threshold scales as 1/lr, so the lr at which lambda sits exactly on it is threshold(lr=1) / lambda.
    critical_lr = stability_threshold(1.0, beta=momentum, update=update, dampening=dampening) / lam

    def final_size(lr: float) -> float:
        w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=lr, momentum=momentum, nesterov=nesterov, dampening=dampening)
        for _ in range(400):
            opt.zero_grad()
            (0.5 * lam * w**2).sum().backward()
            opt.step()
        return float(w.detach().abs())

    assert final_size(0.98 * critical_lr) < 1.0 < final_size(1.02 * critical_lr)


def test_adam_uses_the_preconditioned_sharpness():
    meta = {"optimizer": "Adam", "optimizer_hparams": [{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}]}
    threshold = 2 * (1 + 0.9) / ((1 - 0.9) * 0.01)       # 3800
    sharp = [3000.0, 3700.0, 3900.0, 4100.0, 3500.0]
    records = [{"step": 10 * t, "lr": [0.01], "spectrum": {"lambda_max": 1e5},  # raw sharpness is not Adam's
                "precond": {"lambda_max": s, "lambda_max_err": 150.0}} for t, s in enumerate(sharp)]
    eos = edge_of_stability(records, meta)
    np.testing.assert_allclose(eos.threshold, threshold, rtol=FLOAT64_EXACT)
    assert (eos.rule, eos.first_step, eos.duration, eos.above_at_end) == ("adam", 20, 10, False)
    assert eos.uncertain == 2   # 3700 ± 150 and 3900 ± 150 straddle 3800
    without = edge_of_stability([{k: v for k, v in r.items() if k != "precond"} for r in records], meta)
    assert not without.applicable and "precond" in without.reason


def test_the_largest_learning_rate_group_sets_the_threshold():
    meta = {"optimizer": "SGD", "optimizer_hparams": [{"lr": 0.01, "momentum": 0.0}, {"lr": 0.3, "momentum": 0.5}]}
    records = [{"step": 0, "lr": [0.01, 0.3], "spectrum": {"lambda_max": 12.0}}]
    eos = edge_of_stability(records, meta)
    assert eos.beta == 0.5 and eos.threshold[0] == pytest.approx(2 * 1.5 / 0.3)
    assert eos.crossed   # 12 > 10


def test_runs_the_rule_cannot_judge_say_why():
    no_lr = [{"step": 0, "spectrum": {"lambda_max": 1.0}}]
    assert "learning rate" in edge_of_stability(no_lr, SGD_META).reason
    tr = {"optimizer": "EllipsoidalTR", "optimizer_hparams": [{"lr": 1.0}]}
    result = edge_of_stability([{"step": 0, "lr": [1.0], "spectrum": {"lambda_max": 1.0}}], tr)
    assert not result.applicable and "EllipsoidalTR" in result.reason
    assert result.to_dict()["crossed"] is False
