"""Exact entries of a matvec's matrix: columns ``H e_j`` (one matvec each, batched), diagonal entries and, for
small dimensions, the dense matrix."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigurationError
from .vectors import Matvec, check_dim

__all__ = ["dense_matrix", "exact_diagonal", "hessian_columns"]


def hessian_columns(
    matvec: Matvec,
    dim: int,
    indices: Sequence[int] | torch.Tensor,
    *,
    batch: int = 16,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Exact columns ``H e_j`` for ``j`` in ``indices``, as rows of a ``(len(indices), d)`` tensor.

    Cost: one matvec per index. Exact up to rounding.
    """
    check_dim(dim)
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= dim):
        raise ConfigurationError(f"column indices must lie in [0, {dim}), got range [{int(idx.min())}, {int(idx.max())}]")
    out = []
    for s in range(0, idx.numel(), batch):
        part = idx[s : s + batch]
        E = torch.zeros(part.numel(), dim, dtype=dtype, device=device)
        E[torch.arange(part.numel()), part.to(E.device)] = 1
        out.append(matvec(E).reshape(part.numel(), dim))
    return torch.cat(out) if out else torch.zeros(0, dim, dtype=dtype, device=device)


def exact_diagonal(
    matvec: Matvec,
    dim: int,
    indices: Sequence[int] | torch.Tensor | None = None,
    *,
    batch: int = 16,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Exact diagonal entries ``H_jj = e_j^T H e_j`` for ``indices`` (default: all). Cost: one matvec each."""
    idx = torch.arange(dim) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    # one block of columns at a time: holding all of them would take len(indices) x d memory
    parts = []
    for s in range(0, idx.numel(), batch):
        part = idx[s : s + batch]
        cols = hessian_columns(matvec, dim, part, batch=batch, dtype=dtype, device=device)
        parts.append(cols[torch.arange(part.numel()), part.to(cols.device)])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


def dense_matrix(
    matvec: Matvec,
    dim: int,
    *,
    batch: int = 16,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The full ``d x d`` matrix, one matvec per column, symmetrized. For small models only (cost d matvecs)."""
    H = hessian_columns(matvec, dim, range(dim), batch=batch, dtype=dtype, device=device)
    return (H + H.T) / 2
