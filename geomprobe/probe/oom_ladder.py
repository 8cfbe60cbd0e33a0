"""The probe's out-of-memory safety net: after a probe part runs out of device memory, the settings of the
remaining metrics and of every later probe step down one rung.

The rungs, each taken only when the one before cannot help: half the vectors per batched HVP (``chunk_size``;
a metric that only ever asked for one vector at a time, as Lanczos, gains nothing from it, so the next rung
follows at once); once the graph is in pieces, the Lanczos basis in host memory (``basis_device``); with both,
the HVP's vectors in host memory too (``vectors``, :mod:`geomprobe.engine.host_stream`); otherwise half the
micro-batches with one first-order graph kept (same Hessian, slower probes). What each rung changed is in
``probe._ladder``, recorded as ``"oom-ladder"`` beside the plan's own settings (:mod:`.memory_budget`). The
memory plan avoids most of these failures beforehand; this is what remains when its model of the memory is
wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.batches import first_tensor
from ..engine.host_stream import host_vectors_possible
from ..engine.memory_plan import DEFAULT_CHUNK_SIZE

__all__ = ["is_oom", "step_down"]

_OOM_TYPES: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory (torch's error type, or a RuntimeError saying so)."""
    return isinstance(e, _OOM_TYPES) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def step_down(probe: Any, where: str, land: Any, error: BaseException) -> None:
    """Take the next rung (module docstring) for ``probe`` (a GeometryProbe) after an out-of-memory failure in
    ``where`` (a metric's name, or ``"landscape"`` for the build) on ``land`` (None when the build failed;
    ``error`` then carries the plan the build was made with).
    Costs nothing; the device's cached memory is returned to it."""
    # from the settings that ran, the plan's included (a failed build carries its plan)
    opts = probe.landscape_options
    single = land is not None and where != "landscape" and land.widest_block <= 1
    plan = land.plan if land is not None else getattr(error, "memory_plan", None)
    ran_chunk = land.chunk_size if land is not None else (
        opts["chunk_size"] or (plan.chunk_size if plan is not None else DEFAULT_CHUNK_SIZE))
    ran_micro = land.micro_batch_size if land is not None else (
        opts.get("micro_batch_size") or (plan.micro_batch_size if plan is not None else None))
    ran_basis = probe._basis_device or (plan.basis_device if plan is not None else None)
    opts["chunk_size"] = max(1, ran_chunk // 2)
    probe._ladder.add("chunk_size")
    if land is not None:
        land.chunk_size = opts["chunk_size"]
    if where == "landscape" or single or opts["chunk_size"] == 1:
        if where != "landscape" and ran_basis is None and ran_micro:
            # the graph is already in pieces: the Lanczos basis is the next largest thing on the device
            probe._basis_device = "cpu"
            probe._ladder.add("basis_device")
        elif (where != "landscape" and ran_basis == "cpu" and ran_micro and land is not None
              and land.host is None and host_vectors_possible(land)):
            # pieces, and the basis in host memory: the d-vectors left are the HVP's and Lanczos' own
            probe._vectors = "host"
            probe._ladder.add("vectors")
        else:
            shrink_micro_batches(probe, ran_micro)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shrink_micro_batches(probe: Any, ran: int | None = None) -> None:
    """Halve the probe's micro-batches and keep one first-order graph: the double backward then holds one piece
    of the batch at a time (same Hessian, slower probes), so it fits where training fits. Not in train mode
    with BatchNorm: splitting would change its batch statistics (smaller chunks are all that can be done)."""
    opts = probe.landscape_options
    if probe.mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.model.modules()):
        return
    current = ran or opts.get("micro_batch_size") or max(
        (int(t.shape[0]) for b in probe.batches for t in [first_tensor(b)] if t is not None and t.dim() > 0),
        default=1,
    )
    opts["micro_batch_size"] = max(1, current // 2)
    opts["graph_budget_bytes"] = 1
    probe._ladder.update(("micro_batch_size", "graph_budget_bytes"))
