"""What a probe's set of metrics needs from its memory plan, read from the metrics' signatures and registry
entries: whether they stream gradient samples, the most Lanczos vectors they store, whether they can bound
that basis; and the memory budget a probe's next Landscape plans within. Costs nothing (no HVP, no allocation)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..engine.memory_plan import DEFAULT_BASIS_VECTORS
from ..metrics import registry

__all__ = ["basis_vectors", "bounded_basis", "gradient_samples"]


def gradient_samples(metric_options: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a metric streams gradient samples (``noise``, ``isotropy``)."""
    return any("noise_batches" in registry.get(n).needs for n in metric_options)


def basis_vectors(metric_options: Mapping[str, Mapping[str, Any]]) -> int:
    """The most vectors a Lanczos run of the metrics stores: its step limit plus one (0: none runs)."""
    need = [0]
    for name, opts in metric_options.items():
        params = inspect.signature(registry.get(name).fn).parameters
        for key in ("max_iter", "lanczos_max_iter", "m"):  # spectrum/precond/saddle, isotropy, density
            if key in params:
                steps = opts.get(key, params[key].default)
                need.append(DEFAULT_BASIS_VECTORS if steps is None else int(steps) + 1)
                break
    return max(need)


def bounded_basis(metric_options: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether every metric that runs Lanczos with a placeable basis can also bound it (``max_basis``)."""
    takes = [inspect.signature(registry.get(n).fn).parameters for n in metric_options]
    lanczos = [p for p in takes if "basis_device" in p]
    return bool(lanczos) and all("max_basis" in p for p in lanczos)
