"""Ritz values and their bounds: the result of a Lanczos run, the residual and gap bounds, the stopping rule
and the checks of the options every Lanczos variant shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigurationError
from .vectors import check_dim

__all__ = ["LanczosResult", "check_lanczos_args", "extremes_converged", "gap_bounds", "ritz_pairs", "tridiagonal"]


@dataclass
class LanczosResult:
    """Ritz values of ``T_m`` (ascending, float64) with residual bounds ``|lambda - theta_i| <= bounds[i]``.

    ``restarts``: thick restarts of a bounded-memory run (0 for the plain run); ``basis_peak``: the most
    d-vectors the basis held at once. After a restart ``alpha`` is the diagonal of the final projected matrix
    and ``beta`` is empty (it is no longer tridiagonal), ``U`` its eigenvectors.
    """

    ritz_values: torch.Tensor
    bounds: torch.Tensor
    steps: int
    converged: bool
    matvecs: int
    alpha: torch.Tensor
    beta: torch.Tensor
    U: torch.Tensor
    basis: torch.Tensor | None = field(default=None, repr=False)
    asymmetry: float = 0.0
    restarts: int = 0
    basis_peak: int = 0
    matvec_error: float | None = None  # added to the bounds when the matvec is approximate (see metrics.spectrum)

    def top(self, k: int = 1) -> tuple[list[float], list[float]]:
        """The ``k`` largest Ritz values (descending) and their bounds."""
        idx = list(range(len(self.ritz_values) - 1, max(len(self.ritz_values) - k, 0) - 1, -1))
        return [float(self.ritz_values[i]) for i in idx], [float(self.bounds[i]) for i in idx]

    def bottom(self, k: int = 1) -> tuple[list[float], list[float]]:
        """The ``k`` smallest Ritz values (ascending) and their bounds."""
        idx = list(range(min(k, len(self.ritz_values))))
        return [float(self.ritz_values[i]) for i in idx], [float(self.bounds[i]) for i in idx]

    def ritz_vector(self, i: int) -> torch.Tensor:
        """The unit Ritz vector ``V_m u_i`` of Ritz value ``i`` (negative ``i`` counts from the top).

        Needs ``keep_basis=True``.
        """
        if self.basis is None:
            raise ConfigurationError("Ritz vectors need lanczos(..., keep_basis=True)")
        u = self.U[:, i].to(device=self.basis.device, dtype=self.basis.dtype)  # U lives on the host
        x = u @ self.basis
        return x / x.norm()


def check_lanczos_args(dim: int, k: int, tol: float, which: str, bound: str, max_iter: int | None) -> int:
    """Validate the options shared by the plain and the restarted run; return the step budget ``m_max``."""
    check_dim(dim)
    if which not in ("both", "largest", "smallest"):
        raise ConfigurationError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    if k < 1 or not (math.isfinite(tol) and tol >= 0):
        # a NaN tol compares false everywhere and an infinite one accepts any bound: both would "converge"
        raise ConfigurationError(f"need k >= 1 and a finite tol >= 0, got k={k}, tol={tol}")
    if bound not in ("residual", "gap"):
        raise ConfigurationError(f"bound must be 'residual' or 'gap', got {bound!r}")
    m_max = min(dim, max_iter if max_iter is not None else 300)
    if m_max < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}")
    return m_max


def tridiagonal(alphas: list[float], off: list[float]) -> torch.Tensor:
    """The float64 tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``off``."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if off:
        o = torch.tensor(off, dtype=torch.float64)
        T += torch.diag(o, 1) + torch.diag(o, -1)
    return T


def gap_bounds(theta: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Quadratic error bounds ``min(r_i, r_i^2 / g_i)`` of Ritz values ``theta`` (ascending) with residual
    bounds ``r_i``, where ``g_i`` is the gap to the nearest other Ritz value less that value's own bound
    (the residual bound where that gap does not exceed ``r_i``).

    >>> gap_bounds(torch.tensor([1.0, 5.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64))
    tensor([0.0641, 0.0029], dtype=torch.float64)
    """
    n = len(theta)
    if n < 2:
        return bounds
    dist = (theta[:, None] - theta[None, :]).abs() - bounds[None, :]
    dist.fill_diagonal_(float("inf"))
    gap = dist.min(1).values
    refined = torch.where(gap > bounds, bounds**2 / gap.clamp_min(1e-300), bounds)
    return torch.minimum(bounds, refined)


def extremes_converged(theta: torch.Tensor, bounds: torch.Tensor, k: int, tol: float, which: str) -> bool:
    n = len(theta)
    need = 2 * k if which == "both" else k
    if n < need or n < 2:
        return False
    spread = float(theta[-1] - theta[0])
    idx: list[int] = []
    if which in ("both", "smallest"):
        idx += list(range(k))
    if which in ("both", "largest"):
        idx += list(range(n - k, n))
    return all(float(bounds[i]) <= tol * max(abs(float(theta[i])), spread) for i in idx)


def ritz_pairs(S: torch.Tensor, beta: float, bound: str, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Ritz values (ascending) and vectors of the projected matrix ``S`` with their bounds, and whether the
    Krylov space is exhausted (``beta`` at rounding level against ``max |theta|``: the bounds are then 0).

    The bound of ``theta_i`` is ``beta |u_{m,i}|`` (the residual ``||H y_i - theta_i y_i||``), or with
    ``bound="gap"`` the quadratic :func:`gap_bounds`.
    """
    theta, U = torch.linalg.eigh(S)
    bounds = beta * U[-1, :].abs()
    if bound == "gap":
        bounds = gap_bounds(theta, bounds)
    scale = max(float(theta.abs().max()), 1e-300)
    exhausted = beta <= 1e-12 * scale * math.sqrt(dim)
    if exhausted:
        bounds = torch.zeros_like(bounds)
    return theta, U, bounds, exhausted
