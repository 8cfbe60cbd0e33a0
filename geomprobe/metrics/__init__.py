"""Metrics: one module per statistic, each registered by name with its cost in HVPs.

Every metric takes a :class:`geomprobe.Landscape` plus options and returns a plain dict in the result shape
of DESIGN.md: each estimate ``x`` beside its error ``x_err``, ``converged`` where an iteration can stop
short, ``hvps`` for its cost, and ``blocks`` per parameter block.
"""

from .density import density
from .diagshare import diagshare
from .precond import precond
from .registry import REGISTRY, Metric, available, get, register
from .rmed import rmed
from .saddle import saddle
from .spectrum import spectrum

__all__ = ["Metric", "REGISTRY", "available", "get", "register", "spectrum"]
__all__ += ["density", "rmed", "diagshare", "precond", "saddle"]
from .isotropy import isotropy
from .noise import noise

__all__ += ["noise", "isotropy"]
from .trace import trace

__all__ += ["trace"]
from .precision import precision

__all__ += ["precision"]
from . import costs  # noqa: E402,F401  (the planned costs of the metrics above)
from .direction import direction  # noqa: E402

__all__ += ["direction"]
