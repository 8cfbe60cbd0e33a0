"""The loss of a Landscape's model at other parameters, by forward passes only, leaving the model untouched.

Views of the landscape (the loss along a line, on a plane, between checkpoints) and the ``direction``
metric's measured loss change need ``L(theta')`` at parameters ``theta'`` other than the model's own. Writing
``theta'`` into the parameters would bump their version counters and invalidate every first-order graph the
Landscape retains (and any graph the training loop holds), and restoring them by a second write is exact in
value but not in version. So the parameters are never written: each forward pass runs through
:func:`torch.func.functional_call`, which substitutes the given tensors for the module's parameters for the
duration of one call. Tied parameters stay tied (one name is measured, the other follows). Every forward pass
runs under the Landscape's state guard (:meth:`Landscape.frozen`, the same dropout masks and BatchNorm policy
as its graph), so buffers, training flags and the global RNG are returned exactly as found.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigurationError

__all__ = ["losses_at", "flat_parameters", "ForwardProgress"]

# called with (forward passes done, forward passes planned) after each point
ForwardProgress = Callable[[int, int], None]


class _LossOf(nn.Module):
    """The Landscape's loss as a module whose only submodule is the model, so that functional_call can
    substitute the model's parameters (``model.<name>``) whatever the loss's call form."""

    def __init__(self, land: Any):
        super().__init__()
        self.model = land.model
        object.__setattr__(self, "_land", land)  # not a submodule: its tensors must not be renamed

    def forward(self, batch: Any) -> torch.Tensor:
        return self._land.loss_on(batch)


def flat_parameters(land: Any) -> torch.Tensor:
    """The Landscape's measured parameters as one flat vector of length ``d`` (a detached copy)."""
    return land.space.flatten([p.detach() for p in land.params]).clone()


def losses_at(land: Any, points: Iterable[torch.Tensor], *, count: int | None = None,
              progress: ForwardProgress | None = None) -> np.ndarray:
    """The Landscape's loss (the sample-weighted combination over its probe batches) at each flat parameter
    vector in ``points`` (length ``d``, in the order of ``land.space``), as a float64 array.

    Cost: ``len(points) * len(land.batches)`` forward passes under ``torch.no_grad`` (no graph, no HVP).
    Exact: the same forward computation as :attr:`Landscape.loss`, so at the model's own parameters it
    reproduces that value up to the rounding of the loss's sum over batches. A non-finite loss is returned as
    it is (a view that crosses a divergence shows it). ``count``: how many points, for ``progress``. Each
    point's forward passes are added to the Landscape's count (:meth:`Landscape.note_forwards`).
    Under torch.distributed the losses are those of the union of every rank's shard (one collective at the end).
    """
    wrapper = _LossOf(land)
    names = [f"model.{n}" for n in land.param_names]
    batches = len(land.batches)
    total = None if count is None else count * batches
    note = getattr(land, "note_forwards", None)  # the Landscape's count, which a probe's progress follows
    out: list[torch.Tensor] = []  # kept on the device: no host synchronization per forward pass
    with torch.no_grad():
        for theta in points:
            if theta.dim() != 1 or theta.shape[0] != land.dim:
                raise ConfigurationError(f"a parameter vector has shape {tuple(theta.shape)}, expected ({land.dim},)")
            theta = theta.to(device=land.device, dtype=land.dtype)
            params = dict(zip(names, land.space.split(theta)))
            loss = torch.zeros((), dtype=torch.float64, device=land.device)
            for b, batch in enumerate(land.batches):
                with land.frozen(b):
                    value = torch.func.functional_call(wrapper, params, (batch,), strict=False)
                loss += value.detach().double() * land.weights[b]
            out.append(loss)
            if note is not None:
                note(batches)
            if progress is not None:
                progress(len(out) * batches, total if total is not None else len(out) * batches)
    if not out:
        return np.zeros(0)
    values = torch.stack(out)
    land.reducer.sum_(values)
    return values.cpu().numpy()
