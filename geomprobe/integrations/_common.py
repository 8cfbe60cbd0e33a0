"""What the framework callbacks share: building the probe at train start and probing each step once."""

from __future__ import annotations

from typing import Any, Callable

from ..probe.geometry_probe import GeometryProbe


class ProbeDriver:
    """Holds the options until training starts, then the probe; probes each optimizer step at most once."""

    def __init__(self, loss_fn: Callable | None, probe_data: Any, options: dict[str, Any]):
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.options = options
        self.probe: GeometryProbe | None = None
        self._last_step: int | None = None

    def start(self, model, default_loss_fn: Callable, default_data: Any, optimizer, step: int) -> None:
        if self.probe is not None:
            return
        options = dict(self.options)
        if self.loss_fn is None:
            options.setdefault("loss_form", "model")
        self.probe = GeometryProbe(
            model,
            self.loss_fn or default_loss_fn,
            self.probe_data if self.probe_data is not None else default_data,
            optimizer=optimizer,
            **options,
        )
        self.step(step)

    def step(self, step: int) -> None:
        # Gradient accumulation calls the batch hook several times per optimizer step: probe each step once.
        if self.probe is None or step == self._last_step:
            return
        self._last_step = step
        self.probe.step(step)

    def close(self, step: int | None = None) -> None:
        """At train end: ask the schedule about the last step (if the step hook never saw it), then close,
        which probes that step when the schedule skipped it (a short run, a vetoing budget)."""
        if self.probe is not None:
            if step is not None and step != self._last_step:
                self.step(step)
            self.probe.close()

    @property
    def records(self) -> list[dict]:
        return self.probe.records if self.probe is not None else []
