"""A Lightning callback that probes geometry along training: ``Trainer(callbacks=[GeometryProbeCallback()])``.

Lightning never hands a callback a batch before training starts, so the probe data are drawn at train
start from the trainer's train DataLoader (``probe_samples`` samples, seeded) unless given.

The loss: ``loss_fn`` when given (``loss_fn(model, batch)``, or a torch loss taking ``(outputs, targets)``
such as the module's own ``criterion``); otherwise the module's own ``training_step`` in a sandbox
(:mod:`.lightning_step`) that disables ``self.log``, optimizer and scheduler steps and backward and puts the
module's attributes back, so the user's logged metrics, monitors, checkpoints and parameters are exactly
those of training without the probe. The module's loss attribute is never guessed: the loss measured is
the one training optimizes unless the user names another.

Each probe's scalars also go to the trainer's loggers (``trainer.loggers``: TensorBoard, CSV, W&B, MLflow,
...) under ``geomprobe/`` at the probe's step, through each logger's ``log_metrics``, never ``self.log``,
so the user's metrics, ``callback_metrics`` and monitors never see them (``log_to_trainer=False``: the run
log only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from ..probe.summary import DEFAULT_PREFIX
from ._common import ProbeDriver, ScalarForwarder
from .lightning_step import training_step_loss

__all__ = ["GeometryProbeCallback"]


def _train_loader(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    # A CombinedLoader wraps the user's loaders; the probe draws from the first one.
    flat = getattr(loader, "flattened", None)
    return flat[0] if flat else loader


def _log_metrics(logger: Any, scalars: dict[str, float], step: int) -> None:
    logger.log_metrics(scalars, step=step)


class GeometryProbeCallback(pl.Callback):
    """Attach a :class:`geomprobe.GeometryProbe` to a Lightning Trainer.

    Takes the GeometryProbe's keyword arguments (``metrics``, ``schedule``, ``run_dir``, ``mode``,
    ``summary``, ...); ``loss_fn`` and ``probe_data`` are optional here (see the module docstring for the
    loss used without ``loss_fn``). Probes at ``trainer.global_step`` (optimizer steps).

    ``log_to_trainer`` (default True): send each probe's scalars (:func:`geomprobe.probe.summary.probe_scalars`)
    to ``trainer.loggers`` under ``prefix`` at the probe's step. On by default because a logger attached to
    the trainer is where its user looks, as with Lightning's own LearningRateMonitor; the keys are the
    probe's own, so no user metric, monitor or checkpoint callback is affected. A logger that raises is
    warned about once and gets no more scalars.
    """

    def __init__(self, loss_fn: Callable | None = None, probe_data: Any = None, *, log_to_trainer: bool = True,
                 prefix: str = DEFAULT_PREFIX, **probe_options: Any):
        super().__init__()
        self._driver = ProbeDriver(loss_fn, probe_data, probe_options)
        self.log_to_trainer = bool(log_to_trainer)
        self._forward = ScalarForwarder(_log_metrics, prefix, "the Lightning logger")

    @property
    def probe(self):
        return self._driver.probe

    def _send(self, trainer: pl.Trainer, record: dict | None) -> None:
        if self.log_to_trainer:
            self._forward(record, trainer.loggers)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 and "run_dir" in self._driver.options:
            self._driver.options = {**self._driver.options, "run_dir": None}
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        record = self._driver.start(pl_module, training_step_loss, _train_loader(trainer), optimizer,
                                    trainer.global_step)
        self._send(trainer, record)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._send(trainer, self._driver.step(trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for record in self._driver.close(trainer.global_step):
            self._send(trainer, record)
