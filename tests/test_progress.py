"""A probe's planned cost before it runs and its progress while it runs, against what the metrics report."""

import io

import pytest
import torch
from reference import TanhMLP
from torch import nn

import geomprobe as gp
from geomprobe.metrics import registry
from geomprobe.probe.progress import LineReporter, ProgressEvent, count_hvps, plan_probe, planned_text
from geomprobe.probe.run_folder import probe_meta

# every registered metric, at settings cheap enough for a 213-parameter model
CHEAP = {
    "density": {"n_v": 2, "m": 10, "grid_size": 200},
    "trace": {"hvps": 12, "batch": 4},
    "rmed": {"bootstrap": 50},
    "diagshare": {"bootstrap": 50},
    "precond": {"rmed_options": {"exact_threshold": 32, "k": 16, "top": 4, "screen_samples": 4, "bootstrap": 50}},
    "noise": {"n_boot": 10},
}


def setting(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    model = TanhMLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()  # Adam's state exists: precond and isotropy have a preconditioner
    return model, opt, (X, y)


# the same with the sampled paths of rmed and diagshare (blocks of 60 and 100 weights above their thresholds)
SAMPLED = {**CHEAP, "rmed": {"exact_threshold": 32, "k": 16, "top": 4, "screen_samples": 4, "bootstrap": 50},
           "diagshare": {"exact_threshold": 32, "k": 16, "bootstrap": 50}}


@pytest.mark.parametrize("options", [CHEAP, SAMPLED], ids=["exact", "sampled"])
def test_progress_of_every_metric_ends_at_its_own_hvps_and_within_its_plan(options):
    model, opt, (X, y) = setting()
    metrics = {name: options.get(name, {}) for name in registry.available()}
    events: list[ProgressEvent] = []
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X[:32], y[:32]), metrics=metrics, optimizer=opt,
                             noise_data=[(X[i : i + 1], y[i : i + 1]) for i in range(64)],
                             progress=events.append)
    record = probe.probe(0)
    assert "errors" not in record, record.get("errors")
    assert record["rmed"]["exact"] == (options is CHEAP) and record["diagshare"]["exact"] == (options is CHEAP)
    assert events[0].kind == "plan" and list(events[0].plan) == list(metrics)  # the plan lists every metric
    assert events[-1].kind == "done" and events[-1].hvps == record["cost"]["hvps"]
    for name in metrics:
        mine = [e for e in events if e.metric == name]
        assert [e.kind for e in mine[:1] + mine[-1:]] == ["start", "end"]
        assert mine[-1].hvps == record[name]["hvps"], name  # counted by wrapping land.hvp
        assert sum(1 for e in mine if e.kind == "advance") <= mine[-1].hvps + mine[-1].forwards
        assert mine[-1].forwards == record[name].get("forwards", 0) <= mine[-1].planned_forwards, name
        planned = probe.cost_plan[name]
        assert planned["hvps"] is not None, f"{name} has no planner"
        if planned["exact"]:
            assert record[name]["hvps"] == planned["hvps"], name
        else:
            assert record[name]["hvps"] <= planned["hvps"], name
    assert sum(e.hvps for e in events if e.kind == "end") == record["cost"]["hvps"]
    # the plan is kept in the run's metadata too
    assert probe_meta(probe, None)["probe"]["cost_plan"] == probe.cost_plan


def test_the_plan_grows_with_the_options_and_states_vector_memory():
    model, _, _ = setting()
    space = gp.ParamSpace([n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()])
    plan = plan_probe({"spectrum": {"max_iter": 20}, "trace": {"hvps": 30}, "density": {}}, space, dtype=torch.float64)
    assert plan["spectrum"] == {"hvps": 20, "exact": False, "gradients": 0, "vector_bytes": 23 * space.dim * 8,
                                "forwards": 0}
    assert plan["trace"]["hvps"] == 30 and plan["trace"]["exact"]
    assert plan["density"]["hvps"] == 10 * 80 and not plan["density"]["exact"]
    assert planned_text(20, False) == "<=20" and planned_text(30, True) == "30" and planned_text(None, True) == "?"


