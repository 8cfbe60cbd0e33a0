"""Work accounting in backprops, so first- and second-order optimizers compare on one axis.

Kohler, Adolphs, Lucchi ("Adaptive norms for deep learning with regularized Newton methods") measure cost in
backpropagations::

    backprops = 1 · gradients + 1 · HVPs + ½ · function values

A gradient is a forward and a backward pass; a Hessian-vector product on a retained first-order graph costs
about one more backward; a function value is a forward pass alone. A first-order step (SGD, Adam) is one
gradient. An :class:`~geomprobe.optim.EllipsoidalTR` step is one gradient, its CG iterations' HVPs and one
function value at the trial point; it reports this through its ``last_step_work`` attribute, which
:func:`track_backprops` reads.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2))
>>> opt = torch.optim.SGD([w], lr=0.1)
>>> counter = track_backprops(opt)
>>> for _ in range(3):
...     opt.zero_grad(); (w ** 2).sum().backward(); opt.step()
>>> counter.backprops
3.0
>>> counter.remove()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigurationError

__all__ = [
    "GRADIENT_COST",
    "HVP_COST",
    "FUNCTION_VALUE_COST",
    "BackpropCounter",
    "track_backprops",
]

GRADIENT_COST = 1.0
HVP_COST = 1.0
FUNCTION_VALUE_COST = 0.5


@dataclass
class BackpropCounter:
    """A tally of gradients, HVPs and function values, and their cost in backprops."""

    gradients: int = 0
    hvps: int = 0
    function_values: int = 0
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def backprops(self) -> float:
        """``gradients + hvps + ½ · function_values``."""
        return (GRADIENT_COST * self.gradients + HVP_COST * self.hvps
                + FUNCTION_VALUE_COST * self.function_values)

    def add(self, *, gradients: int = 0, hvps: int = 0, function_values: int = 0) -> None:
        """Add work done outside an optimizer step (a probe's gradient, say) to the tally."""
        self.gradients += gradients
        self.hvps += hvps
        self.function_values += function_values

    def merge(self, other: BackpropCounter) -> None:
        """Add another tally to this one."""
        self.add(gradients=other.gradients, hvps=other.hvps, function_values=other.function_values)

    def as_dict(self) -> dict[str, float]:
        """Plain JSON-ready counts, with the total under ``backprops``."""
        return {"gradients": self.gradients, "hvps": self.hvps,
                "function_values": self.function_values, "backprops": self.backprops}

    def remove(self) -> None:
        """Stop counting the optimizer this counter was attached to by :func:`track_backprops`."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _step_work(optimizer: torch.optim.Optimizer) -> BackpropCounter:
    work = getattr(optimizer, "last_step_work", None)
    if isinstance(work, BackpropCounter):
        return work
    # A first-order step consumes the one gradient the loop's backward() produced before it.
    return BackpropCounter(gradients=1)


def track_backprops(optimizer: torch.optim.Optimizer,
                    counter: BackpropCounter | None = None) -> BackpropCounter:
    """Count every later ``optimizer.step()`` in backprops; returns the (live) counter.

    Each step adds the optimizer's ``last_step_work`` where it reports one (the trust region does), and one
    gradient otherwise. Call ``counter.remove()`` to stop. Optimizers whose closure is evaluated several
    times per step (L-BFGS) are undercounted by this default; count their closure calls with ``add``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigurationError(
            f"track_backprops expects a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    counter = BackpropCounter() if counter is None else counter

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        counter.merge(_step_work(opt))

    counter.handle = optimizer.register_step_post_hook(hook)
    return counter
