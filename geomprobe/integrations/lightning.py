"""A Lightning callback that probes geometry along training: ``Trainer(callbacks=[GeometryProbeCallback()])``.

Lightning never hands a callback a batch before training starts, so the probe data are drawn at train
start from the trainer's train DataLoader (``probe_samples`` samples, seeded) unless given. The loss is the
module's own ``training_step`` (its ``loss`` when it returns a dict) unless ``loss_fn`` is given.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl

from ._common import ProbeDriver

__all__ = ["GeometryProbeCallback"]


def _training_step_loss(module: pl.LightningModule, batch: Any):
    out = module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out


def _train_loader(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    # A CombinedLoader wraps the user's loaders; the probe draws from the first one.
    flat = getattr(loader, "flattened", None)
    return flat[0] if flat else loader


class GeometryProbeCallback(pl.Callback):
    """Attach a :class:`geomprobe.GeometryProbe` to a Lightning Trainer.

    Takes the GeometryProbe's keyword arguments (``metrics``, ``schedule``, ``run_dir``, ``mode``, ...);
    ``loss_fn`` and ``probe_data`` are optional here. Probes at ``trainer.global_step`` (optimizer steps).
    """

    def __init__(self, loss_fn: Callable | None = None, probe_data: Any = None, **probe_options: Any):
        super().__init__()
        self._driver = ProbeDriver(loss_fn, probe_data, probe_options)

    @property
    def probe(self):
        return self._driver.probe

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 and "run_dir" in self._driver.options:
            self._driver.options = {**self._driver.options, "run_dir": None}
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._driver.start(pl_module, _training_step_loss, _train_loader(trainer), optimizer, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._driver.step(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._driver.close(trainer.global_step)
