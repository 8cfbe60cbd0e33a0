"""A Hugging Face Trainer callback: ``Trainer(..., callbacks=[GeometryProbeCallback()])``.

The Trainer never hands callbacks a batch, so the probe data are drawn at train start from the Trainer's
train DataLoader (``probe_samples`` samples, seeded, collated by its data collator) unless given. The loss
is the model's own ``model(**batch).loss`` unless ``loss_fn`` is given.

Each probe's scalars also reach the Trainer's other callbacks' ``on_log`` (the ``report_to`` integrations:
TensorBoard, W&B, MLflow, ...; a user's own logging callback) under ``geomprobe/`` at the probe's step.
``Trainer.log`` is not used: it appends to ``state.log_history`` (the loss history that
``trainer_state.json``, ``load_best_model_at_end`` and plotting read) and setting ``control.should_log``
would make the Trainer log, and so average and reset, its running training loss at the probe's step. So
the callback calls ``on_log(args, state, control, logs=scalars)`` of each other callback itself, as the
Trainer's callback handler would, at ``state.global_step`` (the step the integrations log at), leaving
``log_history`` and the user's loss untouched. The console printers (progress bar, printer) are skipped:
``summary=True`` prints the probe's line instead. A callback whose ``on_log`` raises on the probe's
scalars is warned about once and gets no more of them.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

from ..probe.summary import DEFAULT_PREFIX
from ._common import ProbeDriver, ScalarForwarder

__all__ = ["GeometryProbeCallback"]

# Callbacks that only print or steer the loop: the probe's scalars would be console noise or flow changes there.
_SKIPPED = (DefaultFlowCallback, PrinterCallback, ProgressCallback)
_SKIPPED_NAMES = frozenset({"NotebookProgressCallback"})


def _model_loss(model: Any, batch: Any):
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def _calling_handler() -> CallbackHandler | None:
    """The CallbackHandler whose ``call_event`` is running this callback's hook (callbacks are not handed
    the Trainer or its handler; the handler is the caller a few frames up)."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


class GeometryProbeCallback(TrainerCallback):
    """Attach a :class:`geomprobe.GeometryProbe` to a ``transformers.Trainer``.

    Takes the GeometryProbe's keyword arguments (``metrics``, ``schedule``, ``run_dir``, ``mode``,
    ``summary``, ...); ``loss_fn`` and ``probe_data`` are optional here. Probes at ``state.global_step``
    (optimizer steps).

    ``log_to_trainer`` (default True): send each probe's scalars (:func:`geomprobe.probe.summary.probe_scalars`)
    under ``prefix`` to the other callbacks' ``on_log`` on the main process (see the module docstring for
    why not through ``Trainer.log``). On by default: with ``report_to`` set, the user looks at those
    dashboards; with ``report_to="none"`` there is no one to receive them and nothing is sent.
    """

    def __init__(self, loss_fn: Callable | None = None, probe_data: Any = None, *, log_to_trainer: bool = True,
                 prefix: str = DEFAULT_PREFIX, **probe_options: Any):
        self._driver = ProbeDriver(loss_fn, probe_data, probe_options)
        self.log_to_trainer = bool(log_to_trainer)
        self._handler: CallbackHandler | None = None
        self._forward = ScalarForwarder(self._on_log, prefix, "the Trainer callback")
        self._event: tuple = ()
        self._warned = False

    @property
    def probe(self):
        return self._driver.probe

    def _on_log(self, callback: TrainerCallback, scalars: dict[str, float], step: int) -> None:
        args, state, control, kwargs = self._event
        callback.on_log(args, state, control, logs=scalars, **kwargs)

    def _receivers(self) -> list[TrainerCallback]:
        if self._handler is None:
            return []
        return [cb for cb in self._handler.callbacks if cb is not self and not isinstance(cb, _SKIPPED)
                and type(cb).__name__ not in _SKIPPED_NAMES]

    def _send(self, record: dict | None, args, state, control, kwargs) -> None:
        if not self.log_to_trainer or record is None or not state.is_world_process_zero:
            return
        if self._handler is None and not self._warned:
            self._warned = True
            warnings.warn("geomprobe: the Trainer's callbacks could not be found (was this callback called by a "
                          "Trainer?), so the probe's scalars go to the run log only", RuntimeWarning, stacklevel=3)
        self._event = (args, state, control, kwargs)
        try:
            self._forward(record, self._receivers())
        finally:
            self._event = ()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._handler = self._handler or _calling_handler()
        if not state.is_world_process_zero and "run_dir" in self._driver.options:
            self._driver.options = {**self._driver.options, "run_dir": None}
        record = self._driver.start(model, _model_loss, train_dataloader, optimizer, state.global_step)
        self._send(record, args, state, control,
                   {"model": model, "optimizer": optimizer, "train_dataloader": train_dataloader, **kwargs})

    def on_step_end(self, args, state, control, **kwargs):
        self._send(self._driver.step(state.global_step), args, state, control, kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        for record in self._driver.close(state.global_step):
            self._send(record, args, state, control, kwargs)
