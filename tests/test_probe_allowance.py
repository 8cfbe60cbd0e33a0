"""A budgeted probe stops at its allowance (geomprobe.probe.allowance): the budget's rule holds at all times."""

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe.probe.allowance import Deadline, OverAllowance, deadline_for
from geomprobe.probe.schedule import at, budget, every


def test_allowance_is_the_largest_cost_the_rule_admits():
    b = budget(0.1, clock=lambda: 0.0)
    assert b.allowance(now=0.0) == 0.0
    b.should_probe(0, now=0.0)  # t0 = 0
    b.observe(0, 1.0, now=1.0)
    # spent 1 s; at t = 20: c <= (0.1 * 20 - 1) / 0.9
    assert b.allowance(now=20.0) == pytest.approx(1.0 / 0.9)
    c = b.allowance(now=20.0)
    assert b.spent + c == pytest.approx(0.1 * (20.0 + c))  # exactly on the rule's boundary
    assert b.allowance(now=5.0) == 0.0  # behind: nothing allowed


def test_a_cut_probe_doubles_the_expected_cost_until_a_whole_one_is_observed():
    b = budget(0.1, clock=lambda: 0.0)
    b.should_probe(0, now=0.0)
    b.observe(0, 2.0, now=2.0)
    b.note_cut(2.0)
    assert b.expected_cost == 4.0
    b.observe(30, 2.0, now=40.0)  # cut again after the same 2 s (before its first HVP, say): expect 8 s
    b.note_cut(2.0)
    assert b.expected_cost == 8.0
    b.observe(50, 3.0, now=60.0)  # a whole probe: its seconds decide again
    b.note_whole()
    assert b.expected_cost == pytest.approx(3.0)


def test_deadline_checks_after_every_hvp_and_the_smallest_allowance_wins():
    t = [0.0]
    d = deadline_for(every(1) | budget(0.5, clock=lambda: t[0]) | budget(0.1, clock=lambda: t[0]), 0.0,
                     lambda: t[0], distributed=False)
    assert d.allowance == 0.0
    assert deadline_for(every(1), 0.0, lambda: 0.0, distributed=False) is None  # no budget, no deadline
    assert deadline_for(every(1) | budget(0.1), 0.0, lambda: 0.0, distributed=True) is None  # collective probes

    class Land:
        def hvp(self, v):
            t[0] += 1.0
            return v

    d = Deadline(at=1.5, allowance=1.5, clock=lambda: t[0])
    t[0] = 0.0
    land = Land()
    d.watch(land)
    land.hvp(torch.ones(2))  # t = 1.0: within
    with pytest.raises(OverAllowance, match="allowance of 1.5 s"):
        land.hvp(torch.ones(2))  # t = 2.0: past after the product
    skipped = {}
    assert d.skips("trace", skipped) and "allowance" in skipped["trace"]


def test_metrics_after_the_deadline_are_skipped_and_explicit_probes_carry_none(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    t = [0.0]
    clock = lambda: t[0]
    original = gp.Landscape.hvp

    def slow_hvp(self, v):
        t[0] += 10.0
        return original(self, v)

    monkeypatch.setattr(gp.Landscape, "hvp", slow_hvp)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=["spectrum", "trace"],
                             schedule=at([3]) | budget(0.5, clock=clock, predict=lambda: 1.0), clock=clock)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt, probe_now=False)
    for _ in range(3):
        t[0] += 10.0  # the budget starts at the first step (t = 10); at t = 30 the allowance is 0.5 * 20 / 0.5 = 20 s
        opt.step()
    rec = probe.records[-1]
    assert rec["step"] == 3 and rec["cost"]["cut"] is True and rec["cost"]["allowance_seconds"] == pytest.approx(20.0)
    assert "spectrum" not in rec and "trace" not in rec and set(rec["skipped"]) == {"spectrum", "trace"}
    assert "errors" not in rec  # stopping at the allowance is not a failure
    explicit = probe.probe(4)  # whatever it costs: no deadline
    assert "spectrum" in explicit and "trace" in explicit and "cut" not in explicit["cost"]
    probe.close()


