"""The probe's scalars where users look: Lightning's loggers, the Hugging Face Trainer's callbacks (its
``report_to`` integrations) and the plain hook's one-line summary, each without touching the user's metrics."""

import csv
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe.probe.summary import probe_scalars, summary_line

METRICS = {"spectrum": {"k": 1, "max_iter": 20}, "trace": {"hvps": 16}}
HF_METRICS = {"spectrum": {"k": 1, "max_iter": 8}}  # a BERT's HVPs are dear on a shared CPU


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


# ---------------------------------------------------------------- Lightning
def _lightning_fit(L, logger, callbacks, max_steps=10):
    X, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=False)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(module, loader)
    return module, trainer


@pytest.mark.filterwarnings("ignore")
def test_lightning_csv_logger_gets_the_probe_scalars_at_probe_steps_and_user_rows_unchanged(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from geomprobe.integrations.lightning import GeometryProbeCallback

    _lightning_fit(L, CSVLogger(tmp_path, name="plain", version=0), [])
    cb = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(3), probe_samples=32, run_dir=tmp_path / "run")
    _, trainer = _lightning_fit(L, CSVLogger(tmp_path, name="probed", version=0), [cb])
    assert sorted(trainer.callback_metrics) == ["train_loss"]  # monitors and checkpoints see the user's only
    plain = _csv_rows(tmp_path / "plain" / "version_0" / "metrics.csv")
    probed = _csv_rows(tmp_path / "probed" / "version_0" / "metrics.csv")
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [0, 3, 6, 9, 10]  # 10: the final probe at the end of training
    assert records[-1].get("final") is True

    ours = [r for r in probed if r.get("geomprobe/loss")]
    user = [{k: v for k, v in r.items() if not k.startswith("geomprobe/")} for r in probed if not r.get("geomprobe/loss")]
    assert user == plain and len(plain) == 10  # the user's rows, values and steps exactly as without the probe
    assert [int(r["step"]) for r in ours] == [0, 3, 6, 9, 10]  # the final probe's scalars too
    for row, rec in zip(ours, records):
        assert not any(row[k] for k in row if k not in ("step",) and not k.startswith("geomprobe/"))
        assert float(row["geomprobe/spectrum/lambda_max"]) == pytest.approx(rec["spectrum"]["lambda_max"], rel=1e-12)
        assert float(row["geomprobe/trace/trace"]) == pytest.approx(rec["trace"]["trace"], rel=1e-12)
        assert float(row["geomprobe/loss"]) == pytest.approx(rec["loss"], rel=1e-12)
        assert float(row["geomprobe/spectrum/converged"]) == float(rec["spectrum"]["converged"])
    assert "geomprobe/spectrum/blocks" not in probed[0] and "train_loss" not in {k[10:] for k in ours[0]}


@pytest.mark.filterwarnings("ignore")
def test_lightning_tensorboard_logger_gets_the_probe_scalars(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from geomprobe.integrations.lightning import GeometryProbeCallback

    _lightning_fit(L, TensorBoardLogger(tmp_path, name="plain", version=0), [])
    cb = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(4), probe_samples=32, run_dir=tmp_path / "run")
    _lightning_fit(L, TensorBoardLogger(tmp_path, name="probed", version=0), [cb])
    plain, probed = _tb_scalars(tmp_path / "plain"), _tb_scalars(tmp_path / "probed")
    records = gp.RunReader(tmp_path / "run").records
    assert {k: v for k, v in probed.items() if not k.startswith("geomprobe/")} == plain
    lam = probed["geomprobe/spectrum/lambda_max"]
    assert [s for s, _ in lam] == [r["step"] for r in records] == [0, 4, 8]
    for (_, v), rec in zip(lam, records):
        assert v == pytest.approx(rec["spectrum"]["lambda_max"], rel=1e-6)  # TensorBoard stores float32


@pytest.mark.filterwarnings("ignore")
def test_lightning_log_to_trainer_off_and_a_failing_logger(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger, Logger

    from geomprobe.integrations.lightning import GeometryProbeCallback

    class Broken(Logger):
        name, version = "broken", 0
        calls = 0

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("geomprobe/") for k in metrics):
                Broken.calls += 1
                raise OSError("disk full")

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    off = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(5), probe_samples=32, log_to_trainer=False)
    _lightning_fit(L, CSVLogger(tmp_path, name="off", version=0), [off])
    assert not any(k.startswith("geomprobe/") for k in _csv_rows(tmp_path / "off" / "version_0" / "metrics.csv")[0])

    cb = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(5), probe_samples=32, run_dir=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="Broken failed on the probe's scalars at step 0.*disk full"):
        _, trainer = _lightning_fit(L, [Broken(), CSVLogger(tmp_path, name="ok", version=0)], [cb])
    assert trainer.global_step == 10 and Broken.calls == 1  # warned once, then left alone; training went on
    rows = [r for r in _csv_rows(tmp_path / "ok" / "version_0" / "metrics.csv") if r.get("geomprobe/loss")]
    assert [int(r["step"]) for r in rows] == [0, 5, 10]  # the other logger still got every probe


