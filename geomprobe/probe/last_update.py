"""The optimizer's last step, ``theta_t - theta_{t-1}``, for the metrics and views that take ``last_update``.

A step post-hook (where the probe runs) sees only ``theta_t``; the optimizer's state does not give the step
in general (Adam's step is not its momentum, weight decay and clipping add their terms). So a step pre-hook
copies the measured parameters just before each optimizer step into one preallocated buffer, and the step
is the difference afterwards: exact for any optimizer, at the cost of one copy of ``d`` numbers per step
and ``d`` numbers of memory. The copy only reads the parameters (no write, no RNG): training is unchanged.
Installed only when a metric of the probe takes ``last_update``.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Mapping

import torch

from .. import views  # noqa: F401  (registers the view_line and view_plane probe entries)
from ..metrics import registry

__all__ = ["LastUpdate", "wants_last_update"]


def wants_last_update(metric_options: Mapping[str, Any]) -> bool:
    """Whether any of the metrics takes ``last_update``."""
    return any("last_update" in inspect.signature(registry.get(n).fn).parameters for n in metric_options)


class LastUpdate:
    """Keeps the parameters from before the latest optimizer step of ``optimizer`` (``params``, in order)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        self.params = params
        self._before: list[torch.Tensor] | None = None
        # Landscape -> its flat step: one flatten per probe, dropped with the Landscape (a d-vector that would
        # otherwise stay through the next training step, until the next optimizer step)
        self._flat: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._handle = optimizer.register_step_pre_hook(self._pre)

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._flat.clear()
        with torch.no_grad():
            if self._before is None:
                self._before = [p.detach().clone() for p in self.params]
            else:
                for b, p in zip(self._before, self.params):
                    b.copy_(p.detach())

    def step_of(self, land: Any) -> torch.Tensor | None:
        """The last step as a flat vector of ``land``'s parameters, or None before the first step (or when the
        Landscape measures other parameters than those tracked)."""
        if land in self._flat:
            return self._flat[land]
        step = None
        if self._before is not None and len(land.params) == len(self.params) and all(
                a is b for a, b in zip(land.params, self.params)):
            step = land.space.flatten([p.detach() - b for p, b in zip(self.params, self._before)])
        self._flat[land] = step  # released with the Landscape, or at the next optimizer step
        return step

    def remove(self) -> None:
        self._handle.remove()
