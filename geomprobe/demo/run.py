"""The demo: an MLP on the embedded digits trained by SGD with momentum, Adam and the RMSProp trust region
on the same budget of backprops, with geometry probed along each trajectory into one run per optimizer."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import optim
from ..errors import ConfigurationError
from ..probe.geometry_probe import GeometryProbe
from ..probe.schedule import manual
from .data import load_digits_tensors
from .models import DigitsMLP

__all__ = ["DEMO_OPTIMIZERS", "DEMO_METRICS", "DemoResult", "run_demo", "probe_points"]

# Learning rates a user would pick for this problem (the registry's are generic defaults).
DEMO_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgdm": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 3e-3},
    "tr-rmsprop": {},
}
# Cheap settings of each metric for a ~5k-parameter model probed a few dozen times on 2 CPU cores.
DEMO_METRICS: dict[str, dict[str, Any]] = {
    "spectrum": {"k": 1, "tol": 1e-3},
    "rmed": {"exact_threshold": 256, "k": 128, "top": 16, "screen_samples": 16},
    "diagshare": {"k": 64},
    "precond": {"raw": False, "rmed": False},
}
TRAIN_BATCH = 128
TR_BATCH = 512          # the trust region's default minibatch (docs/metrics.md#trust_region)
PROBE_SAMPLES = 512


@dataclass
class DemoResult:
    """One optimizer's run: where it was written and how training went."""

    optimizer: str
    run_dir: str
    steps: int
    backprops: float
    final_loss: float
    train_accuracy: float
    test_accuracy: float
    seconds: float
    probes: int
    extra: dict = field(default_factory=dict)


def probe_points(budget: float, count: int) -> list[float]:
    """Backprop counts to probe at: 0, then ``count - 1`` points spaced geometrically up to ``budget``
    (early training changes geometry fastest, so probes are denser there)."""
    if count < 2:
        return [0.0]
    # with one point after 0, geomspace would return its start (budget / 40): the last probe belongs at the end
    pts = np.geomspace(budget / 40.0, budget, count - 1) if count > 2 else [budget]
    return [0.0] + [float(p) for p in pts]


def _accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def _train_one(
    name: str,
    hparams: dict[str, Any],
    data: tuple[torch.Tensor, ...],
    *,
    budget: float,
    probes: int,
    metrics: dict[str, dict],
    run_dir: str,
    seed: int,
    hidden: tuple[int, ...],
    on_progress: Callable[[str, float], None] | None,
) -> DemoResult:
    X, y, Xte, yte = data
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)          # the same initial weights for every optimizer
        model = DigitsMLP(hidden)
    opt = optim.make(name, model.parameters(), **hparams)
    counter = optim.track_backprops(opt)
    loss_fn = nn.CrossEntropyLoss()
    probe_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))[:PROBE_SAMPLES]
    batch = TR_BATCH if isinstance(opt, optim.EllipsoidalTR) else TRAIN_BATCH
    state = {"step": 0}
    points = probe_points(budget, probes)
    probe = GeometryProbe(
        model, loss_fn, (X[probe_idx], y[probe_idx]), metrics=metrics, optimizer=opt, run_dir=run_dir, seed=seed,
        schedule=manual(f"at {len(points)} backprop counts from 0 to {points[-1]:g}, geometrically spaced"),
        meta={"demo": {"optimizer": name, "hparams": hparams, "train_batch": batch, "budget_backprops": budget,
                       "hidden": list(hidden), "data": "sklearn digits", "probe_samples": PROBE_SAMPLES}},
        annotate=lambda: {"backprops": counter.backprops, "train_accuracy": _accuracy(model, X, y)},
    )
    t0 = time.perf_counter()
    probe.probe(0)
    next_point = 1
    order = torch.randperm(len(y), generator=gen)
    cursor = 0
    last_loss = float("nan")
    try:
        while counter.backprops < budget:
            if cursor + batch > len(y):
                order, cursor = torch.randperm(len(y), generator=gen), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            loss = opt.step(optim.make_closure(opt, lambda: loss_fn(model(X[idx]), y[idx])))
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise ConfigurationError(f"{name} diverged (loss {last_loss}); lower its learning rate")
            state["step"] += 1
            while next_point < len(points) and counter.backprops >= points[next_point]:
                probe.probe(state["step"])
                next_point += 1
            if on_progress is not None:
                on_progress(name, min(1.0, counter.backprops / budget))
    finally:
        probe.close()
        counter.remove()
    return DemoResult(
        optimizer=name, run_dir=run_dir, steps=state["step"], backprops=counter.backprops, final_loss=last_loss,
        train_accuracy=_accuracy(model, X, y), test_accuracy=_accuracy(model, Xte, yte),
        seconds=time.perf_counter() - t0, probes=len(probe.records),
    )


def run_demo(
    out_dir: str,
    *,
    optimizers: Sequence[str] = tuple(DEMO_OPTIMIZERS),
    budget: float = 1500.0,
    probes: int = 6,
    metrics: dict[str, dict] | None = None,
    seed: int = 0,
    hidden: tuple[int, ...] = (64,),
    force: bool = False,
    on_progress: Callable[[str, float], None] | None = None,
) -> list[DemoResult]:
    """Train the digits MLP with each optimizer on ``budget`` backprops, probing ``probes`` times each.

    Writes ``out_dir/<optimizer>/`` runs (meta.json + records.jsonl). Refuses an existing non-empty
    ``out_dir`` unless ``force``. Cost: ``budget`` backprops of training per optimizer plus the probes'
    HVPs (recorded in each record's ``cost``).
    """
    for name in optimizers:
        optim.get(name)
    if budget <= 0 or probes < 1:
        raise ConfigurationError(f"need budget > 0 and probes >= 1, got budget={budget}, probes={probes}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not force:
            raise ConfigurationError(
                f"output folder {out_dir!r} exists and is not empty; pass --force to replace it or choose "
                "another with --out"
            )
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if os.path.isfile(os.path.join(path, "meta.json")):
                shutil.rmtree(path)
    os.makedirs(out_dir, exist_ok=True)
    data = load_digits_tensors(seed=seed)
    results = []
    for name in optimizers:
        hparams = DEMO_OPTIMIZERS.get(name, {})
        results.append(_train_one(
            name, hparams, data, budget=budget, probes=probes, metrics=metrics or DEMO_METRICS,
            run_dir=os.path.join(out_dir, name), seed=seed, hidden=hidden, on_progress=on_progress,
        ))
    return results
