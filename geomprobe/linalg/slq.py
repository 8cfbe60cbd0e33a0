"""Stochastic Lanczos quadrature (Ghorbani et al. 2019): Gauss nodes and weights from random starts, and the
smoothed spectral density on a grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigurationError
from .lanczos import lanczos
from .vectors import Matvec, check_dim, default_generator, rademacher

__all__ = ["SLQResult", "slq", "slq_density"]


# ---------------------------------------------------------------------------------------------- SLQ
@dataclass
class SLQResult:
    """Gauss quadrature nodes ``theta`` and weights ``tau = U_{1i}^2`` of ``n_v`` Lanczos runs."""

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    matvecs: int

    @property
    def lambda_max(self) -> float:
        return max(float(n.max()) for n in self.nodes)

    @property
    def lambda_min(self) -> float:
        return min(float(n.min()) for n in self.nodes)

    def moment(self, p: int) -> float:
        """Estimate of ``tr(H^p) / d``: exact in expectation for ``p <= 2m - 1``."""
        return sum(float((w * n**p).sum()) for n, w in zip(self.nodes, self.weights)) / len(self.nodes)


def slq(
    matvec: Matvec,
    dim: int,
    *,
    n_v: int = 10,
    m: int = 80,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> SLQResult:
    """Stochastic Lanczos quadrature: ``n_v`` runs of ``m`` Lanczos steps from Rademacher starts.

    The spectral measure ``(1/d) sum_i delta(t - lambda_i)`` is approximated by ``(1/n_v) sum_l sum_i
    tau_{l,i} delta(t - theta_{l,i})``; each m-step rule integrates polynomials up to degree ``2m - 1``
    exactly in expectation, with Monte Carlo error O(1/sqrt(n_v d)). Cost: ``n_v * min(m, dim)`` matvecs.
    """
    check_dim(dim)
    if n_v < 1 or m < 1:
        raise ConfigurationError(f"need n_v >= 1 and m >= 1, got n_v={n_v}, m={m}")
    generator = generator or default_generator()
    nodes, weights, matvecs = [], [], 0
    for _ in range(n_v):
        z = rademacher(dim, generator, dtype, device)
        r = lanczos(matvec, dim, tol=0.0, max_iter=m, v0=z, dtype=dtype, device=device)
        nodes.append(r.ritz_values)
        weights.append(r.U[0, :] ** 2)
        matvecs += r.matvecs
    return SLQResult(nodes, weights, matvecs)


def slq_density(
    result: SLQResult, *, grid_size: int = 10_000, sigma2: float | None = None, margin: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Smoothed density on a grid: ``phi(t) = (1/n_v) sum tau_i N(t; theta_i, s^2)``, renormalized.

    ``s^2 = 1e-5 max(1, lambda_max - lambda_min)`` by default; the grid spans
    ``[min theta - margin, max theta + margin]`` with ``grid_size`` points. Returns ``(grid, density, s^2)``,
    the density integrating to 1 over the grid (trapezoid rule).
    """
    lo, hi = result.lambda_min, result.lambda_max
    if sigma2 is None:
        sigma2 = 1e-5 * max(1.0, hi - lo)
    grid = torch.linspace(lo - margin, hi + margin, grid_size, dtype=torch.float64)
    nodes = torch.cat(result.nodes)
    w = torch.cat(result.weights) / len(result.nodes)
    dens = torch.zeros(grid_size, dtype=torch.float64)
    for s in range(0, len(nodes), 256):
        d = grid[:, None] - nodes[None, s : s + 256]
        dens += (torch.exp(-(d**2) / (2 * sigma2)) * w[None, s : s + 256]).sum(1)
    dens /= math.sqrt(2 * math.pi * sigma2)
    total = float(torch.trapezoid(dens, grid))
    if total > 0:
        dens /= total
    return grid, dens, sigma2
