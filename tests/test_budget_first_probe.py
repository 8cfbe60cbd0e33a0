"""The overhead budget holds from the first probe on (issue 16): ``budget(f)`` defers a probe until its cost,
predicted from the probe's plan and the timed training steps before any probe was measured, fits within ``f``
of wall time; a deferred probe is recorded with its reason and expected seconds; explicit probes are not gated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe.engine.landscape import Landscape
from geomprobe.errors import ConfigurationError
from geomprobe.probe import probe_cost
from geomprobe.probe.probe_cost import ProbeCost, StepTimer, planned_gradients
from geomprobe.probe.schedule import budget, every


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------------------------------------ the rule


def test_the_budget_defers_a_first_probe_until_its_predicted_cost_fits():
    # binary fractions throughout: every comparison below is exact
    predicted: list[float | None] = [None]
    b = budget(0.25, clock=FakeClock(), predict=lambda: predicted[0])
    assert not b.should_probe(0, 0.0)                      # no step timed: nothing to predict from
    assert (b.last_cost, b.cost_from) == (None, "no training step timed yet")
    predicted[0] = 2.0
    assert not b.should_probe(1, 5.0)                      # 0 + 2 > 0.25 * (5 + 2) = 1.75
    assert (b.last_cost, b.cost_from) == (2.0, "predicted")
    assert b.should_probe(2, 6.0)                          # 0 + 2 <= 0.25 * (6 + 2) = 2: fits exactly
    b.observe(2, 1.5, 7.5)
    predicted[0] = 100.0                                   # once a probe was measured, the prediction is not used
    assert not b.should_probe(3, 8.0)                      # 1.5 + 1.5 > 0.25 * (8 + 1.5)
    assert (b.last_cost, b.cost_from) == (1.5, "measured")
    assert b.should_probe(4, 10.5)                         # 1.5 + 1.5 <= 0.25 * (10.5 + 1.5) = 3


def test_without_a_prediction_the_first_probe_is_allowed_as_before():
    b = budget(0.05, clock=FakeClock())
    assert b.should_probe(0, 0.0) and b.cost_from == "unknown"


@pytest.mark.parametrize(("step_seconds", "probe_seconds", "predicted"),
                         [(0.125, 2.0, 2.0), (0.0078125, 0.5, 4.0), (1.0, 0.25, 0.5)])
def test_with_a_prediction_that_covers_the_probe_the_rule_holds_after_every_probe(step_seconds, probe_seconds,
                                                                                  predicted):
    clock, spent, history = FakeClock(), 0.0, []
    b = budget(0.05, clock=clock, predict=lambda: predicted)
    for step in range(20_000):
        clock.t += step_seconds
        if b.should_probe(step, clock.t):
            clock.t += probe_seconds
            spent += probe_seconds
            b.observe(step, probe_seconds, clock.t)
            history.append((spent, clock.t))
    assert len(history) >= 10
    for spent_so_far, wall in history:  # the first probe included
        assert spent_so_far <= 0.05 * wall


def test_a_prediction_that_is_not_seconds_is_refused_clearly():
    with pytest.raises(ConfigurationError, match="predict must be callable"):
        budget(0.05, predict=2.0)
    bad = budget(0.05, predict=lambda: -1.0)
    with pytest.warns(RuntimeWarning, match=r"predict\(\) must return seconds >= 0 or None, got -1\.0"):
        assert not bad.should_probe(0, 100.0)             # deferred, never an exception in the optimizer hook
    assert bad.last_cost is None and bad.cost_from == "predict() returned -1.0"
    with pytest.warns(RuntimeWarning, match="got 'soon'"):
        assert not budget(0.05, predict=lambda: "soon").should_probe(0, 100.0)
    with pytest.warns(RuntimeWarning, match="got 'ZeroDivisionError: division by zero'"):
        assert not budget(0.05, predict=lambda: 1 / 0).should_probe(0, 100.0)


# ------------------------------------------------------------------------------------------------ the prediction


def test_planned_gradients_count_the_build_hvps_gradients_and_forwards():
    plan = {"spectrum": {"hvps": 40, "gradients": 0, "forwards": 0},
            "noise": {"hvps": 0, "gradients": 64, "forwards": 0},
            "view_line": {"hvps": 0, "gradients": 0, "forwards": 22}}
    assert planned_gradients(plan) == 2.0 + 3.0 * 40 + 64 + 0.5 * 22
    # three probe batches: the build and every HVP run over each; noise batches and the views' passes do not
    assert planned_gradients(plan, batches=3) == 3 * (2.0 + 3.0 * 40) + 64 + 0.5 * 22
    assert planned_gradients({"custom": {"hvps": None}}) == 2.0 + 3.0 * probe_cost.UNPLANNED_HVPS
    cost = ProbeCost(plan)
    assert cost.predict() is None
    cost.timer.mark(0, 0.0)
    cost.timer.mark(1, 0.25)
    assert cost.predict() == 1.5 * planned_gradients(plan) * 0.25


def test_the_step_timer_leaves_out_probe_time_repeats_and_restarts_and_takes_the_median():
    timer = StepTimer(window=3)
    timer.mark(0, 0.0)
    timer.mark(1, 10.0)                        # a slow first step (start-up)
    timer.exclude(4.0)
    timer.mark(2, 15.0)                        # 5 s of which 4 s probing: 1 s of training
    timer.mark(2, 16.0)                        # the same step again: not an interval
    timer.mark(6, 20.0)                        # 4 s over 4 steps
    assert timer.count == 3 and timer.seconds == 1.0
    timer.mark(3, 21.0)                        # a counter that went back (a restart): not timed
    timer.mark(4, 21.5)
    assert timer.count == 3 and timer.seconds == 1.0   # window of 3: (1, 1, 0.5), the slow step has dropped out


def _mlp(width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(512, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    return model, X, y


@pytest.mark.parametrize(("metrics", "low", "high"), [
    ({"trace": {"hvps": 64, "rel_tol": 0}}, 0.7, 4.0),   # an exact plan: measured 1.2-2.0x on the CPU
    # 64 HVPs counted (ITERATIVE_HVPS), 54 spent; this 22k-parameter MLP's Lanczos steps are bound by Python, not
    # by its HVPs: measured 1.14-1.37x on the CPU (the 4-7x once written here was before the certified stop)
    (["spectrum"], 0.7, 15.0),
])
def test_the_prediction_on_a_small_model_is_within_its_stated_factor_of_the_measured_seconds(metrics, low, high):
    model, X, y = _mlp(128)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X[:128], y[:128]), metrics=metrics,
                             schedule=gp.manual())
    probe.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):  # real training steps on the real clock
        i = torch.randint(0, 512, (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i]), y[i]).backward()
        opt.step()
    record = probe.probe(60)
    probe.close(final_probe=False)
    predicted, measured = record["cost"]["predicted_seconds"], record["cost"]["seconds"]
    assert low * measured <= predicted <= high * measured, (predicted, measured)


# ------------------------------------------------------------------------------------------------ in a GeometryProbe


STEP_SECONDS, HVP_SECONDS = 0.125, 0.25   # on the fake clock; an HVP below the predicted 3 steps


def _probe_on_fake_clock(monkeypatch, schedule_of, steps: int, tmp_path=None, check=None):
    """A small MLP trained ``steps`` steps on a fake clock: each step costs STEP_SECONDS, each HVP vector
    HVP_SECONDS (everything else the probe does costs no fake time)."""
    clock = FakeClock()
    hvp = Landscape.hvp

    def timed_hvp(self, v):
        clock.t += HVP_SECONDS * (1 if v.dim() == 1 else v.shape[0])
        return hvp(self, v)

    monkeypatch.setattr(Landscape, "hvp", timed_hvp)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics={"spectrum": {"max_iter": 8}},
                             schedule=schedule_of(clock), clock=clock,
                             run_dir=None if tmp_path is None else tmp_path / "run")
    probe.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        clock.t += STEP_SECONDS
        opt.step()
        if check is not None:
            check(probe, clock)
    return probe, clock


def test_a_probe_keeps_its_budget_at_every_step_including_the_first_probe(monkeypatch):
    worst = []

    def check(probe, clock):
        wall = clock.t - probe._t_start
        worst.append(probe._probe_seconds - 0.05 * wall)

    probe, _ = _probe_on_fake_clock(monkeypatch, lambda c: every(1) | budget(0.05, clock=c), 3000, check=check)
    steps = [r["step"] for r in probe.records]
    # predicted: 1.5 * (2 + 3 * 8 HVPs) * 0.125 s = 4.875 s, so the first probe waits for 19 * 4.875 s of training
    first = probe.records[0]
    assert first["cost"]["predicted_seconds"] == 4.875 and first["cost"]["seconds"] <= 4.875
    assert 19 * 4.875 <= first["wall"] < 19 * 4.875 + STEP_SECONDS
    assert len(steps) >= 5 and steps[0] > 700
    assert max(worst) <= 0.0                                 # spent <= 5 % of wall time after every step
    assert probe.overhead() >= 0.04                          # and the budget is used
    probe.close()


def test_a_mispredicted_probe_stops_at_its_allowance_and_the_budget_holds_anyway(monkeypatch):
    # a prediction of 0 s (the old rule): the budget fires at step 0, but the probe carries the budget's
    # allowance (0 s then) and stops after its first HVP; the budget expects twice that next time, and later
    # probes run whole once they fit
    worst = []

    def check(probe, clock):
        worst.append(probe._probe_seconds - 0.05 * (clock.t - probe._t_start))

    probe, clock = _probe_on_fake_clock(
        monkeypatch, lambda c: every(1) | budget(0.05, clock=c, predict=lambda: 0.0), 3000, check=check)
    first = probe.records[0]
    assert first["step"] == 0 and first["cost"]["cut"] is True and first["cost"]["allowance_seconds"] == 0.0
    assert "spectrum" not in first and "allowance" in first["skipped"]["spectrum"]
    assert first["cost"]["seconds"] == HVP_SECONDS  # one HVP past the deadline at most
    assert max(worst) <= HVP_SECONDS + 1e-12  # the rule, up to the one HVP a check waits for, at every step
    whole = [r for r in probe.records if not r["cost"]["cut"]]
    assert whole and all("spectrum" in r and r["cost"]["seconds"] <= r["cost"]["allowance_seconds"] for r in whole)
    cut = [r for r in probe.records if r["cost"]["cut"]]
    assert all(r["cost"]["seconds"] <= r["cost"]["allowance_seconds"] + HVP_SECONDS + 1e-12 for r in cut)
    probe.close()
    assert probe.records[-1].get("final") and "cut" not in probe.records[-1]["cost"]  # close()'s probe: no deadline


def test_deferred_probes_are_recorded_with_their_reason_and_expected_seconds(monkeypatch, tmp_path):
    seen = []

    def check(probe, clock):
        seen.append((probe._step, probe.probe_cost.predict(), dict(probe.skips.last_skip or {})))

    probe, _ = _probe_on_fake_clock(monkeypatch, lambda c: every(100) | budget(0.05, clock=c), 300,
                                        tmp_path=tmp_path, check=check)
    # step 0 (at attach): no training step timed yet; 100, 200, 300: predicted 4.875 s does not fit in 12.5-37.5 s
    assert probe.records == []
    assert probe.skips.to_dict()["skipped"] == 4
    step100 = next(skip for step, _, skip in seen if step == 100)
    assert step100 == {"step": 100, "by": ["overhead budget 5 %"], "expected_seconds": 4.875, "cost_from": "predicted"}
    probe.close()  # the final probe: close() measures the last step of a run the budget left unmeasured
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [300] and records[0]["final"] is True
    assert records[0]["schedule"]["skipped_by"] == {"overhead budget 5 %": 4}
    assert records[0]["schedule"]["last_skip"]["step"] == 300
    basis = gp.RunReader(tmp_path / "run").meta["probe"]["cost_prediction"]
    assert (basis["gradients"], basis["step_seconds"], basis["predicted_seconds"]) == (2 + 3 * 8, 0.125, 4.875)


def test_the_first_deferral_says_no_step_was_timed(monkeypatch):
    probe, _ = _probe_on_fake_clock(monkeypatch, lambda c: every(100) | budget(0.05, clock=c), 0)
    assert probe.skips.last_skip == {"step": 0, "by": ["overhead budget 5 %"], "expected_seconds": None,
                                     "cost_from": "no training step timed yet"}
    probe.close(final_probe=False)


def test_explicit_probes_are_not_gated_by_the_budget(monkeypatch):
    probe, _ = _probe_on_fake_clock(monkeypatch, lambda c: every(100) | budget(0.05, clock=c), 3)
    record = probe.probe(3)                        # predicted 4.875 s against 0.375 s of training: runs anyway
    assert record["step"] == 3 and "spectrum" in record
    assert record["cost"]["predicted_seconds"] == 4.875
    probe.close(final_probe=False)


def test_the_default_schedule_gets_the_probes_prediction():
    model = nn.Linear(3, 2)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    (limit,) = gp.probe.skips.budgets(probe.schedule)
    assert limit.predict == probe.probe_cost.predict
    own = budget(0.1, predict=lambda: 1.0)         # a budget's own prediction is kept
    probe2 = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (torch.randn(8, 3), torch.randint(0, 2, (8,))),
                              schedule=every(10) | own)
    assert own.predict() == 1.0 and probe2.schedule.parts[1] is own


def test_a_probe_drawn_from_a_loader_counts_each_of_its_batches():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    probe = gp.GeometryProbe(nn.Linear(3, 2), nn.CrossEntropyLoss(), loader, probe_samples=24,
                             metrics={"trace": {"hvps": 10, "rel_tol": 0}})
    assert len(probe.batches) == 3                 # a training step is one loader batch; a probe HVP is three
    assert probe.probe_cost.gradients == 3 * (2.0 + 3.0 * 10) == planned_gradients(probe.cost_plan, batches=3)
