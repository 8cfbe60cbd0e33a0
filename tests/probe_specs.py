"""Tiny models and spec functions the spec, checkpoint, probe-CLI and doctor tests share.

Tests name these specs by module (``probe_specs:mlp_spec``: the tests folder is on ``sys.path``) or by
file (``SPEC_FILE + ":mlp_spec"``), as a user would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from geomprobe.load.spec import ProbeSpec

SPEC_FILE = str(Path(__file__).resolve())
NOT_CALLABLE = 3


class TinyNet(nn.Module):
    """An MLP small enough that every metric runs in well under a second."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        seq = x.reshape(x.shape[0], 1, 4)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return self.head(out[:, 0])


class _FirstOrderTanh(torch.autograd.Function):
    """tanh whose backward is marked once-differentiable: no double backward."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class FirstOrderNet(TinyNet):
    def forward(self, x):
        return self.fc2(_FirstOrderTanh.apply(self.fc1(x)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine their spinning costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """A few full-batch steps, so optimizer state exists and weights differ from initialisation."""
    X, y = data()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()


# ------------------------------------------------------------------------------------------ specs


def mlp_spec() -> ProbeSpec:
    return ProbeSpec(TinyNet(), nn.CrossEntropyLoss(), data(), optimizer_factory=adam)


def mlp_no_optimizer_spec() -> ProbeSpec:
    return ProbeSpec(TinyNet(), nn.CrossEntropyLoss(), data())


def mlp_dict_spec() -> dict:
    return {"model": TinyNet(), "loss_fn": nn.CrossEntropyLoss(), "probe_data": data()}


def mlp_tuple_spec() -> tuple:
    return TinyNet(), nn.CrossEntropyLoss(), data()


def mlp_random_data_spec() -> ProbeSpec:
    # Draws from the global RNG: load_spec seeds it, so the result is reproducible.
    return ProbeSpec(TinyNet(), nn.CrossEntropyLoss(), (torch.randn(8, 4), torch.randint(0, 3, (8,))))


def mlp_loader_spec() -> ProbeSpec:
    X, y = data(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    return ProbeSpec(TinyNet(), nn.CrossEntropyLoss(), loader)


def wide_spec() -> ProbeSpec:
    return ProbeSpec(TinyNet(hidden=7), nn.CrossEntropyLoss(), data())


def bn_dropout_spec() -> ProbeSpec:
    return ProbeSpec(BNDropNet(), nn.CrossEntropyLoss(), data())


def dropout_spec() -> ProbeSpec:
    return ProbeSpec(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3)), nn.CrossEntropyLoss(), data())


def attention_spec() -> ProbeSpec:
    return ProbeSpec(AttentionNet(), nn.CrossEntropyLoss(), data())


def first_order_spec() -> ProbeSpec:
    return ProbeSpec(FirstOrderNet(), nn.CrossEntropyLoss(), data())


def vector_loss_spec() -> ProbeSpec:
    return ProbeSpec(TinyNet(), nn.CrossEntropyLoss(reduction="none"), data())


def flash_attention_spec() -> ProbeSpec:
    model = TinyNet()
    model.config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
    return ProbeSpec(model, nn.CrossEntropyLoss(), data())


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=16)


def bert_spec() -> ProbeSpec:
    from transformers import BertForMaskedLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (4, 6), generator=g)
    batch = {"input_ids": ids, "labels": ids}

    def loss_fn(model, batch):
        return model(**batch).loss

    return ProbeSpec(BertForMaskedLM(tiny_bert_config()), loss_fn, [batch])


def not_a_spec() -> int:
    return 42


def not_a_module_spec() -> ProbeSpec:
    return ProbeSpec("a model", nn.CrossEntropyLoss(), data())  # type: ignore[arg-type]


def raising_spec() -> ProbeSpec:
    raise ValueError("boom")


# ------------------------------------------------------------------------------------------ attack specs


def broken_loss_spec() -> ProbeSpec:
    """A loss_fn that cannot run on any checkpoint (a typo in the user's code)."""

    def loss_fn(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets.float().unsqueze(1))

    return ProbeSpec(TinyNet(), loss_fn, data())


class DictNet(TinyNet):
    """TinyNet whose forward takes the batch's input dict whole: ``forward(self, batch)``."""

    def forward(self, batch):
        return super().forward(batch["x"] * batch["scale"])


def dict_forward_spec() -> ProbeSpec:
    X, y = data()
    return ProbeSpec(DictNet(), nn.CrossEntropyLoss(), ({"x": X, "scale": torch.full((len(X), 1), 0.5)}, y))
