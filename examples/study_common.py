"""Small pieces the study scripts share: the output folder, a training loop with probes, Markdown tables.

Not a study itself; ``examples/study_rmed.py`` and ``examples/study_trust_region.py`` import it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from geomprobe import optim
from geomprobe.probe.geometry_probe import GeometryProbe


def prepare_out(out_dir: str, *, force: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``force`` (then only its run folders are removed)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not force:
            raise SystemExit(f"{out_dir!r} exists and is not empty; pass --force to replace its runs")
        runs = os.path.join(out_dir, "runs")
        if os.path.isdir(runs):
            shutil.rmtree(runs)
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells already formatted as strings, or anything ``str`` accepts)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures; ``-`` for a missing or non-finite value."""
    if x is None or not math.isfinite(float(x)):
        return "-"
    return f"{float(x):.{digits}g}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN where there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclass
class TrainResult:
    """How one run went: where it was written, its work and its final full-training-set loss."""

    run_dir: str
    steps: int
    backprops: float
    final_loss: float
    seconds: float


def full_loss(model: nn.Module, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              X: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on the whole training set, in eval mode and without gradients."""
    was = model.training
    model.eval()
    with torch.no_grad():
        value = float(loss_of(model(X), y))
    model.train(was)
    return value


def train_with_probes(
    model: nn.Module,
    loss_fn: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    optimizer: str,
    hparams: dict[str, Any],
    batch: int,
    budget: float,
    probe_at: Sequence[float],
    metrics: dict[str, dict],
    run_dir: str,
    seed: int,
    probe_samples: int = 512,
    meta: dict[str, Any] | None = None,
    axis: str = "backprops",
) -> TrainResult:
    """Train ``model`` with the registered ``optimizer`` until ``budget`` (in backprops, or optimizer steps
    when ``axis="steps"``), probing geometry when that count first reaches each of ``probe_at``.

    Each record carries the backprops and steps so far and the full-training-set loss (the probe's own
    ``loss`` is on ``probe_samples`` fixed training samples). Minibatches are drawn without replacement by a
    generator seeded with ``seed``, so two optimizers with the same seed see the same data order.
    """
    X, y = data
    opt = optim.make(optimizer, model.parameters(), **hparams)
    counter = optim.track_backprops(opt)
    gen = torch.Generator().manual_seed(seed)
    probe_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))[:probe_samples]
    steps = {"n": 0}
    probe = GeometryProbe(
        model, loss_fn, (X[probe_idx], y[probe_idx]), metrics=metrics, optimizer=opt, run_dir=run_dir,
        seed=seed, force=True, meta={"study": {"optimizer": optimizer, "hparams": hparams, "batch": batch,
                                               "budget": budget, "axis": axis, **(meta or {})}},
        annotate=lambda: {"backprops": counter.backprops, "steps": steps["n"],
                          "train_loss": full_loss(model, loss_fn, X, y)},
    )
    progress = (lambda: counter.backprops) if axis == "backprops" else (lambda: float(steps["n"]))
    points = list(probe_at)
    t0 = time.perf_counter()
    nxt = 0
    order, cursor = torch.randperm(len(y), generator=gen), 0
    try:
        while True:
            while nxt < len(points) and progress() >= points[nxt]:
                probe.probe(steps["n"])
                nxt += 1
            if progress() >= budget:
                break
            if cursor + batch > len(y):
                order, cursor = torch.randperm(len(y), generator=gen), 0
            idx = order[cursor: cursor + batch]
            cursor += batch
            loss = opt.step(optim.make_closure(opt, lambda: loss_fn(model(X[idx]), y[idx])))
            steps["n"] += 1
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"{optimizer} diverged at step {steps['n']}; lower its learning rate")
    finally:
        probe.close()
        counter.remove()
    return TrainResult(run_dir, steps["n"], counter.backprops, full_loss(model, loss_fn, X, y),
                       time.perf_counter() - t0)