# ---------------------------------------------------------------- Hugging Face
def _hf_fit(tmp, callbacks, report_to=None, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 40, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(torch.randint(0, 2, (1,), generator=g))} for _ in range(48)]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    args = transformers.TrainingArguments(output_dir=str(tmp), max_steps=6, per_device_train_batch_size=8,
                                          report_to=report_to or [], use_cpu=True, save_strategy="no",
                                          logging_strategy="steps", logging_steps=2, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=callbacks)
    trainer.train()
    return model, trainer


def _capture():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def __init__(self):
            self.logs: list[tuple[int, dict]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs)))

    return Capture()


@pytest.mark.filterwarnings("ignore")
def test_transformers_callbacks_get_the_probe_scalars_and_log_history_is_untouched(tmp_path):
    pytest.importorskip("transformers")
    from geomprobe.integrations.transformers import GeometryProbeCallback

    plain_capture = _capture()
    plain_model, plain = _hf_fit(tmp_path / "plain", [plain_capture])
    capture = _capture()
    cb = GeometryProbeCallback(metrics=HF_METRICS, schedule=gp.every(3), probe_samples=16, run_dir=tmp_path / "run")
    model, trainer = _hf_fit(tmp_path / "probed", [cb, capture])
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [0, 3, 6] and all("errors" not in r for r in records)

    # the user's loss history: log_history and what a logging callback saw of the Trainer's own logs
    def drop_times(entries):
        return [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in entries]

    assert drop_times(trainer.state.log_history) == drop_times(plain.state.log_history)
    assert [s for s, e in capture.logs if "loss" in e] == [2, 4, 6]
    assert drop_times([e for _, e in capture.logs if not any(k.startswith("geomprobe/") for k in e)]) == \
        drop_times([e for _, e in plain_capture.logs])
    ours = [(s, e) for s, e in capture.logs if any(k.startswith("geomprobe/") for k in e)]
    assert [s for s, _ in ours] == [0, 3, 6]
    for (_, logs), rec in zip(ours, records):
        assert logs == probe_scalars(rec)
        assert logs["geomprobe/spectrum/lambda_max"] == rec["spectrum"]["lambda_max"]
    # and training itself is bit-identical
    for (name, p), q in zip(plain_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.filterwarnings("ignore")
def test_transformers_report_to_tensorboard_gets_the_probe_scalars(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from geomprobe.integrations.transformers import GeometryProbeCallback

    cb = GeometryProbeCallback(metrics=HF_METRICS, schedule=gp.every(3), probe_samples=16, run_dir=tmp_path / "run")
    _hf_fit(tmp_path / "hf", [cb], report_to=["tensorboard"])
    scalars = _tb_scalars(tmp_path / "hf")
    records = gp.RunReader(tmp_path / "run").records
    lam = scalars["train/geomprobe/spectrum/lambda_max"]
    assert [s for s, _ in lam] == [r["step"] for r in records] == [0, 3, 6]
    assert all(v == pytest.approx(r["spectrum"]["lambda_max"], rel=1e-6) for (_, v), r in zip(lam, records))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]  # the user's loss, at the Trainer's logging steps


@pytest.mark.filterwarnings("ignore")
def test_transformers_log_to_trainer_off_and_a_failing_callback(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from geomprobe.integrations.transformers import GeometryProbeCallback

    class NeedsLoss(TrainerCallback):  # a user callback that assumes every log has a training loss
        def __init__(self):
            self.seen = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen += 1
            float(logs.get("loss", logs.get("train_loss")))

    needs, capture = NeedsLoss(), _capture()
    cb = GeometryProbeCallback(metrics=HF_METRICS, schedule=gp.every(3), probe_samples=16)
    off = GeometryProbeCallback(metrics=HF_METRICS, schedule=gp.every(2), probe_samples=16, log_to_trainer=False)
    with pytest.warns(RuntimeWarning, match="NeedsLoss failed on the probe's scalars at step 0.*TypeError"):
        _, trainer = _hf_fit(tmp_path / "needs", [cb, off, needs, capture])
    assert trainer.state.global_step == 6 and needs.seen == 1 + len(trainer.state.log_history)  # then the Trainer's only
    # every probe of the first callback reached the other callbacks, none of the second (steps 0, 2, 4, 6)
    assert [s for s, e in capture.logs if "geomprobe/loss" in e] == [0, 3, 6] and len(off.probe.records) == 4


# ---------------------------------------------------------------- the plain hook's line
def _plain_run(tmp_path, **options):
    X, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=METRICS, schedule=gp.every(2),
                          **options) as probe:
        probe.attach(opt)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    return probe


def test_plain_hook_prints_one_summary_line_per_probe_on_stderr(tmp_path, capsys):
    probe = _plain_run(tmp_path, summary=True)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == len(probe.records) == 3
    for line, rec in zip(lines, probe.records):
        assert line == summary_line(rec)
        assert line.startswith(f"geomprobe step {rec['step']}: loss {rec['loss']:.4g}, ")
        assert f"lambda_max {rec['spectrum']['lambda_max']:.4g}" in line
        assert f"trace {rec['trace']['trace']:.4g} +-{rec['trace']['trace_err']:.2g}" in line
        assert line.endswith(f"; {rec['cost']['hvps']} HVPs in {rec['cost']['seconds']:.2f} s")
    _plain_run(tmp_path)
    assert capsys.readouterr().err == ""  # off by default


def test_summary_to_a_stream_or_a_callable_and_bad_values(tmp_path):
    stream, lines = io.StringIO(), []
    a = _plain_run(tmp_path, summary=stream)
    b = _plain_run(tmp_path, summary=lines.append)
    assert stream.getvalue().splitlines() == [summary_line(r) for r in a.records]
    assert lines == [summary_line(r) for r in b.records] and len(lines) == 3
    with pytest.raises(gp.ConfigurationError, match="summary must be True/False, a text stream or a callable"):
        _plain_run(tmp_path, summary="stderr")

    def broken(line):
        raise ValueError("closed")

    with pytest.warns(RuntimeWarning, match="printing the probe summary failed.*closed"):
        c = _plain_run(tmp_path, summary=broken)
    assert [r["step"] for r in c.records] == [r["step"] for r in b.records] == [0, 2, 4]  # training and probes go on


def test_summary_line_marks_unconverged_failed_and_skipped():
    rec = {"step": 7, "loss": math.nan, "spectrum": {"lambda_max": 3.0, "lambda_max_err": 0.5, "converged": False},
           "mine": {"score": 1.25, "score_err": 0.1, "hvps": 4, "flag": True},
           "saddle": {"saddle": "no", "flag": False},
           "errors": {"rmed": "OutOfMemory: ..."}, "skipped": {"precond": "no state"}}
    assert summary_line(rec) == ("geomprobe step 7: loss nan, lambda_max 3 +-0.5 (not converged), "
                                 "mine.score 1.25 +-0.1, saddle no; failed: rmed; skipped: precond")
    scalars = probe_scalars(rec, prefix="gp.")
    assert math.isnan(scalars["gp.loss"]) and scalars["gp.spectrum/converged"] == 0.0
    assert scalars["gp.mine/flag"] == 1.0 and "gp.saddle/saddle" not in scalars and "gp.errors/rmed" not in scalars


def test_summary_is_printed_by_the_writing_rank_only():
    X, y = _data()
    model = nn.Sequential(nn.Linear(5, 3))
    stream = io.StringIO()
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=METRICS, summary=stream)
    probe.writes = False  # what a rank other than 0 of a process group has
    probe.probe(0)
    probe.writes = True
    probe.probe(1)
    assert [line.split(":")[0] for line in stream.getvalue().splitlines()] == ["geomprobe step 1"]


def test_transformers_callback_called_outside_a_trainer_warns_and_still_probes():
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    from geomprobe.integrations.transformers import GeometryProbeCallback

    X, y = _data()
    model = nn.Sequential(nn.Linear(5, 3))
    # every(100): the default schedule's budget defers step 0, before any training step was timed
    cb = GeometryProbeCallback(loss_fn=nn.CrossEntropyLoss(), probe_data=(X, y), metrics=METRICS,
                               schedule=gp.every(100))
    with pytest.warns(RuntimeWarning, match="Trainer's callbacks could not be found.*run log only"):
        cb.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    assert [r["step"] for r in cb.probe.records] == [0]
