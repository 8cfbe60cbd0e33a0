"""The finite-difference HVP of a one-process :class:`~geomprobe.Landscape` (``hvp_method="finite-difference"``,
and the check of a custom backward): ``H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps)``, two full gradients
over the probe batches with the parameters moved in place and put back exactly (their values and versions)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["fd_hvp", "fd_step", "full_grad"]


def full_grad(land: Any) -> torch.Tensor:
    """The flat gradient over every probe batch at the parameters' current values. Cost: one gradient per batch."""
    g = torch.zeros(land.dim, dtype=land.dtype, device=land.device)
    for b in range(len(land.batches)):
        grads = land._graph(b, False)[0]
        g += land.space.flatten([x.detach() if x is not None else None for x in grads])
    return g


def fd_step(land: Any, v: torch.Tensor) -> float:
    """The central difference's step (``land.fd_eps`` if set): balances truncation O(eps^2) against rounding
    O(u/eps) for the Landscape's dtype, relative to the parameters' norm and ``v``'s."""
    w = torch.cat([p.detach().reshape(-1) for p in land.params])
    return land.fd_eps or (torch.finfo(land.dtype).eps ** (1 / 3)) * (1.0 + float(w.norm())) / float(v.norm())


def fd_hvp(land: Any, v: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``H v`` by central differences of full gradients (step ``eps``, default :func:`fd_step`). Cost: two
    gradients per probe batch; error O(eps^2 ||d^3 L||) + O(u ||g|| / eps), estimated by the callers (Richardson,
    engine/doublecheck.py). The parameters are put back bit for bit, after a failure too."""
    if float(v.norm()) == 0.0:
        return torch.zeros_like(v)
    eps = eps or fd_step(land, v)
    saved = [p.detach().clone() for p in land.params]
    try:
        with torch.no_grad():
            for p, dv in zip(land.params, land.space.split(v)):
                p.add_(dv, alpha=eps)
        g_plus = full_grad(land)
        with torch.no_grad():
            for p, dv in zip(land.params, land.space.split(v)):
                p.add_(dv, alpha=-2 * eps)
        g_minus = full_grad(land)
    finally:
        with torch.no_grad():
            for p, s in zip(land.params, saved):
                p.copy_(s)
        land._versions = [p._version for p in land.params]
    return (g_plus - g_minus) / (2 * eps)
