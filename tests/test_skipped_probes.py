"""Probes the schedule selected but a limit vetoed are counted with their reason, the report says so, and a
run that ended between two probes gets one at the end of training."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import geomprobe as gp
from geomprobe.cli.main import cli
from geomprobe.probe.schedule import at, budget, every
from geomprobe.probe.skips import SkipCounter
from geomprobe.report import build_report, report_text

METRICS = {"spectrum": {"k": 1, "max_iter": 4}}


class Ticks:
    """A clock that advances one second at every reading: probe time and wall time are counts of readings."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _first_and_budgeted(clock) -> gp.Schedule:
    """Step 0 whatever the budget, then every 2 steps within 5 % (a budget alone defers step 0: no step timed)."""
    return at([0]) | (every(2) & budget(0.05, clock=clock))


def _train(steps: int, schedule, tmp_path=None, fail_at: int | None = None, **options):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=METRICS, schedule=schedule,
                             run_dir=None if tmp_path is None else tmp_path / "run", **options)
    try:
        with probe:
            probe.attach(opt)
            for t in range(steps):
                if t == fail_at:
                    raise RuntimeError("training failed")
                opt.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
                opt.step()
    except RuntimeError:
        pass
    return probe


def test_vetoed_steps_are_named_by_their_limit():
    s = every(10) | budget(0.5, clock=lambda: 0.0)
    s.observe(0, 1.0, 0.0)  # 1 s spent at time 0: every later probe is over budget
    assert not s.should_probe(10, 1.0) and s.vetoed_by == ("overhead budget 50 %",)
    assert not s.should_probe(11, 1.0) and s.vetoed_by == ()  # not selected: not a skipped probe
    nested = (every(10) & budget(0.5, clock=lambda: 0.0)) | at([3])
    nested.parts[0].observe(0, 1.0, 0.0)
    assert not nested.should_probe(10, 1.0) and nested.vetoed_by == ("overhead budget 50 %",)
    assert nested.should_probe(3, 1.0) and nested.vetoed_by == ()
    limits_only = budget(0.5, clock=lambda: 0.0) | budget(0.2, clock=lambda: 0.0)
    limits_only.observe(0, 1.0, 0.0)
    assert not limits_only.should_probe(1, 1.0) and limits_only.vetoed_by == ()  # nothing was scheduled


def test_skip_counter_counts_scheduled_and_skipped():
    s, c = every(2) | budget(0.5, clock=lambda: 0.0), SkipCounter()
    s.observe(0, 1.0, 0.0)
    for step in range(1, 9):
        c.note(s, s.should_probe(step, 1.0))
    assert c.to_dict() == {"scheduled": 4, "skipped": 4, "skipped_by": {"overhead budget 50 %": 4},
                           "last_skip": {"step": None, "by": ["overhead budget 50 %"], "expected_seconds": 1.0,
                                         "cost_from": "measured"}}


def test_budget_skips_are_recorded_and_reported(tmp_path):
    # 20 steps, every(2): 11 scheduled; the ticking clock makes the first probe cost more than 5 % of the run
    probe = _train(20, _first_and_budgeted(Ticks()), tmp_path, final_probe=False, clock=Ticks())
    records = gp.RunReader(tmp_path / "run").records
    # no probe after step 0; the skips after it land in a compact record written at close
    assert [(r["step"], r.get("kind")) for r in records] == [(0, None), (20, "schedule")]
    assert "spectrum" not in records[-1] and records[-1]["schedule"]["skipped"] == 10
    doc = build_report(tmp_path / "run")
    assert doc["schedule"]["scheduled"] == 11 and doc["schedule"]["skipped"] == 10
    text = report_text(tmp_path / "run")
    assert "probes     1 of 11 scheduled (10 skipped: overhead budget 5 %)" in text
    assert "10 of 11 scheduled probes were skipped (overhead budget 5 %)" in text
    assert probe.skips.skipped == 10 and doc["probes"] == 1 and "unplaced_records" not in doc


def test_the_last_step_gets_a_final_probe_with_the_counts(tmp_path):
    clock = Ticks()
    _train(20, _first_and_budgeted(clock), tmp_path, clock=clock)
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [0, 20] and records[-1]["final"] is True
    counts = {k: records[-1]["schedule"][k] for k in ("scheduled", "skipped", "skipped_by")}
    assert counts == {"scheduled": 11, "skipped": 10, "skipped_by": {"overhead budget 5 %": 10}}
    assert records[-1]["schedule"]["last_skip"]["step"] == 20 and records[-1]["schedule"]["last_skip"]["cost_from"] == "measured"
    assert "spectrum" in records[-1] and "final" not in records[0]
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "2 (1 of 11 scheduled, 10 skipped: overhead budget 5 %; 1 at the end of training)" in result.output


@pytest.mark.parametrize("schedule, expected, final", [
    (every(100), [0, 30], True),                # a short run: the schedule's next probe never came
    (every(10), [0, 10, 20, 30], False),        # the last step was probed: nothing to add
    (at([0, 7]), [0, 7], False),                # explicit steps that all ran are what the user asked for
])
def test_final_probe_only_where_the_run_ended_between_probes(schedule, expected, final):
    probe = _train(30, schedule)
    assert [r["step"] for r in probe.records] == expected
    assert [r.get("final", False) for r in probe.records] == [False] * (len(expected) - 1) + [final]


def test_no_final_probe_after_an_exception_or_when_turned_off():
    assert [r["step"] for r in _train(30, every(100), fail_at=12).records] == [0]
    assert [r["step"] for r in _train(30, every(100), final_probe=False).records] == [0]


@pytest.mark.filterwarnings("ignore")
def test_lightning_train_end_probes_a_short_run(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning import GeometryProbeCallback

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    cb = GeometryProbeCallback(probe_data=(X, y), metrics=METRICS, schedule=every(100), run_dir=tmp_path / "pl")
    L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb]).fit(Module(), loader)
    records = gp.RunReader(tmp_path / "pl").records
    assert [r["step"] for r in records] == [0, 6] and records[-1]["final"] is True


def test_installed_script_reports_skips_on_a_pipe(tmp_path):
    exe = shutil.which("geomprobe")
    if exe is None:
        pytest.skip("the geomprobe console script is not installed")
    clock = Ticks()
    _train(20, _first_and_budgeted(clock), tmp_path, final_probe=False, clock=clock)
    out = subprocess.run([exe, "report", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, check=False)
    assert out.returncode == 0, out.stderr
    assert "1 of 11 scheduled (10 skipped: overhead budget 5 %)" in out.stdout


@pytest.mark.filterwarnings("ignore")
def test_hugging_face_train_end_probes_a_short_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    from geomprobe.integrations.transformers import GeometryProbeCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=2)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 30, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": int(torch.randint(0, 2, (1,), generator=g))} for _ in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=5, per_device_train_batch_size=8,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True, seed=0)
    cb = GeometryProbeCallback(metrics=METRICS, schedule=every(100), probe_samples=8, run_dir=tmp_path / "run")
    transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args, train_dataset=rows,
                         callbacks=[cb]).train()
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [0, 5] and records[-1]["final"] is True
