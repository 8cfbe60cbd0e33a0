"""What the framework callbacks share: building the probe at train start, probing each step once, and
handing each new record's scalars to the trainer's own loggers without letting one of them stop training."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from ..probe.geometry_probe import GeometryProbe
from ..probe.summary import probe_scalars

__all__ = ["ProbeDriver", "ScalarForwarder"]


class ProbeDriver:
    """Holds the options until training starts, then the probe; probes each optimizer step at most once."""

    def __init__(self, loss_fn: Callable | None, probe_data: Any, options: dict[str, Any]):
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.options = options
        self.probe: GeometryProbe | None = None
        self._last_step: int | None = None

    def start(self, model, default_loss_fn: Callable, default_data: Any, optimizer, step: int) -> dict | None:
        """Build the probe (once) and probe ``step`` if the schedule says so; returns the record or None."""
        if self.probe is not None:
            return None
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
        return self.step(step)

    def step(self, step: int) -> dict | None:
        """Probe ``step`` if the schedule says so and it was not probed yet; returns the record or None."""
        # Gradient accumulation calls the batch hook several times per optimizer step: probe each step once.
        if self.probe is None or step == self._last_step:
            return None
        self._last_step = step
        return self.probe.step(step)

    def close(self, step: int | None = None) -> list[dict]:
        """At train end: ask the schedule about the last step (if the step hook never saw it), then close,
        which probes that step when the schedule skipped it (a short run, a vetoing budget). Returns the
        records these two made, for the trainer's loggers."""
        if self.probe is None:
            return []
        before = len(self.probe.records)
        if step is not None and step != self._last_step:
            self.step(step)
        self.probe.close()
        return [r for r in self.probe.records[before:] if r.get("kind") != "schedule"]  # not the skip counts

    @property
    def records(self) -> list[dict]:
        return self.probe.records if self.probe is not None else []


class ScalarForwarder:
    """Sends each probe record's scalars (:func:`~geomprobe.probe.summary.probe_scalars`, under ``prefix``) to
    sinks through ``send(sink, scalars, step)``. A sink that raises is warned about once and dropped: a
    probe never kills training, and a logger that failed once would fail again."""

    def __init__(self, send: Callable[[Any, dict[str, float], int], None], prefix: str, what: str):
        self.send, self.prefix, self.what = send, prefix, what
        self._dropped: set[int] = set()

    def __call__(self, record: dict | None, sinks: Iterable[Any]) -> int:
        """Forward ``record`` (nothing when None); returns how many sinks received it."""
        if record is None:
            return 0
        scalars = probe_scalars(record, self.prefix)
        sent = 0
        for sink in sinks:
            if id(sink) in self._dropped:
                continue
            try:
                self.send(sink, dict(scalars), int(record["step"]))
                sent += 1
            except Exception as e:
                self._dropped.add(id(sink))
                warnings.warn(
                    f"geomprobe: {self.what} {type(sink).__name__} failed on the probe's scalars at step "
                    f"{record['step']} ({type(e).__name__}: {e}); it gets no more of them, training and the run "
                    "log are unaffected", RuntimeWarning, stacklevel=3)
        return sent
