"""A Hugging Face Trainer callback: ``Trainer(..., callbacks=[GeometryProbeCallback()])``.

The Trainer never hands callbacks a batch, so the probe data are drawn at train start from the Trainer's
train DataLoader (``probe_samples`` samples, seeded, collated by its data collator) unless given. The loss
is the model's own ``model(**batch).loss`` unless ``loss_fn`` is given.
"""

from __future__ import annotations

from typing import Any, Callable

from transformers import TrainerCallback

from ._common import ProbeDriver

__all__ = ["GeometryProbeCallback"]


def _model_loss(model: Any, batch: Any):
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


class GeometryProbeCallback(TrainerCallback):
    """Attach a :class:`geomprobe.GeometryProbe` to a ``transformers.Trainer``.

    Takes the GeometryProbe's keyword arguments (``metrics``, ``schedule``, ``run_dir``, ``mode``, ...);
    ``loss_fn`` and ``probe_data`` are optional here. Probes at ``state.global_step`` (optimizer steps).
    """

    def __init__(self, loss_fn: Callable | None = None, probe_data: Any = None, **probe_options: Any):
        self._driver = ProbeDriver(loss_fn, probe_data, probe_options)

    @property
    def probe(self):
        return self._driver.probe

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero and "run_dir" in self._driver.options:
            self._driver.options = {**self._driver.options, "run_dir": None}
        self._driver.start(model, _model_loss, train_dataloader, optimizer, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._driver.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._driver.close(state.global_step)
