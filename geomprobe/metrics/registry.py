"""Registry of metrics by name.

A metric is a function ``fn(landscape, **options) -> dict`` returning plain JSON-ready values in the result
shape of DESIGN.md (``x`` beside ``x_err``, ``converged`` where an iteration can stop short, ``hvps`` for its
cost, ``blocks`` per parameter block). It registers itself with :func:`register`, which records its cost in
HVPs (a description and, where known, a function of the options) and what it needs beyond the Landscape
(``optimizer`` for preconditioned metrics, ``noise_batches`` for gradient-noise metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigurationError

__all__ = ["Metric", "register", "get", "available", "REGISTRY"]


@dataclass(frozen=True)
class Metric:
    """A registered metric: its name, function, cost in HVPs and the inputs it needs besides a Landscape."""

    name: str
    fn: Callable[..., dict]
    cost: str
    needs: frozenset[str] = field(default_factory=frozenset)
    description: str = ""

    def __call__(self, landscape: Any, **options: Any) -> dict:
        return self.fn(landscape, **options)


REGISTRY: dict[str, Metric] = {}


def register(name: str, *, cost: str, needs: tuple[str, ...] = (), description: str = "") -> Callable:
    """Decorator registering ``fn`` under ``name`` with a cost description in HVPs."""

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ConfigurationError(f"metric {name!r} is registered twice")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else description
        REGISTRY[name] = Metric(name, fn, cost, frozenset(needs), doc or "")
        return fn

    return deco


def get(name: str) -> Metric:
    """The metric registered as ``name``; a clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "(none)"
        raise ConfigurationError(f"unknown metric {name!r}; known metrics: {known}") from None


def available() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(REGISTRY)