def test_one_line_per_probe_on_request_and_silence_by_default(capsys):
    model, opt, (X, y) = setting()
    with gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), schedule=gp.every(1)) as quiet:
        quiet.probe(0)
    assert capsys.readouterr().err == ""
    with gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), progress=True) as loud:
        record = loud.probe(3)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"geomprobe: step 3: {record['cost']['hvps']} HVPs in ")
    assert f"spectrum {record['spectrum']['hvps']}/<={loud.cost_plan['spectrum']['hvps']}" in line


def test_line_reporter_writes_to_its_stream():
    stream = io.StringIO()
    report = LineReporter(stream)
    for e in (ProgressEvent("plan", 7, plan={}), ProgressEvent("end", 7, "trace", 12, 12, True),
              ProgressEvent("done", 7, hvps=12, seconds=0.5)):
        report(e)
    assert stream.getvalue() == "geomprobe: step 7: 12 HVPs in 0.50 s (trace 12/12)\n"


def test_a_block_of_vectors_counts_one_hvp_per_vector():
    model, _, (X, y) = setting()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), (X, y))
    seen = []
    count_hvps(land, seen.append)
    land.hvp(torch.ones(5, land.dim, dtype=torch.float64))
    land.matvec(torch.ones(land.dim, dtype=torch.float64))
    assert seen == [5, 1] and land.hvps == 6


def test_a_bad_progress_option_is_refused():
    model, _, (X, y) = setting()
    with pytest.raises(gp.ConfigurationError, match="progress must be None, True/False or a callable"):
        gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), progress="yes")


def test_a_failing_progress_callback_is_dropped_and_the_probe_goes_on():
    model, _, (X, y) = setting()
    calls = []

    def broken(event):
        calls.append(event.kind)
        raise RuntimeError("display gone")

    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), progress=broken)
    with pytest.warns(RuntimeWarning, match="progress callback failed"):
        record = probe.probe(0)
    assert calls == ["plan"] and "errors" not in record and record["spectrum"]["hvps"] > 0


@pytest.mark.parametrize("micro", [None, 16], ids=["whole", "micro-batched"])
def test_views_report_their_forward_passes_done_of_planned(micro):
    """Views spend forward passes, not HVPs: the events carry them per metric against the plan (which
    micro-batches multiply), the record's cost and the one-line report show them."""
    model, _, (X, y) = setting()
    batches = [(X[:32], y[:32]), (X[32:], y[32:])]
    metrics = {"view_line": {"direction": "gradient", "points": 7},
               "view_plane": {"u": "gradient", "v": "random", "points": [3, 4]}, "trace": {"hvps": 4, "batch": 4}}
    events: list[ProgressEvent] = []
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), batches, metrics=metrics, progress=events.append,
                             micro_batch_size=micro)
    pieces = 2 if micro is None else 4  # each batch of 32 in two micro-batches of 16
    assert {n: p["forwards"] for n, p in probe.cost_plan.items()} == {"view_line": 14, "view_plane": 24, "trace": 0}
    record = probe.probe(0)
    assert "errors" not in record, record.get("errors")
    ends = {e.metric: e for e in events if e.kind == "end"}
    assert (ends["view_line"].forwards, ends["view_line"].planned_forwards) == (7 * pieces, 7 * pieces)
    assert (ends["view_plane"].forwards, ends["view_plane"].planned_forwards) == (12 * pieces, 12 * pieces)
    assert ends["view_line"].forwards == record["view_line"]["forwards"]  # what the view itself says it spent
    assert (ends["trace"].forwards, ends["trace"].planned_forwards) == (0, 0)
    # advanced point by point: one event per point, the count rising by the batches each time
    seen = [e.forwards for e in events if e.kind == "advance" and e.metric == "view_line" and e.forwards]
    assert seen == [pieces * i for i in range(1, 8)]
    assert events[-1].kind == "done" and events[-1].forwards == record["cost"]["forwards"] == 19 * pieces
    stream = io.StringIO()
    report = LineReporter(stream)
    for e in events:
        report(e)
    line = stream.getvalue()
    assert f"view_line 1/1 HVPs, {7 * pieces}/{7 * pieces} forwards" in line
    assert f"HVPs, {19 * pieces} forwards in " in line and "trace 4/4)" in line  # no forwards for trace
