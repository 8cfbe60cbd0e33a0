"""What a GeometryProbe does to an existing run before it writes: resume=True continues only a run measured the
same way, and force=True replaces a run only with a probe that measured something."""

from pathlib import Path

import numpy as np
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
    ({"metrics": {"spectrum": {"tol": 1e-4}, "trace": {}}},
     r"metrics spectrum:tol=0\.0001, not spectrum:tol=0\.0001 trace"),
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


# ---------------------------------------------------------------- force=True replaces only with a measurement
def broken_loss(outputs, targets):
    raise RuntimeError("this loss cannot run")


class FailsFirst:
    """A loss that fails at its first ``n`` calls, then works."""

    def __init__(self, n=1):
        self.n = n

    def __call__(self, outputs, targets):
        if self.n > 0:
            self.n -= 1
            raise RuntimeError("not yet")
        return nn.functional.cross_entropy(outputs, targets)


def test_force_with_a_loss_that_cannot_run_leaves_the_old_run_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    model, _, batch = first_run(run_dir)
    before = snapshot(run_dir)
    probe = gp.GeometryProbe(model, broken_loss, batch, metrics=METRICS, schedule=gp.every(1), run_dir=run_dir,
                             force=True)
    with pytest.warns(RuntimeWarning) as caught:
        train(probe, model, nn.CrossEntropyLoss(), batch, 2)
    messages = [str(w.message) for w in caught]
    assert any("measured nothing (landscape: RuntimeError: this loss cannot run); the existing run in" in m
               and "is kept as it was until a probe measures something" in m for m in messages), messages
    assert any("no probe measured anything, so the existing run in" in m and "was left as it was" in m
               and "steps 0, 1, 2" in m for m in messages), messages
    assert snapshot(run_dir) == before  # every file, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-written run beside it
    assert [r["step"] for r in probe.records] == [0, 1, 2] and all("landscape" in r["errors"] for r in probe.records)
    assert probe.unwritten_records == probe.records and "force=True has not replaced" in probe.write_error


def test_force_with_a_good_first_probe_leaves_only_the_new_run(tmp_path):
    run_dir = tmp_path / "run"
    first_run(run_dir, steps=3)
    old = gp.RunReader(run_dir)
    old_created, old_loss = old.meta["created_unix"], old.records[0]["loss"]  # read now: records are read lazily
    (run_dir / "notes.txt").write_text("the user's, not the run's")
    model, loss_fn, batch = setup(seed=5)
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"tol": 1e-4}, "view_line": {
        "direction": "gradient", "points": 80}}, schedule=gp.every(1), run_dir=run_dir, force=True,
        meta={"second": True})
    train(probe, model, loss_fn, batch, 1)
    new = gp.RunReader(run_dir)
    assert new.meta["second"] is True and new.meta["created_unix"] >= old_created
    assert [r["step"] for r in new.records] == [0, 1]
    assert [r["loss"] for r in new.records] == [r["loss"] for r in probe.records]
    assert new.records[0]["loss"] != old_loss  # another model: really the new run
    assert new.load_array(new.records[0]["view_line"]["loss"]).shape == (80,)  # its sidecars came along
    assert (run_dir / "notes.txt").read_text() == "the user's, not the run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (run_dir / ".writer.lock").exists()  # released at close


def test_force_after_failed_probes_replaces_the_run_with_all_their_records(tmp_path):
    run_dir = tmp_path / "run"
    model, _, batch = first_run(run_dir)
    probe = gp.GeometryProbe(model, FailsFirst(2), batch, metrics=METRICS, schedule=gp.every(1),
                             run_dir=run_dir, force=True)
    with pytest.warns(RuntimeWarning) as caught:
        train(probe, model, nn.CrossEntropyLoss(), batch, 3)
    assert any("measured nothing" in str(w.message) for w in caught)
    records = gp.RunReader(run_dir).records
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert ["errors" in r for r in records] == [True, True, False, False]
    assert probe.unwritten_records == [] and probe.write_error is None


CRASH = """
import os, signal, sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
import geomprobe as gp
import geomprobe.runs.files as files
from test_probe_run_folder import METRICS, setup, train

where = {where!r}
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "append":  # killed writing the new run's first record, after its meta and sidecar folder
    files.append_line = die
    import geomprobe.runs.writer as writer
    writer.append_line = die
model, loss_fn, batch = setup(seed=5)
probe = gp.GeometryProbe(model, loss_fn, batch, metrics=METRICS, schedule=gp.every(1), run_dir={run!r},
                         force=True, annotate=die if where == "measure" else None)
train(probe, model, loss_fn, batch, 2)
"""


@pytest.mark.parametrize("where", ["measure", "append"])
def test_a_crash_before_the_new_run_is_complete_leaves_the_old_run_byte_identical(tmp_path, where):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    first_run(run_dir)
    before = snapshot(run_dir)
    code = CRASH.format(tests=str(Path(__file__).parent), where=where, run=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr  # killed, not a clean exit
    assert snapshot(run_dir) == before
    # the next force=True clears what the killed one left beside the run, and replaces the run
    model, loss_fn, batch = setup(seed=5)
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics=METRICS, run_dir=run_dir, force=True)
    probe.probe(7)
    probe.close()
    assert [r["step"] for r in gp.RunReader(run_dir).records] == [7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("how", ["renameat2", "two-renames", "in-place"])
def test_replace_run_swaps_in_the_new_run_with_or_without_an_atomic_exchange(tmp_path, monkeypatch, how):
    from geomprobe.runs import replace

    if how == "two-renames":  # a system without renameat2: the old run is set aside, then the new one renamed in
        monkeypatch.setattr(replace, "_renameat2", lambda: None)
    if how == "in-place":  # no room beside the run: replaced in place (root may write anywhere, so pretend)
        monkeypatch.setattr(replace.os, "access", lambda *args: False)
    run_dir = tmp_path / "run"
    with gp.RunWriter(run_dir, {"which": "old"}) as w:
        w.append({"step": 0, "big": np.arange(100.0)})  # a sidecar, which must go with the old run
    (run_dir / "notes.txt").write_text("kept")
    (run_dir / "arrays" / "mine.txt").write_text("kept too")  # not a sidecar: the user's
    writer = replace.replace_run(run_dir, {"which": "new"}, [{"step": 5, "values": np.arange(70.0)}])
    writer.append({"step": 6})
    writer.close()
    reader = gp.RunReader(run_dir)
    assert reader.meta["which"] == "new" and [r["step"] for r in reader.records] == [5, 6]
    assert reader.load_array(reader.records[0]["values"]).tolist() == list(range(70))
    assert sorted(p.name for p in (run_dir / "arrays").iterdir()) == ["mine.txt", "step00000005-values.npy"]
    assert (run_dir / "notes.txt").read_text() == "kept" and (run_dir / "arrays" / "mine.txt").read_text() == "kept too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_replace_run_that_fails_to_write_leaves_the_old_run(tmp_path):
    from geomprobe.runs import replace

    run_dir = tmp_path / "run"
    with gp.RunWriter(run_dir, {"which": "old"}) as w:
        w.append({"step": 0})
    before = snapshot(run_dir)
    with pytest.raises(ConfigurationError, match="cannot store"):
        replace.replace_run(run_dir, {"which": "new"}, [{"step": 1}, {"step": 2, "bad": object()}])
    assert snapshot(run_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
