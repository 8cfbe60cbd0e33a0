"""A probe's dealings with its run folder before and around writing: refusing to overwrite a run, the step
a resumed run continues from, whether a value can be stored at all, and the optimizer's hyperparameters the
run's meta records, and the meta itself."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigurationError
from ..runs.encoding import Encoder
from ..runs.reader import RunReader

__all__ = ["storable", "last_step", "refuse_existing", "optimizer_hparams", "probe_meta"]


def storable(value: Any, path: str) -> None:
    """Raise :class:`ConfigurationError` naming the first value the run log cannot store (a dry run of its
    encoder: arrays are set aside, not converted, so it costs next to nothing)."""
    Encoder(0).encode(value, path)


def last_step(run_dir: str | os.PathLike) -> int | None:
    """The step of the last record of the run in ``run_dir``, or None (no run, no records, no integer step)."""
    try:
        records = RunReader(run_dir).records
    except ConfigurationError:
        return None
    step = records[-1].get("step") if records else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def refuse_existing(run_dir: str | os.PathLike) -> None:
    """Refuse a non-empty folder before training starts (force/resume say what to do with it)."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ConfigurationError(
            f"run folder {str(run_dir)!r} exists and is not empty; refusing to overwrite it. Pass force=True "
            "to replace it, resume=True to append to it, or choose a new run_dir"
        )

def optimizer_hparams(optimizer: torch.optim.Optimizer | None) -> list[dict] | None:
    """The optimizer's hyperparameters per param group (everything but the parameters), JSON-ready."""
    if optimizer is None:
        return None
    out = []
    for group in optimizer.param_groups:
        h = {}
        for k, v in group.items():
            if k == "params":
                continue
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if isinstance(v, (bool, int, float, str, type(None))) or (
                isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v)
            ):
                h[k] = list(v) if isinstance(v, tuple) else v
        out.append(h)
    return out


def probe_meta(probe: Any, extra: Mapping[str, Any] | None) -> dict:
    """The run's meta.json for a GeometryProbe: model and sizes, blocks, optimizer and its hyperparameters,
    and the probe policy (mode, metrics, schedule, data, seed, memory, cost plan) a report and a comparison
    read; ``extra`` (the user's) last."""
    return {
        "model": type(probe.model).__name__,
        "parameters": sum(p.numel() for p in probe.model.parameters()),
        "measured_parameters": probe.space.dim,
        "blocks": [{"name": b.name, "size": b.size, "params": list(b.params)} for b in probe.space.blocks],
        "optimizer": type(probe.optimizer).__name__ if probe.optimizer is not None else None,
        "optimizer_hparams": optimizer_hparams(probe.optimizer),
        "probe": {
            "mode": probe.mode,
            "metrics": probe.metric_options,
            "schedule": repr(probe.schedule),
            "batches": len(probe.batches),
            "data": probe.data_policy,
            "seed": probe.seed,
            "hvp_method": probe.landscape_options["hvp_method"],
            "params": probe.landscape_options["params"],
            "group_by": probe.landscape_options["group_by"],
            "world_size": probe._reducer.world_size,
            "memory": {"planned": probe.memory_plan, "memory_cap": probe.memory_cap, "peak_ratio": probe.peak_ratio,
                       "first_plan": probe._first_plan},
            "warm_start": probe.warm is not None,
            "cost_plan": probe.cost_plan,
        },
        "device": str(next(probe.model.parameters()).device),
        "dtype": str(next(probe.model.parameters()).dtype).replace("torch.", ""),
        **dict(extra or {}),
    }
