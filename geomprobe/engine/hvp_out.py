"""The buffer a caller gives an HVP to write into (``Landscape.hvp(v, out=...)``): what it must be.

A reused buffer spares the CPU a fresh mapping of every large product (glibc serves blocks above 32 MB by
mmap, so each fresh d-vector pays its page faults again); a wrong one must be refused before any work, with
one message that says what was wrong."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigurationError

__all__ = ["check_out"]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[first, last)`` that ``t``'s elements can reach in its storage."""
    if t.numel() == 0:
        return 0, 0
    reach = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + reach * t.element_size()


def check_out(out: Any, v: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse an ``out`` that an HVP of ``v`` cannot be written into: not a tensor, a shape other than ``v``'s,
    another dtype or device than the result's, not contiguous, requiring grad, or sharing memory with ``v``
    (which every probe batch's product reads again). One ConfigurationError naming what was wrong."""
    if not isinstance(out, torch.Tensor):
        raise ConfigurationError(f"hvp's out must be a tensor, got {type(out).__name__}")
    want = f"shape {tuple(v.shape)}, dtype {dtype}, on {device}"
    wrong = []
    if out.shape != v.shape:
        wrong.append(f"shape {tuple(out.shape)}")
    if out.dtype != dtype:
        wrong.append(f"dtype {out.dtype}")
    if out.device != torch.device(device):
        wrong.append(f"device {out.device}")
    if wrong:
        raise ConfigurationError(f"hvp's out has {', '.join(wrong)}; the result has {want}: pass a buffer like "
                                 "that, or no out")
    if not out.is_contiguous():
        raise ConfigurationError(f"hvp's out must be contiguous (strides {tuple(out.stride())} given); pass a "
                                 "contiguous buffer, e.g. a row of a basis, or no out")
    if out.requires_grad:
        raise ConfigurationError("hvp's out requires grad; products are written without autograd: pass a buffer "
                                 "with requires_grad=False")
    if out.device == v.device:
        (a0, a1), (b0, b1) = _span(out), _span(v)
        if a0 < b1 and b0 < a1:
            raise ConfigurationError("hvp's out shares memory with v, which every probe batch's product reads: "
                                     "pass a separate buffer")
