"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): where each rank's shard lies in the
global flat vector, and the collectives that move flat vectors between the sharded and the whole layout.

FSDP2 shards every parameter along its first dimension over a 1-D device mesh, as ``torch.chunk`` does: with
``n`` rows and world size ``W``, rank ``r`` holds rows ``[min(r c, n), min((r+1) c, n))`` for ``c = ceil(n/W)``.
Rows are contiguous in the row-major flat layout, so each rank's part of the global flat vector (the
concatenation of the whole parameters, as one process would lay it out) is one range per parameter. A
:class:`ShardLayout` holds those ranges; a rank's *local* flat vector is the concatenation of its shards in
parameter order, which is the restriction of the global vector to the ranges.

:func:`fsdp_hooks_off` runs the model with FSDP's forward hooks removed and the parameters replaced by given
whole tensors: the exact HVP route differentiates through those tensors twice, which FSDP's own hooks
(unshard before forward, reshard after, reduce-scatter after backward) would undo between the two passes.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError

__all__ = ["FSDPModule", "ShardLayout", "fsdp_hooks_off", "fully_sharded", "is_dtensor"]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch builds without FSDP2: no module is ever one
    class FSDPModule:  # type: ignore[no-redef]
        pass


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without DTensor
        return False
    return isinstance(t, DTensor)


def fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) is an FSDP2 module (``fully_shard`` was applied to it)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _rows(n: int, world: int, r: int) -> tuple[int, int]:
    c = math.ceil(n / world) if n else 0
    return min(r * c, n), min((r + 1) * c, n)


