"""Probe saved checkpoints after training, with `geomprobe probe` (seconds on a CPU).

    python examples/checkpoint_probing.py [FOLDER]   # default runs/example-checkpoints

Trains a small random-init MLP, saving a training checkpoint (weights, optimizer state, step) every 20
steps, then measures all of them into one run with the command line, as you would for checkpoints of any
earlier training::

    geomprobe probe FOLDER/ckpt-*.pt --spec examples/checkpoint_probing.py:spec --out FOLDER/run

The spec function is what ``--spec`` names: it returns the model (freshly built: each checkpoint's weights
replace these), the loss, the probe data and how training built its optimizer (for ``precond``).
"""

import glob
import os
import subprocess
import sys

import torch
from torch import nn

from geomprobe.load.spec import ProbeSpec


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=g)
    return X, (X[:, 0] - X[:, 2] > 0).long()


def build_model():
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def spec() -> ProbeSpec:
    X, y = data()
    return ProbeSpec(model=build_model(), loss_fn=nn.CrossEntropyLoss(), probe_data=(X[:128], y[:128]),
                     optimizer_factory=make_optimizer)


def train(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for old in glob.glob(os.path.join(folder, "ckpt-*.pt")):
        os.remove(old)
    torch.manual_seed(0)
    X, y = data()
    model = build_model()
    optimizer = make_optimizer(model)
    for step in range(1, 61):
        batch = torch.randint(0, len(X), (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
        optimizer.step()
        if step % 20 == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                       os.path.join(folder, f"ckpt-{step}.pt"))


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "example-checkpoints")
    train(folder)
    command = [sys.executable, "-m", "geomprobe.cli", "probe", *sorted(glob.glob(os.path.join(folder, "ckpt-*.pt"))),
               "--spec", f"{os.path.abspath(__file__)}:spec", "--metric", "spectrum", "--metric", "precond",
               "--out", os.path.join(folder, "run"), "--force"]
    print("$ geomprobe probe", " ".join(command[4:]), flush=True)
    subprocess.run(command, check=True)
    subprocess.run([sys.executable, "-m", "geomprobe.cli", "report", os.path.join(folder, "run")], check=True)
