"""What a GeometryProbe does to an existing run before it writes: resume=True continues only a run measured the
same way, and force=True replaces a run only with a probe that measured something."""

from pathlib import Path

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe.errors import ConfigurationError

METRICS = {"spectrum": {"tol": 1e-4}}


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    return model, nn.CrossEntropyLoss(), (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))


def train(probe, model, loss_fn, batch, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    probe.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "left as it was" is checked against."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def first_run(run_dir, steps=2):
    model, loss_fn, batch = setup()
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics=METRICS, schedule=gp.every(1), run_dir=run_dir)
    train(probe, model, loss_fn, batch, steps)
    return model, loss_fn, batch


# ---------------------------------------------------------------- resume=True checks the run's policy
def test_resume_with_the_same_policy_appends(tmp_path):
    run_dir = tmp_path / "run"
    model, loss_fn, batch = first_run(run_dir)
    # the same options, one of them a default given explicitly: the same measurement
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"tol": 1e-4, "k": 1}},
                             schedule=gp.every(1), run_dir=run_dir, resume=True)
    train(probe, model, loss_fn, batch, 2)
    records = gp.RunReader(run_dir).records
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all("errors" not in r and r["spectrum"]["lambda_max"] > 0 for r in records)


@pytest.mark.parametrize("change, named", [
    ({"metrics": {"spectrum": {"tol": 1e-3}}}, r"metrics spectrum:tol=0\.0001, not spectrum:tol=0\.001"),
    ({"metrics": {"spectrum": {"tol": 1e-4}, "trace": {}}}, r"metrics spectrum:tol=0\.0001, not spectrum:tol=0\.0001 trace"),
    ({"mode": "train"}, r"mode 'eval', not 'train'"),
    ({"seed": 3}, r"seed 0, not 3"),
    ({"data": "two batches"}, r"probe_data 1 given batch\(es\), not 2 given batch\(es\)"),
    ({"params": "0.*"}, r"params None, not '0\.\*'"),
])
def test_resume_with_another_policy_is_refused_and_writes_nothing(tmp_path, change, named):
    run_dir = tmp_path / "run"
    model, loss_fn, batch = first_run(run_dir)
    before = snapshot(run_dir)
    kwargs = {"metrics": METRICS, "schedule": gp.every(1), "run_dir": run_dir, "resume": True, **change}
    data = kwargs.pop("data", None)
    probe_data = [(batch[0][:8], batch[1][:8]), (batch[0][8:], batch[1][8:])] if data else batch
    with pytest.raises(ConfigurationError, match=rf"cannot resume run .*: it was measured with {named}\. .*"
                                                 r"pass the run's .* to continue it, or a new run_dir"):
        gp.GeometryProbe(model, loss_fn, probe_data, **kwargs)
    assert snapshot(run_dir) == before


def test_resume_names_every_difference_at_once(tmp_path):
    run_dir = tmp_path / "run"
    model, loss_fn, batch = first_run(run_dir)
    with pytest.raises(ConfigurationError) as info:
        gp.GeometryProbe(model, loss_fn, batch, metrics={"trace": {}}, mode="train", seed=2, run_dir=run_dir,
                         resume=True)
    message = str(info.value)
    assert "metrics spectrum:tol=0.0001, not trace; mode 'eval', not 'train'; seed 0, not 2" in message
    assert "pass the run's metrics=, mode=, seed= to continue it" in message


def test_resume_of_a_missing_folder_or_a_plain_writer_run_starts_or_continues(tmp_path):
    model, loss_fn, batch = setup()
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics=METRICS, run_dir=tmp_path / "new", resume=True)
    probe.probe(0)
    probe.close()
    assert len(gp.RunReader(tmp_path / "new").records) == 1
    with gp.RunWriter(tmp_path / "plain", {"note": "no probe section"}) as w:  # nothing to hold the probe to
        w.append({"step": 0})
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics=METRICS, run_dir=tmp_path / "plain", resume=True)
    probe.probe(1)
    probe.close()
    assert [r["step"] for r in gp.RunReader(tmp_path / "plain").records] == [0, 1]
