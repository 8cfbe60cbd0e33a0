"""Ctrl-C during `geomprobe probe` keeps what is complete, and `probe --resume OUT` finishes the same run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from probe_specs import one_thread  # noqa: F401  (an autouse fixture)
from test_cli_probe import save_training_checkpoints

import geomprobe as gp
from geomprobe.cli.main import cli
from geomprobe.engine.landscape import Landscape
from geomprobe.load.spec import load_spec
from geomprobe.probe.schedule import at
from geomprobe.runs.reader import RunReader

SPEC = "probe_specs:mlp_spec"
# Cold starts: a warm-started Lanczos run begins from the previous checkpoint's Ritz vectors, which a resumed
# process no longer holds, so only cold runs can be compared value for value.
METRICS = ("--metric", "spectrum", "--metric", "trace:hvps=24", "--no-warm-start")
# What differs between two runs of the same probe: when it ran and how long it took.
CLOCK = {"time", "wall", "cost"}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return save_training_checkpoints(tmp_path_factory.mktemp("ckpts"))


def _count_new(land, seen: list) -> None:
    """Count ``land`` in ``seen`` the first time it is seen. Marked on the object, not by ``id()``: a closed
    Landscape is freed at once (no reference cycle holds it), so the next one may get the same address."""
    if not getattr(land, "_seen_by_test", False):
        land._seen_by_test = True
        seen.append(len(seen))


def interrupt_in_landscape(monkeypatch, nth: int) -> list:
    """Raise KeyboardInterrupt at the first block HVP (trace's, after spectrum's single vectors) of the
    ``nth`` Landscape built: the middle of the nth checkpoint's probe."""
    seen: list[int] = []
    inner = Landscape.hvp

    def hvp(self, v):
        _count_new(self, seen)
        if len(seen) == nth and v.dim() == 2:
            raise KeyboardInterrupt
        return inner(self, v)

    monkeypatch.setattr(Landscape, "hvp", hvp)
    return seen


def measured(records):
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records]


