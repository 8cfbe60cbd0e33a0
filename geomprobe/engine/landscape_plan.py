"""A Landscape's memory plan within a :class:`~geomprobe.engine.memory_plan.MemoryBudget`: the figures read
from the device, the model and the budget; the graph measured and the attention chosen
(:mod:`~geomprobe.engine.attention_plan`); the settings planned (:func:`~geomprobe.engine.memory_plan.plan_memory`)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..errors import ConfigurationError
from .attention_plan import plan_attention
from .batches import batch_size
from .host_stream import host_vectors_possible
from .memory_plan import MemoryBudget, MemoryPlan, plan_memory
from .memory_readings import device_memory, host_available_bytes

__all__ = ["plan_within"]


def plan_within(land: Any, memory: MemoryBudget | str, chunk_size: int | None, micro_batch_size: int | None,
                graph_budget_bytes: int | None, recompute: bool | None) -> tuple[MemoryPlan, dict, dict]:
    """The plan of ``land`` (a Landscape before its build) within ``memory`` (``"auto"``: the device's free
    memory), with explicit settings as overrides; returns the plan, the attention record and the graph figures
    per attention (:func:`~geomprobe.engine.attention_plan.plan_attention`). Cost: at most two measuring
    forwards on a slice of the first batch, none when the budget gives the figures or sets no limit."""
    if isinstance(memory, str):
        if memory != "auto":
            raise ConfigurationError(f"memory must be 'auto', None, a MemoryBudget or a MemoryPlan, got {memory!r}")
        memory = MemoryBudget()
    if not isinstance(memory, MemoryBudget):
        raise ConfigurationError(
            f"memory must be 'auto', None, a MemoryBudget or a MemoryPlan, got {type(memory).__name__}"
        )
    overrides = {k: (v, "user") for k, v in (("chunk_size", chunk_size), ("micro_batch_size", micro_batch_size),
                                              ("graph_budget_bytes", graph_budget_bytes)) if v is not None}
    overrides.update({k: v for k, v in memory.overrides.items() if v is not None and v[0] is not None})
    if getattr(land, "_vectors_requested", None) is not None:  # the Landscape's vector_device wins
        overrides["vectors"] = (land._vectors_requested, "user")
    available, allocated = device_memory(land.device)
    can_split = not (land.mode == "train" and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in land.model.modules()))
    common = dict(
        dim=land.space.dim, itemsize=land.dtype.itemsize, batch_sizes=[batch_size(b) for b in land.batches],
        available_bytes=available, allocated_bytes=allocated, train_peak_bytes=memory.train_peak_bytes,
        peak_ratio=memory.peak_ratio, cap_bytes=memory.cap_bytes, host_bytes=host_available_bytes(),
        bounded_basis=bool(memory.bounded_basis), can_split=can_split, gradient_samples=memory.gradient_samples,
        host_is_device=land.device.type == "cpu", overrides=overrides, host_vectors=host_vectors_possible(land),
        largest_param_bytes=max(p.numel() * p.element_size() for p in land.params),
        **({} if memory.basis_vectors is None else {"basis_vectors": memory.basis_vectors}),
    )

    def planned(per_sample: float | None, source: str | None, persample: float | None) -> MemoryPlan:
        return plan_memory(graph_bytes_per_sample=per_sample, graph_source=source,
                           persample_graph_bytes_per_sample=persample, **common)

    plan, record, figures = plan_attention(land, memory, planned, can_split, recompute)
    if plan.warnings and memory.warn:
        warnings.warn(f"geomprobe memory plan: {'; '.join(plan.warnings)}", RuntimeWarning, stacklevel=5)
    return plan, record, figures