def test_an_iterative_metric_is_predicted_at_its_usual_spend_not_its_cap():
    from geomprobe.probe.probe_cost import HVP_GRADIENTS, ITERATIVE_HVPS, planned_gradients

    capped = planned_gradients({"spectrum": {"hvps": 300, "exact": False, "gradients": 0, "forwards": 0}})
    exact = planned_gradients({"rmed": {"hvps": 300, "exact": True, "gradients": 0, "forwards": 0}})
    assert exact - capped == HVP_GRADIENTS * (300 - ITERATIVE_HVPS)
    few = planned_gradients({"spectrum": {"hvps": 20, "exact": False, "gradients": 0, "forwards": 0}})
    assert few == planned_gradients({"spectrum": {"hvps": 20, "exact": True, "gradients": 0, "forwards": 0}})


def test_only_the_budgets_that_let_a_probe_in_give_it_a_deadline():
    t = [100.0]
    inner = budget(0.2, clock=lambda: t[0], predict=lambda: 0.0)
    s = at([0]) | (every(25) & inner)
    assert s.should_probe(0, 100.0)  # at([0]) fired: asked for outside any budget
    assert s.gates() == [] and deadline_for(s, 100.0, lambda: t[0], distributed=False) is None
    assert s.should_probe(25, 150.0)  # every(25) & budget fired
    assert s.gates() == [inner]
    d = deadline_for(s, 150.0, lambda: t[0], distributed=False)
    assert d is not None and d.allowance == pytest.approx(inner.allowance(150.0)) and d.allowance > 0
    assert d.budgets == (inner,)  # the ones told how the probe ended
    top = budget(0.05, clock=lambda: t[0], predict=lambda: 0.0)
    capped = at([0]) | top  # a budget at the top of | caps every trigger, at() included
    assert capped.should_probe(0, 100.0) and capped.gates() == [top]


def test_a_product_that_would_end_past_the_deadline_is_not_started():
    t = [0.0]
    calls = []

    class Land:
        def hvp(self, v):
            calls.append(v.shape)
            t[0] += 0.45 * (1 if v.dim() == 1 else v.shape[0])
            return v

    d = Deadline(at=1.5, allowance=1.5, clock=lambda: t[0])
    t[0] = 0.3  # the build took 0.3 s: the first product is expected to take as long
    land = Land()
    d.watch(land)
    land.hvp(torch.ones(3))  # 0.3 + 0.3 <= 1.5: runs (t = 0.75, 0.45 s per vector measured)
    with pytest.raises(OverAllowance):
        land.hvp(torch.ones(2, 3))  # 0.75 + 2 x 0.45 > 1.5: not started
    assert calls == [torch.Size([3])] and t[0] == pytest.approx(0.75) and d.cut
    slow = Deadline(at=1.0, allowance=1.0, clock=lambda: t[0])
    t[0] = 0.8  # a build of 0.8 s leaves no room for a product like it
    other = Land()
    slow.watch(other)
    with pytest.raises(OverAllowance):
        other.hvp(torch.ones(3))
    assert len(calls) == 1


def test_compile_seconds_count_each_formula_and_shape_once(monkeypatch):
    from geomprobe.engine.autodiff import normdouble

    compiles = []

    def fake_compile(fn, **kw):
        def run(*args):
            shapes = tuple(a.shape for a in args)
            if shapes not in compiles:  # inductor compiles a static-shape graph on its first call
                compiles.append(shapes)
                t[0] += 5.0
            return fn(*args)
        return run

    t = [0.0]
    monkeypatch.setattr(normdouble.time, "perf_counter", lambda: t[0])
    monkeypatch.setattr(normdouble.torch, "compile", fake_compile)
    monkeypatch.setattr(normdouble, "_compiled", {})
    monkeypatch.setattr(normdouble, "_first_calls", set())
    monkeypatch.setattr(normdouble, "_compile_seconds", [0.0])

    def formula(x):
        return 2 * x

    fused = normdouble._fused(formula)
    assert normdouble.compile_seconds() == 0.0
    fused(torch.ones(3))
    assert normdouble.compile_seconds() == 5.0
    fused(torch.ones(3))  # the same shape: compiled already, nothing counted
    assert normdouble.compile_seconds() == 5.0
    fused(torch.ones(4))  # a new shape compiles again
    assert normdouble.compile_seconds() == 10.0 and len(compiles) == 2