def test_ctrl_c_in_the_second_of_three_checkpoints_then_resume_gives_the_uninterrupted_run(tmp_path, ckpts,
                                                                                          monkeypatch):
    whole = run("probe", *ckpts, "--spec", SPEC, *METRICS, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output

    out = tmp_path / "cut"
    interrupt_in_landscape(monkeypatch, 2)
    cut = run("probe", *ckpts, "--spec", SPEC, *METRICS, "--out", out)
    assert cut.exit_code == 130, cut.output
    assert f"geomprobe probe --resume {out}" in cut.stderr
    assert "1 of 3 checkpoints are recorded" in cut.stderr and "during step 20 (ckpt-20.pt)" in cut.stderr
    # the completed checkpoint stays; the interrupted one left nothing, not even its finished spectrum
    assert [r["step"] for r in RunReader(out).records] == [10]
    assert (out / "records.jsonl").read_text().count("\n") == 1

    monkeypatch.undo()
    resumed = run("probe", "--resume", out, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert [c["step"] for c in json.loads(resumed.stdout)["checkpoints"]] == [20, 30]  # only what was missing
    assert "resuming" in resumed.stderr and "1 of 3 checkpoints already recorded" in resumed.stderr
    a, b = RunReader(tmp_path / "whole"), RunReader(out)
    assert [r["step"] for r in b.records] == [10, 20, 30]
    assert measured(b.records) == measured(a.records)  # bit for bit: same weights, data, seeds and options
    assert b.meta["probe"]["metrics"] == {"spectrum": {}, "trace": {"hvps": 24}}

    again = run("probe", "--resume", out)
    assert again.exit_code == 0 and "nothing to resume: all 3 checkpoints are recorded" in again.stderr
    assert len(RunReader(out).records) == 3


def test_warm_started_runs_resume_within_the_stated_bounds(tmp_path, ckpts, monkeypatch):
    whole = run("probe", *ckpts, "--spec", SPEC, "--out", tmp_path / "whole")
    out = tmp_path / "cut"
    monkeypatch.setattr(Landscape, "hvp", _raise_always(Landscape.hvp, after=2))  # the third checkpoint's first HVP
    cut = run("probe", *ckpts, "--spec", SPEC, "--out", out)
    assert whole.exit_code == 0 and cut.exit_code == 130, cut.output
    monkeypatch.undo()
    assert run("probe", "--resume", out).exit_code == 0
    a, b = RunReader(tmp_path / "whole").records, RunReader(out).records
    assert [r["step"] for r in b] == [10, 20, 30] and b[2]["spectrum"]["warm"] is False
    for x, y in zip(a, b):
        sa, sb = x["spectrum"], y["spectrum"]
        assert abs(sa["lambda_max"] - sb["lambda_max"]) <= sa["lambda_max_err"] + sb["lambda_max_err"] + 1e-6
        assert abs(sa["lambda_min"] - sb["lambda_min"]) <= sa["lambda_min_err"] + sb["lambda_min_err"] + 1e-6


def _raise_always(inner, after: int):
    """An hvp raising KeyboardInterrupt in every Landscape after the first ``after`` ones."""
    seen: list[int] = []

    def hvp(self, v):
        _count_new(self, seen)
        if len(seen) > after:
            raise KeyboardInterrupt
        return inner(self, v)

    return hvp


def test_ctrl_c_in_the_first_checkpoint_says_nothing_was_written(tmp_path, ckpts, monkeypatch):
    interrupt_in_landscape(monkeypatch, 1)
    out = tmp_path / "run"
    result = run("probe", *ckpts, "--spec", SPEC, *METRICS, "--out", out)
    assert result.exit_code == 130
    assert "nothing was recorded" in result.stderr and "--resume" not in result.stderr
    assert not out.exists()


@pytest.fixture
def cut_run(tmp_path, ckpts, monkeypatch):
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_in_landscape(m, 2)
        assert run("probe", *ckpts, "--spec", SPEC, *METRICS, "--out", out).exit_code == 130
    return out


@pytest.mark.parametrize("extra, message", [
    (["--metric", "spectrum"], "was probed with --metric spectrum trace:hvps=24, not spectrum"),
    (["--metric", "spectrum", "--metric", "trace:hvps=25", "--no-warm-start"],
     "trace:hvps=24, not spectrum trace:hvps=25"),
    (["--seed", "3"], "was probed with --seed 0, not 3"),
    (["--mode", "train"], "was probed with --mode 'eval', not 'train'"),
    (["--spec", "probe_specs:mlp_loader_spec"], "--spec 'probe_specs:mlp_spec', not 'probe_specs:mlp_loader_spec'"),
    (["--force"], "takes neither --force nor --dry-run"),
])
def test_resume_refuses_a_different_spec_or_metrics(cut_run, extra, message):
    result = run("probe", "--resume", cut_run, *extra)
    assert result.exit_code in (1, 2) and message in result.stderr, result.stderr
    assert len(RunReader(cut_run).records) == 1  # nothing written


def test_resume_takes_the_same_checkpoints_given_again_and_refuses_others(cut_run, ckpts, tmp_path):
    (tmp_path / "other").mkdir()
    other = save_training_checkpoints(tmp_path / "other")
    refused = run("probe", "--resume", cut_run, *other[:2])
    assert refused.exit_code == 1 and "other checkpoints than the 2 given" in refused.stderr
    same = run("probe", "--resume", cut_run, *reversed(ckpts), "--spec", SPEC, *METRICS)
    assert same.exit_code == 0, same.output
    assert [r["step"] for r in RunReader(cut_run).records] == [10, 20, 30]


def test_resume_of_what_is_not_a_probe_run(tmp_path):
    missing = run("probe", "--resume", tmp_path / "nope")
    assert missing.exit_code == 1 and "no such run folder" in missing.stderr
    from geomprobe.runs.writer import RunWriter

    with RunWriter(tmp_path / "api", {"model": "x"}) as w:
        w.append({"step": 0, "loss": 1.0})
    foreign = run("probe", "--resume", tmp_path / "api")
    assert foreign.exit_code == 1 and "not written by `geomprobe probe`" in foreign.stderr


def test_a_keyboard_interrupt_inside_a_probe_is_not_recorded_by_the_python_api(tmp_path, monkeypatch):
    # The probe catches every Exception to keep training alive, but Ctrl-C must stop it: the record of the
    # interrupted probe is not written, the earlier one is, and the run folder is left unlocked.
    from torch import nn

    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), run_dir=tmp_path / "run")
    probe.probe(0)
    monkeypatch.setattr(Landscape, "hvp", _raise_always(Landscape.hvp, after=0))
    with pytest.raises(KeyboardInterrupt):
        probe.probe(1)
    probe.close()
    assert [r["step"] for r in RunReader(tmp_path / "run").records] == [0]
    from geomprobe.runs.files import LOCK_FILE

    assert (tmp_path / "run" / "meta.json").exists() and not (tmp_path / "run" / LOCK_FILE).exists()


