"""The Lightning and Hugging Face callbacks, end to end with the real packages, against the plain hook."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import geomprobe as gp

METRICS = {"spectrum": {"k": 1, "max_iter": 20}}


def _close(a, b, tol=1e-6):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)


@pytest.mark.filterwarnings("ignore")
def test_lightning_callback_writes_the_same_records_as_the_plain_hook(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning import GeometryProbeCallback

    X, y = _data()
    probe_batch = (X[:32], y[:32])

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=False)
    module = Module()
    cb = GeometryProbeCallback(probe_data=probe_batch, metrics=METRICS, schedule=gp.every(4), run_dir=tmp_path / "pl")
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(module, loader)

    # the same training in a plain loop with the plain hook
    plain = Module()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    loss_fn = lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1])
    with gp.GeometryProbe(plain, loss_fn, probe_batch, metrics=METRICS, schedule=gp.every(4)) as probe:
        probe.attach(opt)
        step = 0
        while step < 12:
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(plain, (xb, yb)).backward()
                opt.step()
                step += 1
                if step == 12:
                    break
    got = gp.RunReader(tmp_path / "pl").records
    assert [r["step"] for r in got] == [r["step"] for r in probe.records] == [0, 4, 8, 12]
    for a, b in zip(got, probe.records):
        assert _close(a["loss"], b["loss"]) and _close(a["spectrum"]["lambda_max"], b["spectrum"]["lambda_max"])


@pytest.mark.filterwarnings("ignore")
def test_lightning_callback_draws_probe_data_from_the_train_loader(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning import GeometryProbeCallback

    X, y = _data()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(5, 3)

        def training_step(self, batch, batch_idx):
            return {"loss": nn.functional.cross_entropy(self.net(batch[0]), batch[1])}

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True)
    cb = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(2), probe_samples=24, run_dir=tmp_path / "run")
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb]).fit(Module(), loader)
    run = gp.RunReader(tmp_path / "run")
    assert [r["step"] for r in run.records] == [0, 2, 4]
    assert len(run.meta["probe"]["data"]["indices"]) == 24 and run.meta["optimizer"] == "Adam"
    assert all("errors" not in r for r in run.records)


@pytest.mark.filterwarnings("ignore")
def test_transformers_callback_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from geomprobe.integrations.transformers import GeometryProbeCallback

    torch.manual_seed(0)
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

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=8,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True, seed=0)
    cb = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(3), probe_samples=16, run_dir=tmp_path / "run")
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb])
    trainer.train()
    run = gp.RunReader(tmp_path / "run")
    assert [r["step"] for r in run.records] == [0, 3, 6]
    assert all("errors" not in r for r in run.records), run.records[0].get("errors")

    # the plain hook at the initial parameters on the same probe samples gives the same step-0 record
    with torch.no_grad():
        for p, w in zip(model.parameters(), initial):
            p.copy_(w)
    batch = trainer.data_collator([rows[i] for i in run.meta["probe"]["data"]["indices"]])
    plain = gp.GeometryProbe(model, lambda m, b: m(**b).loss, [batch], metrics=METRICS, schedule=gp.at([0]))
    rec = plain.step(0)
    assert "errors" not in rec, rec["errors"]
    assert _close(rec["loss"], run.records[0]["loss"])
    assert _close(rec["spectrum"]["lambda_max"], run.records[0]["spectrum"]["lambda_max"], 1e-5)


# ---------------------------------------------------------------- issue 18.1: the probe's loss leaves no trace
def _logged_module(L, manual: bool, outside_calls: list):
    """A module that logs (``self.log``, ``self.log_dict``, a torchmetrics mean), counts its calls on itself
    and outside, keeps a list of the batch indices it saw and, under manual optimization, steps its own
    optimizer and scheduler."""
    import torchmetrics

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3))
            self.automatic_optimization = not manual
            self.mean_loss = torchmetrics.MeanMetric()
            self.calls = 0
            self.seen: list[int] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            outside_calls.append(batch_idx)
            self.calls += 1
            self.seen.append(batch_idx)
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.mean_loss(loss)
            self.log("train_loss", loss)
            self.log_dict({"double_loss": 2 * loss, "calls": float(self.calls)})
            self.log("mean_loss", self.mean_loss, on_step=False, on_epoch=True)
            if manual:
                opt, sched = self.optimizers(), self.lr_schedulers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
                sched.step()
                return None
            return loss

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.05)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module()


def _fit_with_csv(L, tmp, manual, callbacks, outside_calls, max_steps=10):
    from lightning.pytorch.loggers import CSVLogger

    X, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)  # dropout masks in training
    module = _logged_module(L, manual, outside_calls)
    logger = CSVLogger(tmp, name="logs", version=0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(module, loader)
    return module, trainer, (Path(logger.log_dir) / "metrics.csv").read_bytes()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_probe_leaves_logs_steps_and_parameters_as_without_it(tmp_path, manual):
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning import GeometryProbeCallback

    plain_calls: list = []
    plain, plain_trainer, plain_csv = _fit_with_csv(L, tmp_path / "plain", manual, [], plain_calls)
    probed_calls: list = []
    cb = GeometryProbeCallback(metrics=METRICS, schedule=gp.every(3), probe_samples=24, run_dir=tmp_path / "run",
                               log_to_trainer=False, mode="train")
    probed, probed_trainer, probed_csv = _fit_with_csv(L, tmp_path / "probed", manual, [cb], probed_calls)

    # the user's logged metrics file is byte for byte the same: no extra row, no shifted or frozen loss
    assert b"train_loss" in plain_csv and probed_csv == plain_csv
    assert probed_trainer.callback_metrics.keys() == plain_trainer.callback_metrics.keys()
    for k, v in plain_trainer.callback_metrics.items():
        assert torch.equal(probed_trainer.callback_metrics[k], v), k
    # the module's own counters and lists saw training only; the probe did call training_step (sandboxed)
    assert probed.calls == plain.calls == 10 and probed.seen == plain.seen
    assert len(probed_calls) > len(plain_calls) == 10
    assert probed_trainer.global_step == plain_trainer.global_step == 10
    # parameters, optimizer state and scheduler bit-identical
    for (name, p), q in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(p, q), name
    s_plain, s_probed = plain_trainer.optimizers[0].state_dict(), probed_trainer.optimizers[0].state_dict()
    for i, st in s_plain["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s_probed["state"][i][k])), (i, k)
    assert s_plain["param_groups"][0]["lr"] == s_probed["param_groups"][0]["lr"] == 0.05 * 0.5 ** 5
    # and the probe measured: every scheduled step, no failure
    run = gp.RunReader(tmp_path / "run")
    assert [r["step"] for r in run.records] == [0, 3, 6, 9, 10]  # 10: the final probe at the end of training
    assert all("errors" not in r for r in run.records), run.records[0].get("errors")


@pytest.mark.filterwarnings("ignore")
def test_lightning_probe_loss_is_the_training_step_loss(tmp_path):
    """The sandboxed training_step gives the same loss and λ_max as the user's loss written out by hand."""
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning_step import training_step_loss

    X, y = _data()
    for manual in (False, True):
        module = _logged_module(L, manual, [])
        got = training_step_loss(module, (X, y))
        want = nn.functional.cross_entropy(module.net.eval()(X), y)
        module.train()
        assert got.requires_grad and module.calls == 0 and module.seen == []
        module.eval()
        assert torch.equal(training_step_loss(module, (X, y)), want)
        # the metric's state, its update count and every .grad as before
        assert float(module.mean_loss.mean_value) == float(module.mean_loss.weight) == 0.0
        assert module.mean_loss.update_count == 0 and all(p.grad is None for p in module.parameters())


