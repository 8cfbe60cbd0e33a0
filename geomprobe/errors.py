"""Exceptions geomprobe raises for failures a user can cause.

Each message says what was expected, what came, and what to do. The CLI turns these into one line on
stderr and a non-zero exit; the probe records them in the run and lets training continue.
"""

from __future__ import annotations

__all__ = [
    "GeomprobeError",
    "ConfigurationError",
    "NonFiniteLossError",
    "UnsupportedOperationError",
    "OptimizerStateError",
]


class GeomprobeError(Exception):
    """Base class of every error geomprobe raises on purpose."""


class ConfigurationError(GeomprobeError, ValueError):
    """An argument or combination of arguments that cannot work (no parameters selected, bad shape)."""


class NonFiniteLossError(GeomprobeError, FloatingPointError):
    """The loss (or its gradient) at the probed parameters is NaN or infinite."""


class UnsupportedOperationError(GeomprobeError, RuntimeError):
    """An operation in the model has no double backward (or no other route the measurement needs)."""


class OptimizerStateError(GeomprobeError, ValueError):
    """The optimizer's state cannot give what a metric needs (wrong type, no step taken yet)."""


def refuse_third_order(*tensors) -> None:
    """Raise inside a hand-written double backward asked for a graph (``create_graph=True`` on an HVP): its terms
    would be constants there, so third derivatives would be silently wrong."""
    import torch

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise UnsupportedOperationError(
            "third derivatives through geomprobe's fast double backward are not implemented; build the "
            "Landscape with fast_double_backward=False to differentiate Hessian-vector products"
        )
