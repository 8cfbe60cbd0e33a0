"""What a probe will cost, before it runs: `probe --dry-run` and `doctor` print per metric the planned HVPs,
memory and a time estimated from one measured HVP."""

import json

import pytest
import torch
from click.testing import CliRunner
from probe_specs import one_thread  # noqa: F401  (an autouse fixture)
from test_cli_probe import save_training_checkpoints
from torch import nn

import geomprobe as gp
from geomprobe.cli.main import cli
from geomprobe.probe.estimate import bytes_text, estimate_costs, time_text

SPEC = "probe_specs:mlp_spec"


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return save_training_checkpoints(tmp_path_factory.mktemp("ckpts"))


def _check_estimate(estimate, plan):
    t_hvp, t_grad = estimate["hvp_seconds"], estimate["gradient_seconds"]
    assert t_hvp > 0 and t_grad > 0 and estimate["graph_seconds"] > 0 and estimate["graph_bytes"] > 0
    total = estimate["graph_seconds"]
    for name, p in plan.items():
        want = p["hvps"] * t_hvp + p["gradients"] * t_grad
        assert estimate["metrics"][name]["seconds"] == pytest.approx(want, rel=1e-12)
        total += want
    assert estimate["total_seconds"] == pytest.approx(total, rel=1e-12)
    assert estimate["is_estimate"] is True


def test_dry_run_estimates_each_metric_from_one_hvp_on_the_first_checkpoint(tmp_path, ckpts):
    result = run("probe", *ckpts, "--spec", SPEC, "--metric", "spectrum", "--metric", "rmed:hvps=40",
                 "--metric", "noise", "--out", tmp_path / "run", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    plan, estimate = doc["cost_plan"], doc["estimate"]
    assert plan["rmed"]["hvps"] == 40 and plan["noise"] == {"hvps": 0, "exact": True, "gradients": 256,
                                                            "vector_bytes": None, "forwards": 0}
    _check_estimate(estimate, plan)
    assert estimate["measured_on"] == "step 10 (ckpt-10.pt)"  # the first checkpoint by step
    assert not (tmp_path / "run").exists()

    table = run("probe", *ckpts, "--spec", SPEC, "--metric", "trace", "--dry-run")
    assert table.exit_code == 0
    assert "est. time" in table.stdout and "estimated from one HVP" in table.stdout
    assert "for 3 probes" in table.stdout and "an estimate" in table.stdout


def test_the_estimate_is_near_the_probe_it_estimates():
    # With the HVP count fixed (trace spends exactly its budget), the estimate is the graph plus 96 HVPs; on an
    # MLP whose HVP costs milliseconds that lands within a few times the measured probe (timing noise of a
    # shared CPU allowed for); a wrong unit or a missing factor would be far outside.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=["trace"])
    estimate = estimate_costs(probe)
    actual = probe.probe(0)["cost"]["seconds"]
    probe.close()
    assert 0.25 <= estimate["total_seconds"] / actual <= 4.0, (estimate, actual)


def test_estimating_leaves_the_model_and_the_random_state_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(X), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=["spectrum"])
    rng = torch.get_rng_state()
    estimate_costs(probe)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_doctor_prints_the_planned_cost_and_estimate_for_its_spec():
    result = run("doctor", "--spec", SPEC, "--metric", "rmed:hvps=40", "--metric", "spectrum", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["cost_error"] is None and doc["cost"]["parameters"] == 51
    assert list(doc["cost"]["cost_plan"]) == ["rmed", "spectrum"] and doc["cost"]["cost_plan"]["rmed"]["hvps"] == 40
    _check_estimate(doc["cost"]["estimate"], doc["cost"]["cost_plan"])
    table = run("doctor", "--spec", SPEC)
    assert "planned cost per probe (51 parameters, float32)" in table.stdout
    assert "estimated from one HVP" in table.stdout and "the spec's model" in table.stdout


def test_doctor_estimates_nothing_when_a_check_fails_and_refuses_bad_metric_options():
    failed = run("doctor", "--spec", "probe_specs:first_order_spec", "--json")
    assert failed.exit_code == 1
    doc = json.loads(failed.stdout)
    assert doc["cost"] is None and doc["cost_error"] == "not estimated: a check failed"
    bad = run("doctor", "--spec", SPEC, "--metric", "spectrum:tol=0")
    assert bad.exit_code == 2 and "option tol=0.0 must be a number > 0" in bad.stderr


def test_time_and_bytes_text():
    assert [time_text(x) for x in (None, 0.0123, 3.21, 300.0, 9000.0)] == ["?", "~12.3 ms", "~3.2 s", "~5.0 min",
                                                                           "~2.5 h"]
    assert time_text(3.21, exact=False) == "<=~3.2 s"
    assert [bytes_text(x) for x in (None, 12, 2048, 3 * 2**20, 5 * 2**30)] == ["-", "12 B", "2.0 KiB", "3.0 MiB",
                                                                               "5.0 GiB"]


def test_dry_run_keeps_the_plan_when_one_hvp_cannot_run(tmp_path, ckpts, monkeypatch):
    from geomprobe.engine.landscape import Landscape

    def broken(self, v):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Landscape, "hvp", broken)
    result = run("probe", *ckpts, "--spec", SPEC, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["estimate"] is None and doc["cost_plan"]["spectrum"]["hvps"] == 51
    assert doc["estimate_error"].startswith("measuring one HVP failed (RuntimeError: CUDA out of memory")
    table = run("probe", *ckpts, "--spec", SPEC, "--dry-run")
    assert "est. time" not in table.stdout and "time not estimated: measuring one HVP failed" in table.stdout
