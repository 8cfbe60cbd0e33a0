"""Lanczos with full reorthogonalization: extreme eigenvalues of a symmetric matvec with residual bounds
``|lambda - theta_i| <= beta_m |u_{m,i}|`` (and the sharper gap bounds), a converged flag, and the basis in
fixed blocks that may live off the compute device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigurationError
from .vectors import Matvec, check_dim, default_generator, gaussian

__all__ = ["LanczosBasis", "LanczosResult", "extremes_converged", "gap_bounds", "lanczos"]


# ---------------------------------------------------------------------------------------------- Lanczos
@dataclass
class LanczosResult:
    """Ritz values of ``T_m`` (ascending, float64) with residual bounds ``|lambda - theta_i| <= bounds[i]``."""

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
        u = self.U[:, i].to(self.basis.dtype)
        x = u @ self.basis
        return x / x.norm()


def lanczos(
    matvec: Matvec,
    dim: int,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "both",
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    keep_basis: bool = False,
    bound: str = "residual",
    basis_device: torch.device | str | None = None,
) -> LanczosResult:
    """Lanczos with full reorthogonalization (twice) for the extreme eigenvalues of a symmetric matvec.

    Runs ``v_{j+1} beta_j = H v_j - alpha_j v_j - beta_{j-1} v_{j-1}`` and reorthogonalizes against every
    earlier vector; the tridiagonal ``T_m`` is diagonalized in float64. Each Ritz value ``theta_i`` carries
    the residual bound ``beta_m |u_{m,i}|``: some eigenvalue of H lies within it. Iteration stops once the
    ``k`` Ritz values at the requested end(s) (``which`` = ``"both"``, ``"largest"``, ``"smallest"``) have
    bounds below ``tol * max(|theta_i|, theta_max - theta_min)``, on an exact invariant subspace
    (``beta_m ~ 0``), or after ``max_iter`` steps (default ``min(dim, 300)``) with ``converged=False``.

    ``bound="gap"`` replaces each bound ``r_i`` by the quadratic (Kato-Temple) bound ``min(r_i, r_i^2 / g_i)``
    with ``g_i = min_{j != i} (|theta_i - theta_j| - r_j)``, the gap to the other Ritz values less their own
    bounds. A Ritz value's error falls as the square of its residual, so at the same true accuracy the
    iteration stops several steps earlier; the price is an assumption the residual bound does not make, that
    no eigenvalue lies unseen between ``theta_i`` and its neighbours (a Ritz value may still be missing, as
    for any Krylov method). That assumption fails in practice when the top eigenvalues cluster: on a
    6-layer transformer it stopped at a true error of 2.5e-3 for ``tol=1e-3`` (benchmarks/RESULTS.md §2).
    The default ``"residual"`` is SPEC §1's and makes no such assumption.

    ``asymmetry``: ``max_j |(H v_j)^T v_{j-1} - beta_{j-1}|`` relative to a bound on ``||T||``, free evidence
    of the matvec's own error, which the residual bounds do not include: eigenvalues are not known to better
    than about ``asymmetry * ||H||`` however small the bounds. It sees only the asymmetric part of that
    error (float64: ~1e-16; fp32 HVPs on an H100: ~3e-8), not the symmetric part from a forward pass
    rounded to fp32, which is the exact Hessian of a slightly different function.

    Cost: one matvec per step (5-9 steps for an outlying top eigenvalue to 1e-3, 100+ for a bulk edge), plus
    O(m d) for reorthogonalization; memory ``m d`` in ``dtype``. ``tol=0`` runs exactly ``max_iter`` steps.
    ``basis_device="cpu"`` keeps the ``m`` basis vectors in (pinned) host memory, so the accelerator holds
    only a few vectors of length ``d``; each step then streams the basis through once (block by block,
    reorthogonalizing twice per block), which costs about ``m d`` bytes of transfer per step.

    >>> H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = lanczos(lambda v: v @ H, 100, tol=1e-8)
    >>> round(r.top(1)[0][0], 6), round(r.bottom(1)[0][0], 6), r.converged
    (100.0, 1.0, True)
    """
    check_dim(dim)
    if which not in ("both", "largest", "smallest"):
        raise ConfigurationError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    if k < 1 or tol < 0:
        raise ConfigurationError(f"need k >= 1 and tol >= 0, got k={k}, tol={tol}")
    if bound not in ("residual", "gap"):
        raise ConfigurationError(f"bound must be 'residual' or 'gap', got {bound!r}")
    m_max = min(dim, max_iter if max_iter is not None else 300)
    if m_max < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}")
    generator = generator or default_generator()
    if v0 is None:
        q = gaussian(dim, generator, dtype, device)
    else:
        if v0.shape != (dim,):
            raise ConfigurationError(f"v0 must have shape ({dim},), got {tuple(v0.shape)}")
        q = v0.to(dtype=dtype, device=device if device is not None else v0.device).clone()
    qn = q.norm()
    if not torch.isfinite(qn) or qn == 0:
        raise ConfigurationError("the Lanczos start vector is zero or not finite")
    basis = LanczosBasis(dim, dtype, q.device if basis_device is None else torch.device(basis_device), q.device)
    cur = q / qn  # the newest basis vector, on the compute device even when the basis is offloaded
    basis.append(cur)
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    matvecs = 0
    theta = U = bounds = None
    prev = None
    asym = 0.0
    for j in range(m_max):
        vj = cur
        w = matvec(vj).reshape(dim).to(dtype)
        matvecs += 1
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {j + 1}")
        if prev is not None:
            # (H v_j)^T v_{j-1} must equal v_j^T H v_{j-1} = beta_{j-1}: the difference is free evidence of
            # the matvec's rounding error (an fp32 HVP through cuDNN can be off by 1e-4 relative)
            asym = max(asym, abs(float(w.double() @ prev.double()) - betas[-1]))
            w = w - betas[-1] * prev
        alpha = float(w.double() @ vj.double())
        w = w - alpha * vj
        w = basis.reorthogonalize(w)
        beta = float(w.double().norm())
        alphas.append(alpha)
        betas.append(beta)
        last = j + 1 == m_max or j + 1 == dim
        # Gershgorin bound on ||T||: lets a fixed-length run (tol=0, as in SLQ) skip the per-step
        # eigendecomposition and still detect an exhausted Krylov space.
        gersh = max(abs(a) for a in alphas) + 2 * max(betas)
        if tol == 0 and not last and beta > 1e-12 * gersh * math.sqrt(dim):
            prev = vj
            cur = w / beta
            basis.append(cur)
            continue
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas[:-1], dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, U = torch.linalg.eigh(T)
        bounds = beta * U[-1, :].abs()
        if bound == "gap":
            bounds = gap_bounds(theta, bounds)
        scale = max(float(theta.abs().max()), 1e-300)
        exhausted = beta <= 1e-12 * scale * math.sqrt(dim)
        if exhausted or j + 1 == dim:
            converged = True
            if exhausted:
                bounds = torch.zeros_like(bounds)
            break
        if tol > 0 and extremes_converged(theta, bounds, k, tol, which):
            converged = True
            break
        if j + 1 < m_max:
            prev = vj
            cur = w / beta
            basis.append(cur)
    steps = len(alphas)
    return LanczosResult(
        ritz_values=theta,
        bounds=bounds,
        steps=steps,
        converged=converged,
        matvecs=matvecs,
        alpha=torch.tensor(alphas, dtype=torch.float64),
        beta=torch.tensor(betas, dtype=torch.float64),
        U=U,
        basis=basis.matrix() if keep_basis else None,
        asymmetry=asym / max(max((abs(a) for a in alphas), default=0.0) + 2 * max(betas, default=0.0), 1e-300),
    )


class LanczosBasis:
    """Lanczos vectors stored in fixed blocks: growing never copies (a doubling buffer would need the old and
    the new buffer at once, 3x the basis, which is what runs out first on a 1e8-parameter model)."""

    BLOCK = 16
    STREAM = 2  # basis vectors on the device at once when the basis is offloaded

    def __init__(self, dim: int, dtype: torch.dtype, device, compute_device=None):
        self.dim, self.dtype, self.device = dim, dtype, device
        self.compute = compute_device if compute_device is not None else device
        self.offloaded = torch.device(self.compute) != torch.device(device)
        self.pin = self.offloaded and torch.device(device).type == "cpu" and torch.device(self.compute).type == "cuda"
        self.blocks: list[torch.Tensor] = []
        self.n = 0

    def append(self, v: torch.Tensor) -> None:
        i = self.n % self.BLOCK
        if i == 0:
            self.blocks.append(torch.empty(self.BLOCK, self.dim, dtype=self.dtype, device=self.device,
                                           pin_memory=self.pin))
        self.blocks[-1][i].copy_(v, non_blocking=self.pin)
        self.n += 1

    def _filled(self):
        for b, block in enumerate(self.blocks):
            yield block[: min(self.BLOCK, self.n - b * self.BLOCK)]

    def orthogonalize(self, w: torch.Tensor) -> torch.Tensor:
        """``w - V V^T w`` (classical Gram-Schmidt against every stored vector, block by block)."""
        coeffs = [B @ w for B in self._filled()]
        for B, c in zip(self._filled(), coeffs):
            w = w - c @ B
        return w

    def reorthogonalize(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` made orthogonal to every stored vector, twice over (CGS2).

        On the compute device: two global passes. Offloaded: one pass over the basis, ``STREAM`` vectors at a
        time, each piece brought over once and applied twice, so the basis crosses the bus once per step.
        """
        if not self.offloaded:
            return self.orthogonalize(self.orthogonalize(w))
        for B in self._filled():
            # a few vectors at a time: a whole block on the device would be the largest allocation of a
            # memory-bounded probe (16 vectors = 0.7 GB for ResNet-18)
            for s in range(0, B.shape[0], self.STREAM):
                Bc = B[s : s + self.STREAM].to(w.device, non_blocking=self.pin)
                for _ in range(2):
                    w = w - (Bc @ w) @ Bc
        return w

    def matrix(self) -> torch.Tensor:
        return torch.cat(list(self._filled()))


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
