"""geomprobe: the local geometry of a neural network's loss along its training trajectory."""

from importlib.metadata import PackageNotFoundError, version

from . import krylov, metrics, optim
from .errors import (
    ConfigurationError,
    GeomprobeError,
    NonFiniteLossError,
    OptimizerStateError,
    UnsupportedOperationError,
)
from .landscape import Landscape, unwrap_model
from .paramspace import Block, ParamSpace
from .probe import GeometryProbe
from .runs import RunReader, RunWriter
from .schedule import at, budget, every, log_spaced, manual
from .state import frozen

try:
    __version__ = version("geomprobe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    # measuring
    "Landscape",
    "ParamSpace",
    "Block",
    "frozen",
    "unwrap_model",
    "krylov",
    "metrics",
    "optim",
    # profiling along training
    "GeometryProbe",
    "every",
    "log_spaced",
    "at",
    "manual",
    "budget",
    "RunWriter",
    "RunReader",
    # errors
    "GeomprobeError",
    "ConfigurationError",
    "NonFiniteLossError",
    "OptimizerStateError",
    "UnsupportedOperationError",
]
