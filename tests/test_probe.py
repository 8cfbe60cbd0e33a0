"""GeometryProbe: bit-identical training, failure isolation, crash safety, schedules, probe data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from reference import OnceDifferentiableCube
from torch import nn

import geomprobe as gp
from geomprobe.metrics import registry
from geomprobe.probe import geometry_probe


class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(steps, probe_kwargs=None, tmp=None, seed=0):
    torch.manual_seed(seed)
    model = BNDropNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = data()
    loss_fn = nn.CrossEntropyLoss()
    probe = None
    if probe_kwargs is not None:
        probe = gp.GeometryProbe(model, loss_fn, (X[:32], y[:32]), **probe_kwargs)
        probe.attach(opt)
    for t in range(steps):
        idx = torch.randint(0, 96, (16,))
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    if probe is not None:
        probe.close()
    return model, opt, probe


# the host-vector mode (engine/host_stream.py) runs the same probes through streamed passes on the user's leaves
@pytest.mark.parametrize("mode,vector_device", [("eval", None), ("train", None), ("train", "cpu")])
def test_training_is_bit_identical_with_a_probe(tmp_path, mode, vector_device):
    # every metric that only needs the Landscape, at cheap settings (21 probes per run)
    metrics = {"spectrum": {"k": 2, "max_iter": 30}, "rmed": {"exact_threshold": 64, "k": 32, "top": 8,
               "screen_samples": 8, "bootstrap": 50}, "diagshare": {"exact_threshold": 64, "k": 16, "bootstrap": 50},
               "density": {"n_v": 2, "m": 10, "grid_size": 500}}
    ref_model, ref_opt, _ = train(200)
    model, opt, probe = train(200, dict(metrics=metrics, schedule=gp.every(10), run_dir=tmp_path / "run", mode=mode,
                                        vector_device=vector_device))
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for (ka, sa), (kb, sb) in zip(ref_opt.state_dict()["state"].items(), opt.state_dict()["state"].items()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ref_model.parameters(), model.parameters()))
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == list(range(0, 201, 10))
    assert all("errors" not in r for r in records), records[0].get("errors")
    r = records[-1]
    assert r["spectrum"]["lambda_max"] >= r["spectrum"]["lambda_min"]
    assert r["cost"]["hvps"] >= r["spectrum"]["hvps"] > 0 and r["cost"]["seconds"] > 0
    assert r["lr"] == [1e-2]
    # a certified spectrum starts cold at every probe (warm_start="auto"), and density takes the first 10 steps
    # of its seeded run as its first start: one start of m = 10 steps fewer
    assert [rec["spectrum"]["warm"] for rec in records] == [False] * len(records)
    assert all("certifies its extremes" in rec["spectrum"]["cold_because"] for rec in records[1:])
    assert all(rec["density"]["shared"] == ["raw spectrum from spectrum"] for rec in records)
    assert all(rec["density"]["hvps"] == 10 for rec in records)


def test_meta_names_model_optimizer_policy_and_data(tmp_path):
    X, y = data()
    model = BNDropNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True)
    rng = torch.get_rng_state()
    with gp.GeometryProbe(model, nn.CrossEntropyLoss(), dl, probe_samples=40, seed=7,
                          schedule=gp.at([0]), run_dir=tmp_path / "r") as probe:
        probe.attach(opt)
    assert torch.equal(rng, torch.get_rng_state())  # drawing probe data did not move the user's RNG
    meta = gp.RunReader(tmp_path / "r").meta
    assert meta["model"] == "BNDropNet" and meta["optimizer"] == "SGD"
    assert meta["optimizer_hparams"][0]["momentum"] == 0.9
    assert meta["probe"]["data"]["seed"] == 7 and len(meta["probe"]["data"]["indices"]) == 40
    assert meta["probe"]["batches"] == 3 and meta["probe"]["mode"] == "eval"
    assert [b["name"] for b in meta["blocks"]][:2] == ["fc1.weight", "fc1.bias"]
    # the same seed draws the same samples
    again = gp.GeometryProbe(model, nn.CrossEntropyLoss(), dl, probe_samples=40, seed=7)
    assert again.data_policy["indices"] == meta["probe"]["data"]["indices"]


def test_schedules_fire_at_the_right_steps():
    steps = {}
    for name, sched in [("log", gp.log_spaced(1, 100, 3)), ("at", gp.at([0, 7, 33]))]:
        _, _, probe = train(100, dict(schedule=sched, metrics={"spectrum": {"max_iter": 5}}))
        steps[name] = [r["step"] for r in probe.records]
    assert steps["log"] == [1, 10, 100]
    assert steps["at"] == [0, 7, 33]


def test_budget_keeps_probe_time_under_five_percent_on_a_controlled_clock(monkeypatch):
    clock = {"t": 0.0}
    now = lambda: clock["t"]
    X, y = data()
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def slow_metric(land, **_):
        clock["t"] += 0.8          # each probe costs 0.8 s ...
        return {"value": 1.0}

    # planned at 2 HVPs: predicted 1.5 * (2 + 3 * 2) * 0.1 = 1.2 s, above the 0.8 s it takes (probe_cost.py)
    monkeypatch.setitem(registry.REGISTRY, "slow", registry.Metric("slow", slow_metric, "none",
                                                                   planner=lambda o, c: registry.CostPlan(2)))
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=["slow"],
                             schedule=gp.every(1) | gp.budget(0.05, clock=now), clock=now)
    probe.attach(opt)
    for _ in range(2000):
        clock["t"] += 0.1          # ... and each training step 0.1 s
        opt.step()
    probe.close()
    spent = sum(r["cost"]["seconds"] for r in probe.records)
    final = probe.records[-1]["cost"]["seconds"] if probe.records[-1].get("final") else 0.0
    assert probe.records[0]["step"] > 0              # the first probe waited until it fitted
    assert spent - final <= 0.05 * clock["t"]        # within budget, the first probe included (close()'s aside)
    assert spent >= 0.04 * clock["t"]                # and the budget is used, not wasted
    assert probe.overhead() <= 0.05 + final / clock["t"]


def test_failures_are_recorded_and_training_continues(tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky(land, **_):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"value": float(land.loss)}

    monkeypatch.setitem(registry.REGISTRY, "flaky", registry.Metric("flaky", flaky, "none"))
    X, y = data()
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=["flaky", "spectrum"],
                             schedule=gp.every(2), run_dir=tmp_path / "run", chunk_size=8)
    with pytest.warns(RuntimeWarning, match="flaky failed at step 0"):
        probe.attach(opt)
    for _ in range(4):
        opt.step()
    probe.close()
    recs = gp.RunReader(tmp_path / "run").records
    assert recs[0]["errors"]["flaky"].startswith("OutOfMemory")
    assert "spectrum" in recs[0]                           # the other metric still ran
    assert recs[0]["cost"]["chunk_size"] == 8 and recs[1]["cost"]["chunk_size"] == 4   # retried with 8 / 2
    assert "errors" not in recs[1] and recs[1]["flaky"]["value"] > 0


def _two_probes_with_one_out_of_memory(monkeypatch, work, metrics, **options):
    """Register a metric ``oom_once`` that does ``work(land, **kw)`` and runs out of memory the first time; run
    two probes (step 0 and 1) of ``metrics`` with ``options`` and return their records and ``work``'s calls."""
    seen = []

    def oom_once(land, basis_device=None):  # named, so the probe passes it
        seen.append(work(land, basis_device=basis_device))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return {"value": 1.0}

    monkeypatch.setitem(registry.REGISTRY, "oom_once", registry.Metric("oom_once", oom_once, "none"))
    X, y = data()
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X[:32], y[:32]), schedule=gp.every(1),
                             metrics=metrics, **options)
    with pytest.warns(RuntimeWarning, match="oom_once failed"):
        probe.attach(opt)
    opt.step()
    probe.close()
    return probe.records, seen