SLOW_SPEC = '''
import os, time
import torch
from torch import nn
from geomprobe.load.spec import ProbeSpec


class TinyNet(nn.Module):
    def __init__(self, hidden=6):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


CALLS = [0]


def loss(outputs, targets):
    # the marker's presence says this call is inside the second checkpoint's probe: wait there for Ctrl-C
    CALLS[0] += 1
    if CALLS[0] == int(os.environ["SLOW_AT_CALL"]):
        open(os.environ["SLOW_MARKER"], "w").close()
        time.sleep(60)
    return nn.functional.cross_entropy(outputs, targets)


def spec():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g)
    return ProbeSpec(TinyNet(), loss, (X, torch.randint(0, 3, (32,), generator=g)))
'''


def test_sigint_to_the_installed_command_then_resume(tmp_path, ckpts, monkeypatch):
    # A real Ctrl-C (SIGINT) to the console script while the second checkpoint's probe runs.
    exe = shutil.which("geomprobe", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the geomprobe console script is not installed beside this Python")
    spec = tmp_path / "slow_spec.py"
    spec.write_text(SLOW_SPEC)
    out, marker = tmp_path / "run", tmp_path / "marker"
    monkeypatch.setenv("SLOW_AT_CALL", "0")  # never slow while counting
    before_second = _loss_calls_per_probe(f"{spec}:spec")  # the pre-flight and the first checkpoint's probe
    env = {**os.environ, "SLOW_MARKER": str(marker), "SLOW_AT_CALL": str(before_second + 1), "OMP_NUM_THREADS": "1"}
    # a shell's background job starts with SIGINT ignored, and an ignored signal stays ignored in children: the
    # command must see Ctrl-C as a user's terminal delivers it
    proc = subprocess.Popen([exe, "probe", *map(str, ckpts), "--spec", f"{spec}:spec", "--out", str(out),
                             "--no-warm-start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"geomprobe probe --resume {out}" in err and "Traceback" not in err
    assert [r["step"] for r in RunReader(out).records] == [10]
    resumed = run("probe", "--resume", out)  # in this process, where SLOW_AT_CALL is 0: never slow
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in RunReader(out).records] == [10, 20, 30]


def _loss_calls_per_probe(spec_name: str) -> int:
    """How many times one probe calls the spec's loss (counted in this process on the same spec file)."""
    spec = load_spec(spec_name, seed=0)
    module = sys.modules[spec.loss_fn.__module__]
    module.CALLS[0] = 0
    probe = gp.GeometryProbe(spec.model, spec.loss_fn, spec.probe_data, schedule=at([0]))
    probe.probe(0)
    probe.close()
    # the command computes the loss once on every probe batch before it writes anything (its pre-flight)
    return module.CALLS[0] + len(probe.batches)
