"""A probe's dealings with its run folder before and around writing: refusing to overwrite a run, the step
a resumed run continues from, whether a value can be stored at all, the optimizer's hyperparameters the
run's meta records, the meta itself, and writing the records (:func:`write_pending`): a run that
``force=True`` replaces is left as it was until a probe has measured something, and then swapped for the new
run in one step (:func:`geomprobe.runs.replace.replace_run`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigurationError
from ..runs.encoding import Encoder
from ..runs.reader import RunReader
from ..runs.replace import replace_run
from ..runs.writer import RunWriter

__all__ = ["storable", "last_step", "refuse_existing", "optimizer_hparams", "probe_meta", "measured",
           "write_pending", "kept_old_run", "unwritten_message"]


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
                       "first_plan": probe._first_plan,
                       "recompute_attention": ("auto" if probe.landscape_options.get("recompute_attention") is None
                                               else probe.landscape_options["recompute_attention"])},
            "warm_start": probe.warm is not None,
            "cost_plan": probe.cost_plan,
            # what the budget's first-probe prediction rested on when the run started (probe_cost.py)
            "cost_prediction": probe.probe_cost.to_dict(),
        },
        "device": str(next(probe.model.parameters()).device),
        "dtype": str(next(probe.model.parameters()).dtype).replace("torch.", ""),
        **dict(extra or {}),
    }


def measured(record: Mapping[str, Any], metrics: Mapping[str, Any]) -> bool:
    """Whether a probe record holds a measurement: a loss and at least one metric's result (not a record
    whose Landscape, or every metric, failed or was skipped)."""
    return "loss" in record and any(isinstance(record.get(name), Mapping) for name in metrics)


def _holds_something(run_dir: Any) -> bool:
    return os.path.isdir(run_dir) and bool(os.listdir(run_dir))


def write_pending(probe: Any) -> None:
    """Append ``probe``'s records not yet in its run log, oldest first, opening the run at the first write.

    With ``force=True`` over a folder that holds something, nothing there is touched until a record has
    measured something (:func:`measured`): a ``loss_fn`` that cannot run must not replace a good run with
    one holding only errors. The records wait in memory (a warning says so once), and the first record that
    measured something replaces the old run with all of them at once, crash-safe. A write that fails (a full
    or read-only disk, a folder that cannot be created, a run another process writes) is a probe failure, not
    a training failure: warned once, the records kept in memory and tried again at the next probe and at
    ``close()``. Cost: the writes only.
    """
    try:
        if probe.writer is None and probe._force and _holds_something(probe.run_dir):
            if not any(measured(r, probe.metric_options) for r in probe._unwritten):
                _withhold(probe)
                return
            probe.writer = replace_run(probe.run_dir, probe_meta(probe, probe._extra_meta), probe._unwritten)
            probe._unwritten.clear()
            probe._write_error = None
            return
        if probe.writer is None:
            probe.writer = RunWriter(probe.run_dir, probe_meta(probe, probe._extra_meta), force=probe._force,
                                     resume=probe._resume)
        while probe._unwritten:
            probe.writer.append(probe._unwritten[0])
            probe._unwritten.pop(0)
    except (OSError, ConfigurationError) as e:
        probe._write_error = f"{type(e).__name__}: {e}"
        probe.failures["run log"] = probe.failures.get("run log", 0) + 1
        _warn_once(probe, "run log",
                   f"geomprobe: writing the run log to {str(probe.run_dir)!r} failed at step {probe._step} "
                   f"({probe._write_error}); training continues, the records are kept in memory and written at "
                   "the next probe or at close()")


def _withhold(probe: Any) -> None:
    first = next((r for r in probe._unwritten if r.get("errors")), None)
    why = ""
    if first is not None:
        where, message = next(iter(first["errors"].items()))
        why = f" ({where}: {message})"
    probe._write_error = (f"no probe has measured anything yet{why}, so force=True has not replaced the existing "
                          f"run in {str(probe.run_dir)!r}")
    _warn_once(probe, "run kept",
               f"geomprobe: the probe at step {probe._step} measured nothing{why}; the existing run in "
               f"{str(probe.run_dir)!r} is kept as it was until a probe measures something (force=True replaces it "
               "only then), and the records wait in memory")


def _warn_once(probe: Any, key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` goes wrong in this probe's life (training goes on)."""
    if key not in probe._warned:
        probe._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=6)


def kept_old_run(probe: Any) -> bool:
    """Whether ``probe`` (``force=True``) left the run it was to replace as it was, because none of its
    records measured anything."""
    return (probe.writer is None and probe._force and probe.run_dir is not None and bool(probe._unwritten)
            and _holds_something(probe.run_dir)
            and not any(measured(r, probe.metric_options) for r in probe._unwritten))


def unwritten_message(probe: Any) -> str:
    """What :meth:`GeometryProbe.close` says of records that never reached the run log, and what to do."""
    steps = ", ".join(str(r.get("step")) for r in probe._unwritten)
    n = len(probe._unwritten)
    if kept_old_run(probe):
        return (f"geomprobe: no probe measured anything, so the existing run in {str(probe.run_dir)!r} was left as "
                f"it was (force=True replaces a run only with one that measured something); the {n} probe "
                f"record(s) are in probe.records (steps {steps}): fix the loss_fn or the metrics and probe again")
    return (f"geomprobe: {n} probe record(s) could not be written to {str(probe.run_dir)!r} ({probe._write_error}); "
            f"they are in probe.records (steps {steps}): free space or fix the folder's permissions and write them "
            "with geomprobe.RunWriter")
