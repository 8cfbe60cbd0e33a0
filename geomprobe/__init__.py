"""geomprobe: the local geometry of a neural network's loss along its training trajectory."""

from importlib.metadata import PackageNotFoundError, version

from . import linalg, metrics, optim
from .engine.landscape import Landscape, unwrap_model
from .engine.paramspace import Block, ParamSpace
from .engine.state import frozen
from .errors import (
    ConfigurationError,
    GeomprobeError,
    NonFiniteLossError,
    OptimizerStateError,
    UnsupportedOperationError,
)
from .probe.geometry_probe import GeometryProbe
from .probe.schedule import at, budget, every, log_spaced, manual
from .runs.reader import RunReader
from .runs.writer import RunWriter


def __getattr__(name: str):
    # ``gp.integrations.lightning.GeometryProbeCallback`` works after a bare ``import geomprobe as gp``, yet
    # importing geomprobe imports neither lightning nor transformers: the sub-package loads when first named.
    if name == "integrations":
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module 'geomprobe' has no attribute {name!r}")


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
    "linalg",
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