@pytest.mark.filterwarnings("ignore")
def test_lightning_callback_with_loss_fn_never_runs_training_step(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning import GeometryProbeCallback

    calls: list = []
    cb = GeometryProbeCallback(loss_fn=nn.CrossEntropyLoss(), metrics=METRICS, schedule=gp.every(5),
                               probe_samples=24, run_dir=tmp_path / "run", log_to_trainer=False)
    _fit_with_csv(L, tmp_path / "fit", False, [cb], calls)
    assert len(calls) == 10  # training's own ten steps, none for the probe
    run = gp.RunReader(tmp_path / "run")
    assert [r["step"] for r in run.records] == [0, 5, 10]
    assert all("errors" not in r for r in run.records)


def test_training_step_loss_refuses_no_loss_and_several_losses():
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning_step import training_step_loss

    class TwoLosses(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 1), nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            self.manual_backward(self.a(batch).sum())
            self.manual_backward(self.b(batch).sum())

    class NoLoss(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 1)

        def training_step(self, batch):
            self.a(batch)
            return {"acc": 1.0}

    with pytest.raises(gp.ConfigurationError, match="2 times.*loss_fn="):
        training_step_loss(TwoLosses(), torch.ones(3, 2))
    with pytest.raises(gp.ConfigurationError, match="returned dict and called no backward.*loss_fn="):
        training_step_loss(NoLoss(), torch.ones(3, 2))
    assert torch.Tensor.backward.__name__ == "backward"  # put back after a failure too


def test_training_step_sandbox_puts_the_module_back_as_found():
    """Every effect the sandbox promises to undo, on a module outside a Trainer: plain attributes rebound,
    appended to, updated, added or changed in place; a direct ``loss.backward()``; a closure given to
    ``opt.step``; toggling; printing; ``.grad`` left exactly as it was."""
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning_step import training_step_loss

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(3, 1)
            self.total = torch.zeros(())
            self.outputs, self.stats, self.count = [], {"n": 0}, 0

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.toggle_optimizer(opt)
            self.print("side effect")
            self.count += 1
            self.stats["n"] += 1
            self.stats["last"] = batch_idx
            self.new_attribute = True
            loss = self.net(batch).pow(2).mean()
            self.total += loss.detach()
            self.outputs.append(loss.detach())

            def closure():
                opt.zero_grad()
                loss.backward()
                return loss

            opt.step(closure)
            self.untoggle_optimizer(opt)
            return {"something": 1}

    m = Module()
    x = torch.randn(4, 3)
    m.net.weight.grad = torch.full_like(m.net.weight, 0.5)
    grad, outputs, stats = m.net.weight.grad, m.outputs, m.stats
    loss = training_step_loss(m, x)
    # the loss handed to backward, with its graph whole
    assert torch.equal(loss, m.net(x).pow(2).mean())
    (g,) = torch.autograd.grad(loss, m.net.bias)
    assert torch.allclose(g, 2 * m.net(x).mean(0).detach())
    assert m.net.weight.grad is grad and torch.equal(grad, torch.full_like(grad, 0.5)) and m.net.bias.grad is None
    assert m.count == 0 and m.outputs is outputs and outputs == [] and m.stats is stats and stats == {"n": 0}
    assert float(m.total) == 0.0 and not hasattr(m, "new_attribute")
    assert all(p.requires_grad for p in m.parameters())
    assert "log" not in m.__dict__ and "optimizers" not in m.__dict__ and torch.Tensor.backward.__name__ == "backward"


def test_training_step_sandbox_restores_after_training_step_raises():
    L = pytest.importorskip("lightning.pytorch")
    from geomprobe.integrations.lightning_step import training_step_loss

    class Raises(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.count = nn.Linear(2, 1), 0

        def training_step(self, batch, batch_idx):
            self.count += 1
            self.manual_backward(self.net(batch).sum())
            raise ValueError("bad batch")

    m = Raises()
    with pytest.raises(ValueError, match="bad batch"):
        training_step_loss(m, torch.ones(3, 2))
    assert m.count == 0 and "manual_backward" not in m.__dict__ and torch.Tensor.backward.__name__ == "backward"
