"""What every kernel shares: the matvec type, seeded random vectors (Rademacher, Gaussian) that never touch
the global RNG, and applying a matvec to the rows of a block.

A *matvec* maps a flat vector ``(d,)`` to ``H v`` and a block ``(k, d)`` to ``(H V^T)^T`` (row-wise
products). Randomness comes from an explicit ``torch.Generator`` on the CPU, so the same seed gives the same
vectors on every device and rank."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ConfigurationError

__all__ = ["Matvec", "apply_rows", "check_dim", "default_generator", "gaussian", "rademacher"]


Matvec = Callable[[torch.Tensor], torch.Tensor]


def default_generator(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator: randomness local to the call, never the global RNG."""
    return torch.Generator().manual_seed(seed)


def rademacher(shape: Sequence[int] | int, generator: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """Entries +-1 with equal probability, drawn on the CPU from ``generator`` then moved."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(dtype) * 2 - 1
    return z.to(device)


def gaussian(shape, generator, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ConfigurationError(f"dim must be a positive integer, got {dim!r}")


def apply_rows(matvec: Matvec, V: torch.Tensor, batch: int) -> torch.Tensor:
    """``matvec`` on the rows of ``V``, ``batch`` rows per call."""
    return torch.cat([matvec(V[s : s + batch]).reshape(-1, V.shape[1]) for s in range(0, V.shape[0], batch)])