class ShardLayout:
    """The shards of named DTensor parameters (``Shard(0)`` on one 1-D mesh) in the global flat vector.

    ``ranges``: this rank's ``[start, stop)`` per parameter, ascending; ``lengths[r]``: the local flat length
    on rank ``r``; ``group``: the mesh's process group, over which the collectives below run.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor]):
        for n, p in zip(names, params):
            if not is_dtensor(p):
                raise ConfigurationError(
                    f"parameter {n!r} is not sharded while others are; geomprobe measures a model whose selected "
                    "parameters are all FSDP2 shards (fully_shard the whole model, or select with params=)")
            from torch.distributed.tensor import Shard

            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
                raise ConfigurationError(
                    f"parameter {n!r} is sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                    "geomprobe measures FSDP2 shards along the first dimension on a 1-D mesh (fully_shard's "
                    "default). Hybrid (2-D) meshes, tensor parallelism and custom shard placements are not "
                    "supported yet; see docs/distributed.md")
        if any(p.device_mesh != params[0].device_mesh for p in params):
            raise ConfigurationError("the sharded parameters live on several device meshes; geomprobe needs one")
        mesh = params[0].device_mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self.local_shapes = [tuple(p.to_local().shape) for p in params]
        self.sizes = [math.prod(s) for s in self.shapes]
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        self.dim = offsets[-1]
        # per rank, per parameter: (global start, global stop, local start)
        self.pieces: list[list[tuple[int, int, int]]] = []
        for r in range(self.world):
            pos, row_pieces = 0, []
            for off, shape, size in zip(offsets, self.shapes, self.sizes):
                a, b = _rows(shape[0], self.world, r)
                row = size // shape[0] if shape[0] else 0
                row_pieces.append((off + a * row, off + b * row, pos))
                pos += (b - a) * row
            self.pieces.append(row_pieces)
        self.lengths = [sum(b - a for a, b, _ in rp) for rp in self.pieces]
        for n, (a, b, _), shape, local in zip(self.names, self.pieces[self.rank], self.shapes, self.local_shapes):
            if b - a != math.prod(local):
                raise ConfigurationError(
                    f"the shard of {n!r} on rank {self.rank} has shape {local}, not the torch.chunk rows FSDP2 "
                    f"uses for {shape} over {self.world} ranks; this sharding is not supported")
        self.ranges = [(a, b) for a, b, _ in self.pieces[self.rank]]
        self.local_dim = self.lengths[self.rank]

    def local_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of whole flat vectors ``(..., d)`` (a copy, ``(..., d_local)``)."""
        return torch.cat([full[..., a:b] for a, b in self.ranges], dim=-1)

    def split_local(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Views of a local flat vector ``(d_local,)`` shaped like each local shard."""
        return [v[lo : lo + b - a].view(shape) for (a, b, lo), shape in zip(self.pieces[self.rank], self.local_shapes)]

    def flatten_local(self, tensors: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """Local shards (``None``: zeros) as one local flat vector."""
        return torch.cat([t.reshape(-1) if t is not None else like.new_zeros(b - a)
                          for t, (a, b, _) in zip(tensors, self.pieces[self.rank])])

    def _padded(self, k: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(self.world, k, max(self.lengths))

    def all_gather(self, V: torch.Tensor) -> torch.Tensor:
        """Whole vectors ``(k, d)`` from every rank's slices ``(k, d_local)``: one all-gather (padded to the
        longest slice). Memory: ``k d`` plus the padded buffer."""
        k = V.shape[0]
        mine = V.new_zeros(k, max(self.lengths))
        mine[:, : V.shape[1]] = V
        out = self._padded(k, V)
        # gloo checks the output as world pieces of the input's shape: pass it flat along the first dimension
        torch.distributed.all_gather_into_tensor(out.view(-1, out.shape[2]), mine, group=self.group)
        full = V.new_empty(k, self.dim)
        for r, rp in enumerate(self.pieces):
            for a, b, lo in rp:
                full[:, a:b] = out[r, :, lo : lo + b - a]
        return full

    def reduce_scatter(self, full: torch.Tensor) -> torch.Tensor:
        """``sum over ranks`` of whole vectors ``(k, d)``, each rank receiving its slice ``(k, d_local)``: one
        reduce-scatter, the collective FSDP uses for gradients."""
        k = full.shape[0]
        buf = self._padded(k, full)
        for r, rp in enumerate(self.pieces):
            for a, b, lo in rp:
                buf[r, :, lo : lo + b - a] = full[:, a:b]
        out = full.new_empty(k, buf.shape[2])
        torch.distributed.reduce_scatter_tensor(out, buf.view(-1, buf.shape[2]), group=self.group)
        return out[:, : self.local_dim].contiguous()


    # ---- one parameter at a time: what the streamed exact HVP moves (engine/sharded_stream.py)
    def _param_rows(self, i: int) -> tuple[int, int, int]:
        """(rows per rank's padded piece ``c``, elements per row, this rank's rows) of parameter ``i``."""
        n = self.shapes[i][0]
        row = self.sizes[i] // n if n else 0
        a, b = _rows(n, self.world, self.rank)
        return (math.ceil(n / self.world) if n else 0), row, b - a

    def gather_param(self, i: int, local: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Parameter ``i`` whole (its shape) from every rank's piece of it (``local``, this rank's shard shape):
        one all-gather of ``ceil(n / world)`` rows per rank, on ``device`` (default ``local``'s: a piece held
        in host memory is copied there first, the only copy of it on the device). Memory: the whole parameter
        plus at most ``world - 1`` padding rows (the result is a view of that buffer)."""
        if device is not None and local.device != torch.device(device):
            local = local.to(device, non_blocking=local.is_pinned())  # a page-locked piece: no wait
        c, row, mine = self._param_rows(i)
        if c == 0 or row == 0:
            return local.new_zeros(self.shapes[i])
        send = local.reshape(-1)
        if mine != c:
            send = local.new_zeros(c * row)
            send[: mine * row] = local.reshape(-1)
        buf = local.new_empty(self.world * c * row)
        torch.distributed.all_gather_into_tensor(buf, send.contiguous(), group=self.group)
        return buf[: self.sizes[i]].view(self.shapes[i])

    def scatter_param_add(self, i: int, whole: torch.Tensor | None, out: torch.Tensor,
                          device: torch.device | None = None, io: Any = None) -> None:
        """Add the sum over ranks of parameter-shaped ``whole`` (``None``: zeros, for a rank where the
        parameter got no gradient, so that the collective still happens) to this rank's shard ``out`` (a view
        in the local flat vector): one reduce-scatter on ``device`` (default ``whole``'s, else ``out``'s), whose
        received rows are added to ``out`` wherever it lives (host memory: one copy of this rank's rows).
        Memory: the padded send buffer (the parameter's size; none when its rows divide evenly) and this
        rank's rows. ``io``: a :class:`~geomprobe.engine.partial_sums.HostIO` whose reused buffer takes the rows
        on their way to host memory."""
        c, row, mine = self._param_rows(i)
        if c == 0 or row == 0:
            return
        dev = torch.device(device) if device is not None else (whole.device if whole is not None else out.device)
        if whole is not None and c * self.world == self.shapes[i][0]:
            send = whole.reshape(-1).to(device=dev, dtype=out.dtype).contiguous()
        else:
            send = torch.zeros(self.world * c * row, dtype=out.dtype, device=dev)
            if whole is not None:
                send[: self.sizes[i]] = whole.reshape(-1)
        recv = torch.empty(c * row, dtype=out.dtype, device=dev)
        torch.distributed.reduce_scatter_tensor(recv, send, group=self.group)
        del send
        rows = recv[: mine * row].view(out.shape)
        if io is not None:
            io.add_to_host(out, rows)
        else:
            out.add_(rows.to(out.device))


def _is_fsdp_hook(hook) -> bool:
    return type(getattr(hook, "__self__", None)).__name__ == "FSDPState"


@contextlib.contextmanager
def fsdp_hooks_off(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: ``model``'s FSDP forward hooks are removed and its parameters ``tensors`` (name -> whole tensor)
    stand in for the shards, so a forward computes with plain tensors and no collective. Restored on exit
    (the same hook dictionaries and the same parameter objects)."""
    from torch.nn.utils.stateless import _reparametrize_module

    saved = []
    for m in model.modules():
        pre, post = m._forward_pre_hooks, m._forward_hooks
        if any(_is_fsdp_hook(h) for h in pre.values()) or any(_is_fsdp_hook(h) for h in post.values()):
            saved.append((m, pre, post))
            m._forward_pre_hooks = OrderedDict((k, h) for k, h in pre.items() if not _is_fsdp_hook(h))
            m._forward_hooks = OrderedDict((k, h) for k, h in post.items() if not _is_fsdp_hook(h))
    try:
        with _reparametrize_module(model, tensors, tie_weights=True):
            yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post
