"""The budget each probe's Landscape plans its memory within (:mod:`geomprobe.engine.memory_plan`): the cap,
the training step's peak, the settings fixed by the user or by the out-of-memory safety net, and what the
previous probe measured of the graph (per attention: :mod:`geomprobe.engine.attention_plan`), so that later
probes need no measuring forward."""

from __future__ import annotations

from typing import Any

from ..engine.memory_plan import MemoryBudget
from .metric_needs import basis_vectors, bounded_basis, gradient_samples

__all__ = ["probe_budget"]


def probe_budget(probe: Any) -> MemoryBudget | None:
    """What the next Landscape of ``probe`` (a GeometryProbe) plans within, or None when planning is off.
    Costs nothing."""
    if not probe.memory_plan:
        return None
    opts = probe.landscape_options
    fixed = {k: (opts.get(k), "oom-ladder") for k in ("chunk_size", "micro_batch_size", "graph_budget_bytes")
             if k in probe._ladder}
    if probe._basis_device is not None:
        fixed["basis_device"] = (probe._basis_device, "oom-ladder" if "basis_device" in probe._ladder else "user")
    if getattr(probe, "_vectors", None) is not None:  # host vectors, the safety net's last rung before splitting
        fixed["vectors"] = (probe._vectors, "oom-ladder")
    return MemoryBudget(cap_bytes=probe.memory_cap, train_peak_bytes=probe._train_peak, peak_ratio=probe.peak_ratio,
                        bounded_basis=bounded_basis(probe.metric_options),
                        basis_vectors=basis_vectors(probe.metric_options), overrides=fixed, warn=False,
                        gradient_samples=gradient_samples(probe.metric_options), **(probe._graph_per_sample or {}))
