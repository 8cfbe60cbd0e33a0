"""Data-parallel probing: reducing the loss, the gradient and HVPs across ranks with torch.distributed.

Under ``torchrun`` (NCCL on GPUs, gloo on CPU) each rank builds its :class:`~geomprobe.Landscape` on its own
shard of the probe data; nothing is gathered on one device. With ``n_r`` samples on rank ``r`` and
``n = sum_r n_r`` (one all-reduce of an integer), every batch ``b`` is weighted ``n_b / n``, so

    L = sum_r sum_{b in r} (n_b / n) L_b,      H v = sum_r sum_{b in r} (n_b / n) H_b v,

which is exactly the loss and Hessian of the union of all shards. A :class:`Reducer` supplies the sums: one
all-reduce for the loss and the gradient when the Landscape is built, and one per block of HVP vectors (the
``(k, d)`` output block, not ``k`` separate calls). The identity :class:`Reducer` keeps the single-process path
unchanged.

Every rank gets the same answer. The Krylov kernels draw their random vectors from explicit CPU generators
seeded identically on every rank, and an all-reduce leaves the same reduced bits on every rank (gloo and
NCCL both all-gather one reduced copy), so Lanczos takes the same steps and stops at the same iteration on
every rank; the tests check the results are bitwise equal across ranks. Only rank 0 of the group writes the
run log (see :class:`~geomprobe.GeometryProbe`); the other ranks keep their records in memory.

The gradient-noise metrics (``noise``, ``isotropy``) stream the union of every rank's gradient samples to
every rank in rank order (:meth:`Reducer.broadcast_rows`, one block at a time), so they too equal one
process on the union.

A failure while building the Landscape on one rank (a non-finite loss on its shard) is agreed on by every
rank, so all of them raise rather than leave the others waiting in an all-reduce. A failure in the middle
of an HVP on one rank only (out of memory) is not yet agreed on and leaves the other ranks waiting.

Model-sharded training (FSDP)
-----------------------------
A model sharded with FSDP2 (``fully_shard``) is measured by
:class:`~geomprobe.engine.sharded_landscape.ShardedLandscape` (``Landscape(model, ...)`` returns one), with
vectors sharded like the parameters and their inner products all-reduced (docs/distributed.md). What is
still refused here, with a :class:`~geomprobe.ConfigurationError` naming the first sharded parameter or
module: FSDP1 (``FullyShardedDataParallel``) and ``DTensor`` parameters outside ``fully_shard`` (tensor
parallelism), whose HVPs would otherwise silently be taken against each rank's local shard.

>>> reducer = make_reducer()          # not initialized here: the identity
>>> reducer.world_size, reducer.rank, reducer.active
(1, 0, False)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import ConfigurationError, GeomprobeError

__all__ = ["Reducer", "ProcessGroupReducer", "make_reducer", "rank", "world_size", "refuse_sharded"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Reducer:
    """The single-process reducer: every sum over ranks is the local value itself."""

    active = False
    rank = 0
    world_size = 1

    def sum_int(self, n: int) -> int:
        """``sum_r n_r`` over ranks of an integer (a sample count)."""
        return int(n)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place and return it."""
        return t

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a collective decision such as "probe at this step")."""
        return bool(flag)

    def gather_ints(self, n: int) -> list[int]:
        """Every rank's integer ``n`` (a per-rank sample count), in rank order, on every rank."""
        return [int(n)]

    def broadcast_rows(self, rows: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``(c, ...)`` block of rows on every rank.

        On ``src`` pass the rows; elsewhere an empty ``(0, ...)`` tensor of the same trailing shape, dtype and
        device, which says what to receive (the number of rows comes from ``src``).
        """
        return rows

    def report_failure(self) -> None:
        """Tell the other ranks this one failed (it raises its own error next); pairs with :meth:`check_others`."""

    def check_others(self) -> None:
        """Raise if another rank reported a failure, so that no rank waits on a collective a dead one skips."""


class ProcessGroupReducer(Reducer):
    """Sums over the ranks of a torch.distributed process group (``None``: the default group)."""

    active = True

    def __init__(self, group: Any = None):
        if not _initialized():
            raise ConfigurationError(
                "a process group was passed but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group (torchrun sets the environment) before probing"
            )
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.world_size = torch.distributed.get_world_size(group)

    def sum_int(self, n: int) -> int:
        # int64 on the reduction device: NCCL cannot reduce CPU tensors, gloo can reduce either
        t = torch.tensor([int(n)], dtype=torch.int64, device=self._device())
        torch.distributed.all_reduce(t, group=self.group)
        return int(t.item())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dev = self._device()
        if dev.type != "cpu" and t.device != dev:
            # NCCL reduces device tensors only: partial sums of vectors kept in host memory (a sharded
            # Landscape's vector_device="cpu") travel to the device and back, a few scalars each way
            moved = t.to(dev)
            torch.distributed.all_reduce(moved, group=self.group)
            return t.copy_(moved)
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def agree(self, flag: bool) -> bool:
        return self.sum_int(int(bool(flag)) if self.rank == 0 else 0) > 0

    def gather_ints(self, n: int) -> list[int]:
        t = torch.tensor([int(n)], dtype=torch.int64, device=self._device())
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, t, group=self.group)
        return [int(x.item()) for x in out]

    def broadcast_rows(self, rows: torch.Tensor, src: int) -> torch.Tensor:
        # The receivers cannot know how many rows a block holds, so a one-integer header goes first.
        owner = src if self.group is None else torch.distributed.get_global_rank(self.group, src)
        header = torch.tensor([rows.shape[0] if self.rank == src else 0], dtype=torch.int64, device=self._device())
        torch.distributed.broadcast(header, src=owner, group=self.group)
        if self.rank == src:
            rows = rows.contiguous()
        else:
            rows = rows.new_empty((int(header.item()), *rows.shape[1:]))
        if rows.shape[0] > 0:
            torch.distributed.broadcast(rows, src=owner, group=self.group)
        return rows

    def report_failure(self) -> None:
        self.sum_int(1)

    def check_others(self) -> None:
        failed = self.sum_int(0)
        if failed:
            raise GeomprobeError(
                f"building the Landscape failed on {failed} other rank(s) of {self.world_size} (their errors "
                "are raised there); this rank stops too so that no rank waits on a collective"
            )

    def _device(self) -> torch.device:
        backend = torch.distributed.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def make_reducer(process_group: Any = None) -> Reducer:
    """The reducer for ``process_group``.

    ``None``: the default group when torch.distributed is initialized with more than one rank, else the
    identity. ``False``: the identity (each rank measures its own data alone). A group: that group.
    """
    if process_group is False:
        return Reducer()
    if process_group is None:
        if not _initialized() or torch.distributed.get_world_size() == 1:
            return Reducer()
        return ProcessGroupReducer(None)
    return ProcessGroupReducer(process_group)


def rank(process_group: Any = None) -> int:
    """This process's rank in ``process_group`` (0 when not distributed, or when ``process_group`` is False)."""
    return make_reducer(process_group).rank


def world_size(process_group: Any = None) -> int:
    """The number of ranks the probe data is spread over (1 when not distributed)."""
    return make_reducer(process_group).world_size


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without DTensor
        return False
    return isinstance(t, DTensor)


def _sharding_module(model: nn.Module) -> str | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch builds without FSDP
        return None
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            return f"{type(module).__name__} at {name or 'the root'}"
    return None


def refuse_sharded(model: nn.Module, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`ConfigurationError` if ``model`` shards its parameters in a way geomprobe cannot measure:
    FSDP1 (``FullyShardedDataParallel``, flat parameters) or DTensor parameters outside FSDP2. (FSDP2 models,
    ``fully_shard``, are measured by :class:`~geomprobe.engine.sharded_landscape.ShardedLandscape`.)

    HVPs against a rank-local shard would be wrong without any error, so this is checked before anything is
    measured. Sharding needs an initialized process group, so without one nothing is imported or checked.
    """
    if not _initialized():
        return
    where = _sharding_module(model)
    if where is None:
        where = next((f"DTensor parameter {n!r}" for n, p in named_params if _is_dtensor(p)), None)
    if where is not None:
        raise ConfigurationError(
            f"geomprobe cannot yet measure a model whose parameters are sharded across ranks this way (found "
            f"{where}); it measures FSDP2 models (torch.distributed.fsdp.fully_shard) and models whose ranks hold "
            "whole parameters (DDP, replicas). Shard with fully_shard, or probe an unsharded copy: load a full "
            "state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
            "StateDictOptions(full_state_dict=True)) into an unwrapped model, or save a checkpoint and run "
            "`geomprobe probe`; see docs/distributed.md"
        )