def test_out_of_memory_ladder_ends_with_the_lanczos_basis_in_host_memory(monkeypatch):
    # chunk 1 and micro-batches already: the next out-of-memory moves Krylov bases off the device, and the
    # metrics that take basis_device receive it
    (first, second), seen = _two_probes_with_one_out_of_memory(
        monkeypatch, lambda land, basis_device=None, **_: basis_device,
        {"oom_once": {}, "spectrum": {"tol": 1e-8}}, chunk_size=1, micro_batch_size=8)
    assert seen == [None, "cpu"]
    assert first["cost"]["basis_device"] is None and second["cost"]["basis_device"] == "cpu"
    assert second["cost"]["micro_batch_size"] == 8  # not split further: the basis went first
    assert second["spectrum"]["converged"] and "errors" not in second


def test_out_of_memory_in_single_vector_work_skips_the_chunk_rung(monkeypatch):
    # a metric that only ever passed one vector at a time cannot be helped by smaller chunks: the first
    # failure already splits the probe batches
    (first, second), _ = _two_probes_with_one_out_of_memory(
        monkeypatch, lambda land, **_: land.hvp(torch.ones(land.dim)), ["oom_once"], chunk_size=16)
    assert first["cost"]["micro_batch_size"] is None and "errors" in first
    assert second["cost"]["micro_batch_size"] == 16 and second["cost"]["chunk_size"] == 8
    assert "errors" not in second


