"""ParamSpace: flat vectors of a parameter selection <-> per-tensor views and named blocks.

Every metric works on flat vectors of length ``d`` (the Krylov kernels know nothing else); reports speak
of named blocks (one per parameter tensor, or one per module). ParamSpace is the map between the two.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigurationError

__all__ = ["Block", "ParamSpace", "select_parameters", "unwrap_model"]


@dataclass(frozen=True)
class Block:
    """A named slice ``[start, stop)`` of the flat parameter vector and the tensors it covers."""

    name: str
    start: int
    stop: int
    params: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


class ParamSpace:
    """Layout of a list of named parameter tensors as one flat vector.

    ``group_by="parameter"`` makes one block per tensor (``"fc1.weight"``); ``"module"`` groups the tensors of
    each owning module (``"fc1"``), which keeps a layer's weight and bias together.

    >>> import torch
    >>> space = ParamSpace(["a.weight", "a.bias"], [torch.Size([2, 3]), torch.Size([2])], group_by="module")
    >>> space.dim, [b.name for b in space.blocks]
    (8, ['a'])
    >>> [t.shape for t in space.split(torch.arange(8.0))]
    [torch.Size([2, 3]), torch.Size([2])]
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], *, group_by: str = "parameter"):
        if group_by not in ("parameter", "module"):
            raise ConfigurationError(f"group_by must be 'parameter' or 'module', got {group_by!r}")
        if not names:
            raise ConfigurationError("a ParamSpace needs at least one parameter tensor")
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [int(s.numel()) for s in self.shapes]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.dim = self.offsets[-1]
        self.group_by = group_by
        self.blocks = self._make_blocks()

    def _make_blocks(self) -> list[Block]:
        if self.group_by == "parameter":
            return [Block(n, self.offsets[i], self.offsets[i + 1], (n,)) for i, n in enumerate(self.names)]
        blocks: list[Block] = []
        for i, n in enumerate(self.names):
            owner = n.rsplit(".", 1)[0] if "." in n else n
            if blocks and blocks[-1].name == owner and blocks[-1].stop == self.offsets[i]:
                last = blocks.pop()
                blocks.append(Block(owner, last.start, self.offsets[i + 1], last.params + (n,)))
            else:
                blocks.append(Block(owner, self.offsets[i], self.offsets[i + 1], (n,)))
        return blocks

    def block(self, name: str) -> Block:
        """The block called ``name``; a clear error listing the known blocks otherwise."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise ConfigurationError(f"no block named {name!r}; blocks: {', '.join(b.name for b in self.blocks)}")

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``v`` (shape ``(..., d)``) shaped like each parameter (``(..., *shape)``)."""
        if v.shape[-1] != self.dim:
            raise ConfigurationError(f"vector has last dimension {v.shape[-1]}, expected d = {self.dim}")
        lead = v.shape[:-1]
        return [v[..., a:b].reshape(*lead, *s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def flatten(self, tensors: Iterable[torch.Tensor | None], *, batch_dims: int = 0,
                out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        """Concatenate per-parameter tensors (``None`` = zeros) into flat vectors of shape ``(..., d)``.

        With ``out`` (shape ``(..., d)``, the leading ``batch_dims`` dimensions of the tensors) the result is
        written into ``out`` and ``out`` is returned: one ``torch.cat(..., out=out)`` when ``out`` is contiguous,
        else one copy per parameter into its slice; no d-sized tensor is allocated. With ``accumulate`` the
        tensors are added into ``out`` instead, parameter by parameter (``None`` adds nothing): the same values
        as adding a fresh flattening, elementwise, without making it. Cost: one pass over ``d`` elements.
        """
        tensors = list(tensors)
        if len(tensors) != len(self.names):
            raise ConfigurationError(f"got {len(tensors)} tensors for {len(self.names)} parameters")
        if accumulate and out is None:
            raise ConfigurationError("flatten(accumulate=True) adds into a given out; pass out")
        ref = next((t for t in tensors if t is not None), None)
        if ref is None and out is None:
            raise ConfigurationError("flatten needs at least one tensor that is not None")
        lead = ref.shape[:batch_dims] if ref is not None else out.shape[:-1]
        if out is not None:
            return self._flatten_into(tensors, lead, out, accumulate)
        parts = [
            (t.reshape(*lead, -1) if t is not None else ref.new_zeros(*lead, n))
            for t, n in zip(tensors, self.sizes)
        ]
        return torch.cat(parts, dim=-1)

    def _flatten_into(self, tensors: list[torch.Tensor | None], lead: torch.Size, out: torch.Tensor,
                      accumulate: bool) -> torch.Tensor:
        if tuple(out.shape) != (*lead, self.dim):
            raise ConfigurationError(
                f"flatten's out has shape {tuple(out.shape)}, expected {(*lead, self.dim)} (the tensors' leading "
                "dimensions and d)")
        if accumulate or not out.is_contiguous() or any(t is None for t in tensors):
            for t, a, b in zip(tensors, self.offsets, self.offsets[1:]):
                piece = out[..., a:b]
                if t is None:
                    if not accumulate:
                        piece.zero_()
                elif accumulate:
                    piece.add_(t.reshape(*lead, -1))
                else:
                    piece.copy_(t.reshape(*lead, -1))
            return out
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1, out=out)


def select_parameters(
    model: nn.Module, params: str | Sequence[str] | None = None
) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Trainable parameters of ``model`` whose names match one of the glob patterns in ``params``.

    ``None`` selects every parameter with ``requires_grad``. Raises a ConfigurationError naming the
    available parameters when nothing matches.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            shown = ", ".join(n for n, _ in named[:12]) + (" ..." if len(named) > 12 else "")
            raise ConfigurationError(
                f"no trainable parameter matches params={patterns!r}; available: {shown or '(none)'}"
            )
    if not chosen:
        raise ConfigurationError(
            f"{type(model).__name__} has no parameter with requires_grad=True; nothing to measure"
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: strips DistributedDataParallel/DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, whose own forward has no double backward or adds hooks."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