def test_one_time_seconds_count_as_spent_but_not_as_what_probes_cost():
    b = budget(0.1, clock=lambda: 0.0)
    b.should_probe(0, now=0.0)
    b.observe(0, 15.0, now=15.0, one_time=13.0)  # a probe whose first HVP compiled for 13 s
    assert b.spent == 15.0 and b.expected_cost == pytest.approx(2.0)
    b.note_cut(15.0 - 13.0)  # cut: the budget expects twice its recurring seconds, not twice 15
    assert b.expected_cost == pytest.approx(4.0)
    combined = every(10) & budget(0.1, clock=lambda: 0.0)
    combined.observe(0, 3.0, 3.0, one_time=1.0)
    assert combined.parts[1].spent == 3.0 and combined.parts[1].expected_cost == pytest.approx(2.0)
    b.observe(1, 1.0, now=20.0, one_time=5.0)  # never below zero
    assert b._last == 0.0


def test_a_compiling_product_does_not_set_the_next_products_estimate(monkeypatch):
    from geomprobe.probe import allowance

    t, compiled = [0.0], [0.0]
    monkeypatch.setattr(allowance, "compile_seconds", lambda: compiled[0])

    class Land:
        def __init__(self):
            self.calls = 0

        def hvp(self, v):
            self.calls += 1
            if self.calls == 1:  # the first product compiles for 8 s and computes for 0.5 s
                compiled[0] += 8.0
                t[0] += 8.0
            t[0] += 0.5
            return v

    d = Deadline(at=12.0, allowance=12.0, clock=lambda: t[0])
    t[0] = 0.5  # the build
    land = Land()
    d.watch(land)
    land.hvp(torch.ones(2))  # t = 9.0
    assert d.per_vector == pytest.approx(0.5)  # not 8.5: the next product is expected to take 0.5 s
    land.hvp(torch.ones(2))  # 9.0 + 0.5 <= 12: started (with the compile counted it would have been refused)
    assert land.calls == 2 and not d.cut


def test_a_probe_records_its_one_time_seconds_and_the_budget_leaves_them_out(monkeypatch):
    from geomprobe.probe import allowance, geometry_probe

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    t, compiled = [0.0], [0.0]
    monkeypatch.setattr(allowance, "compile_seconds", lambda: compiled[0])
    monkeypatch.setattr(geometry_probe, "compile_seconds", lambda: compiled[0])
    original = gp.Landscape.hvp

    def first_compiles(self, v):
        if compiled[0] == 0.0:
            compiled[0] += 6.0
            t[0] += 6.0
        t[0] += 0.01
        return original(self, v)

    monkeypatch.setattr(gp.Landscape, "hvp", first_compiles)
    inner = budget(0.5, clock=lambda: t[0], predict=lambda: 1.0)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics={"spectrum": {"max_iter": 5}},
                             schedule=every(1) & inner, clock=lambda: t[0])
    probe.attach(torch.optim.SGD(model.parameters(), lr=0.0), probe_now=False)
    t[0] = 100.0
    probe.step(1)  # the budget's wall time starts here; nothing allowed yet
    t[0] = 200.0
    probe.step(2)
    rec = probe.records[-1]
    assert rec["cost"]["one_time_seconds"] == pytest.approx(6.0) and rec["cost"]["seconds"] > 6.0
    assert inner.spent == pytest.approx(rec["cost"]["seconds"])
    assert inner.expected_cost == pytest.approx(rec["cost"]["seconds"] - 6.0)
    probe.close()