def test_nan_loss_and_unsupported_op_are_recorded(tmp_path):
    X, y = data()
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    bad = (X[:8] * float("nan"), y[:8])
    with pytest.warns(RuntimeWarning, match="landscape failed"):
        with gp.GeometryProbe(model, nn.CrossEntropyLoss(), bad, schedule=gp.every(1), run_dir=tmp_path / "nan") as p:
            p.attach(opt)
            opt.step()
    recs = gp.RunReader(tmp_path / "nan").records
    assert len(recs) == 2 and all("NonFiniteLossError" in r["errors"]["landscape"] for r in recs)

    lin = nn.Linear(6, 3)
    loss_fn = lambda model, batch: OnceDifferentiableCube.apply(model(batch[0])).pow(2).mean()
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="once_differentiable"):
        with gp.GeometryProbe(lin, loss_fn, (X, y), schedule=gp.every(1), run_dir=tmp_path / "op") as p:
            p.attach(opt)
    rec = gp.RunReader(tmp_path / "op").records[0]
    assert "UnsupportedOperationError" in rec["errors"]["landscape"]


def test_bad_configuration_is_refused_before_training(tmp_path):
    X, y = data()
    model = nn.Linear(6, 3)
    with pytest.raises(gp.ConfigurationError, match="unknown metric 'nope'"):
        gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=["nope"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "records.jsonl").write_text("{}\n")
    with pytest.raises(gp.ConfigurationError, match="refusing to overwrite"):
        gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), run_dir=tmp_path / "old")
    assert (tmp_path / "old" / "records.jsonl").read_text() == "{}\n"
    with pytest.raises(gp.ConfigurationError, match="schedule must be"):
        gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), schedule=10)


def test_wrapped_models_are_unwrapped():
    model = nn.Linear(6, 3)
    X, y = data()
    compiled = torch.compile(model)
    probe = gp.GeometryProbe(compiled, nn.CrossEntropyLoss(), (X, y))
    assert probe.model is model
    probe = gp.GeometryProbe(nn.DataParallel(model), nn.CrossEntropyLoss(), (X, y))
    assert probe.model is model


_KILLED = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import geomprobe as gp
    torch.manual_seed(0)
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), schedule=gp.every(1),
                             metrics={"spectrum": {"max_iter": 5}}, run_dir=sys.argv[1])
    probe.attach(opt)
    while True:
        opt.zero_grad(); nn.functional.cross_entropy(model(X), y).backward(); opt.step()
    """
)


def test_a_killed_training_process_leaves_a_readable_run(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(run)])
    deadline = time.time() + 60
    while time.time() < deadline:
        if (run / "records.jsonl").exists() and (run / "records.jsonl").read_text().count("\n") >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recs = gp.RunReader(run).records
    assert len(recs) >= 5
    assert [r["step"] for r in recs] == list(range(len(recs)))
    json.dumps(recs[-1])
    # and the report reads it too
    from geomprobe.report import build_report

    doc = build_report(run)
    assert doc["probes"] == len(recs)
    assert "spectrum" in json.dumps(doc)


def test_out_of_memory_while_building_retries_with_micro_batches(monkeypatch):
    X, y = data()
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    real = geometry_probe.Landscape
    calls = {"n": 0}

    def oom_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(geometry_probe, "Landscape", oom_once)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X[:32], y[:32]), schedule=gp.every(1),
                             metrics={"spectrum": {"tol": 1e-8}})
    with pytest.warns(RuntimeWarning, match="landscape failed"):
        probe.attach(opt)
    opt.step()
    probe.close()
    first, second = probe.records
    assert first["errors"]["landscape"].startswith("OutOfMemory")
    assert second["cost"]["micro_batch_size"] == 16 and "errors" not in second
    # the same Hessian as without micro-batches
    ref = gp.metrics.spectrum(real(model, nn.CrossEntropyLoss(), (X[:32], y[:32])), tol=1e-8)
    assert abs(second["spectrum"]["lambda_max"] - ref["lambda_max"]) <= 1e-5 * ref["lambda_max"]
