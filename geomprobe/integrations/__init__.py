"""Callbacks that attach a GeometryProbe to training frameworks in one line.

``geomprobe.integrations.lightning.GeometryProbeCallback`` (needs ``lightning``) and
``geomprobe.integrations.transformers.GeometryProbeCallback`` (needs ``transformers``). Importing
``geomprobe`` imports neither: ``gp.integrations`` loads this package when first named, and each framework
module is imported when first named here, with one clear message when its framework is not installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["lightning", "transformers"]

_EXTRAS = {"lightning": ("lightning", "lightning"), "transformers": ("transformers", "transformers")}


def __getattr__(name: str) -> ModuleType:
    if name not in _EXTRAS:
        raise AttributeError(f"module 'geomprobe.integrations' has no attribute {name!r}; the integrations are "
                             f"{', '.join(_EXTRAS)}")
    package, extra = _EXTRAS[name]
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != package:
            raise
        raise ImportError(f"geomprobe.integrations.{name} needs {package}, which is not installed; install it with "
                          f"`pip install 'geomprobe[{extra}]'`") from e
