"""Probe batches: resolving what the user passed (a tensor pair, a list, a DataLoader) into a list of
batches, their sizes, moving and slicing nested batches, splitting them into micro-batches, and calling a
model on a batch's inputs."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigurationError
from .loss import dict_call_form

__all__ = ["batch_size", "call_model", "first_tensor", "is_pair", "map_tensors", "resolve_batches", "slice_batch", "split_batches", "to_device"]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor nested in lists, tuples (named ones too) and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        moved = [map_tensors(o, fn) for o in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor."""
    t = first_tensor(batch)
    if t is None:
        raise ConfigurationError(f"cannot find a tensor in the probe batch (got {type(batch).__name__})")
    return int(t.shape[0]) if t.dim() > 0 else 1


def resolve_batches(batches: Any, max_batches: int | None = None) -> list[Any]:
    """Normalize probe data to a list of batches.

    Accepts one ``(inputs, targets)`` pair, a dict (one batch for a ``loss_fn(model, batch)``), a list of
    batches, or any iterable of batches such as a DataLoader (read once, up to ``max_batches``).
    """
    if isinstance(batches, torch.Tensor):
        raise ConfigurationError(
            "probe data is a single tensor; pass an (inputs, targets) pair, a list of pairs or a DataLoader"
        )
    if isinstance(batches, dict):
        out = [batches]
    elif isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], (dict, tuple, list)) \
            and isinstance(batches[1], torch.Tensor):
        out = [batches]  # one (inputs, targets) pair whose inputs are a dict or a tuple, not two batches
    elif isinstance(batches, (tuple, list)) and batches and all(
        isinstance(b, torch.Tensor) or not isinstance(b, (tuple, list, dict)) for b in batches
    ):
        out = [tuple(batches)]
    elif isinstance(batches, (tuple, list)):
        out = list(batches)
    else:
        try:
            it = iter(batches)
        except TypeError:
            raise ConfigurationError(
                f"probe data of type {type(batches).__name__} is not a batch, a list of batches or an iterable"
            ) from None
        out = []
        for b in it:
            if max_batches is not None and len(out) >= max_batches:
                break
            out.append(b)
    if max_batches is not None:
        if max_batches < 1:
            raise ConfigurationError(f"max_batches must be >= 1, got {max_batches}")
        out = out[:max_batches]
    if not out:
        raise ConfigurationError("probe data is empty: give at least one batch")
    return out


def slice_batch(obj: Any, n: int, a: int, b: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[a:b] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        parts = [slice_batch(o, n, a, b) for o in obj]
        return type(obj)(*parts) if hasattr(obj, "_fields") else type(obj)(parts)
    if isinstance(obj, dict):
        return type(obj)((k, slice_batch(v, n, a, b)) for k, v in obj.items())
    return obj


def split_batches(batches: list[Any], size: int, model: nn.Module, mode: str) -> list[Any]:
    """Every batch cut into pieces of at most ``size`` samples (tensors sliced along their first dimension)."""
    if size < 1:
        raise ConfigurationError(f"micro_batch_size must be >= 1, got {size}")
    if mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigurationError(
            "micro_batch_size would change BatchNorm's batch statistics in train mode (a different Hessian); "
            "use mode='eval' or pass smaller probe batches yourself"
        )
    out = []
    for batch in batches:
        n = batch_size(batch)
        out.extend(slice_batch(batch, n, a, min(a + size, n)) for a in range(0, n, size))
    return out


def is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple/list, ``model(inputs)`` for a tensor; a dict as
    :func:`~geomprobe.engine.loss.dict_call_form` reads ``forward``'s signature: ``model(**inputs)`` when its
    parameters take the keys, ``model(inputs)`` when it takes one argument (the dict whole)."""
    if isinstance(inputs, dict):
        if dict_call_form(model, inputs) == "whole":
            return model(inputs)
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
