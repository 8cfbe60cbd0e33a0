"""The Lightning and Hugging Face callbacks, end to end with the real packages, against the plain hook."""

import math

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
