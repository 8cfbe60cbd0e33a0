"""Probing saved checkpoints from the command line: a spec, and a short training run that saves checkpoints.

Run it to train a small MLP on scikit-learn's digits with Adam, saving a training checkpoint (weights,
optimizer state, step) every 50 steps, then probe them all into one run::

    python examples/probe_spec_example.py runs/example-ckpts
    geomprobe probe runs/example-ckpts/ckpt-*.pt --spec examples/probe_spec_example.py:spec \\
        --metric spectrum --metric precond --out runs/example-probe
    geomprobe doctor --spec examples/probe_spec_example.py:spec

The spec function is what ``--spec`` names. It is called with no arguments (torch's RNG seeded by ``--seed``)
and returns the model (freshly initialised: the checkpoint's weights replace these), the loss, the probe
data and, for ``precond``, how training built its optimizer.
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from geomprobe.load.spec import ProbeSpec

STEPS, EVERY, BATCH, LR = 200, 50, 64, 1e-3


def build_model() -> nn.Module:
    """The architecture the checkpoints were saved from."""
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def digits() -> TensorDataset:
    """The digits (8x8 images, 10 classes), pixels scaled to [0, 1]."""
    X, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer as training built it: precond reads its state (Adam's second moments) from checkpoints."""
    return torch.optim.Adam(model.parameters(), lr=LR)


def spec() -> ProbeSpec:
    """What `geomprobe probe --spec examples/probe_spec_example.py:spec` measures."""
    loader = DataLoader(digits(), batch_size=BATCH)  # --samples examples are drawn from it, seeded
    return ProbeSpec(
        model=build_model(),
        loss_fn=nn.CrossEntropyLoss(),
        probe_data=loader,
        optimizer_factory=make_optimizer,
    )


def train(out_dir: str) -> None:
    """Train with Adam and save ``ckpt-<step>.pt`` training dicts: model, optimizer and step."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model, data = build_model(), digits()
    opt = make_optimizer(model)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True)
    step = 0
    while step < STEPS:
        for X, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
            step += 1
            if step % EVERY == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                           os.path.join(out_dir, f"ckpt-{step}.pt"))
            if step == STEPS:
                break
    print(f"saved {STEPS // EVERY} checkpoints in {out_dir}; probe them with:")
    print(f"  geomprobe probe {out_dir}/ckpt-*.pt --spec {__file__}:spec --metric spectrum --metric precond")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a digits MLP with Adam and save checkpoints to probe.")
    parser.add_argument("out_dir", nargs="?", default=os.path.join("runs", "example-ckpts"),
                        help="folder for ckpt-<step>.pt files (default: runs/example-ckpts)")
    train(parser.parse_args().out_dir)
