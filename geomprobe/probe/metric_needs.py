"""What a probe's set of metrics needs from its memory plan, read from the metrics' signatures and registry
entries: whether they stream gradient samples, the most Lanczos vectors they store, whether they can bound
that basis; and the memory budget a probe's next Landscape plans within. Costs nothing (no HVP, no allocation)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..engine.memory_plan import DEFAULT_BASIS_VECTORS, MemoryBudget
from ..metrics import registry

__all__ = ["basis_vectors", "bounded_basis", "gradient_samples", "memory_budget"]


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


def memory_budget(probe: Any) -> MemoryBudget | None:
    """What the next Landscape of a :class:`~.geometry_probe.GeometryProbe` plans within: the cap, the training
    peak, and the settings fixed by the user or by the out-of-memory safety net (which one is recorded in the
    plan); ``None`` when the probe's ``memory_plan`` is off."""
    if not probe.memory_plan:
        return None
    opts = probe.landscape_options
    fixed = {k: (opts.get(k), "oom-ladder") for k in ("chunk_size", "micro_batch_size", "graph_budget_bytes")
             if k in probe._ladder}
    if probe._basis_device is not None:
        fixed["basis_device"] = (probe._basis_device, "oom-ladder" if "basis_device" in probe._ladder else "user")
    return MemoryBudget(cap_bytes=probe.memory_cap, train_peak_bytes=probe._train_peak, peak_ratio=probe.peak_ratio,
                        graph_bytes_per_sample=probe._graph_per_sample, bounded_basis=bounded_basis(probe.metric_options),
                        basis_vectors=basis_vectors(probe.metric_options), overrides=fixed, warn=False,
                        gradient_samples=gradient_samples(probe.metric_options))
