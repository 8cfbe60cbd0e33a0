"""Block Lanczos: extreme eigenvalues from a block Krylov space, ``b`` matvecs per step in one batched call.

A pure kernel like :mod:`geomprobe.linalg`: it takes a matvec that accepts a block ``(b, d)`` and knows
nothing of models. Where a batched HVP costs much less per vector than a single one (an MLP on a GPU:
0.44 against 1.90 gradients, benchmarks/RESULTS.md), a block step buys ``b`` Krylov directions for the price
of fewer than ``b`` single steps; where it does not (convolutions, attention), single-vector
:func:`~geomprobe.linalg.lanczos.lanczos` needs fewer HVPs for the same accuracy and is the better choice.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigurationError
from .lanczos import LanczosBasis, LanczosResult, extremes_converged
from .vectors import Matvec, all_finite, check_dim, default_generator, gaussian

__all__ = ["block_lanczos"]


def block_lanczos(
    matvec: Matvec,
    dim: int,
    *,
    block: int = 8,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "both",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """Extreme eigenvalues by Rayleigh-Ritz on the block Krylov space ``span{X, HX, H^2 X, ...}``.

    Each step applies ``H`` to the newest block of ``b`` orthonormal vectors (one batched matvec),
    orthogonalizes the result against the whole basis twice (CGS2), and takes its QR factors ``Q R`` as the
    next block. ``T = V^T H V`` grows by the new column block ``V (H X_j)^T``; its eigenpairs ``(theta, u)``
    are the Ritz pairs. Residual bound: with full reorthogonalization ``H V = V T + Q_{j+1} R_{j+1} E_j^T``,
    so ``||H V u - theta V u|| = ||R_{j+1} u_{last block}||``: some eigenvalue lies within it, as for
    single-vector Lanczos. Stops like :func:`geomprobe.linalg.lanczos.lanczos` (``tol`` on the ``k`` extremes at
    ``which`` end(s)), on an exhausted space, or after ``max_iter`` matvecs (default ``min(dim, 300)``).

    Cost: ``b`` matvecs per step in one call; memory ``(m + b) d`` for the basis; ``matvecs`` counts vectors.

    >>> H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = block_lanczos(lambda V: V @ H, 100, block=4, tol=1e-8)
    >>> round(r.top(1)[0][0], 6), round(r.bottom(1)[0][0], 6), r.converged
    (100.0, 1.0, True)
    """
    check_dim(dim)
    if block < 1 or k < 1 or tol < 0:
        raise ConfigurationError(f"block_lanczos needs block >= 1, k >= 1 and tol >= 0; got {block}, {k}, {tol}")
    if which not in ("both", "largest", "smallest"):
        raise ConfigurationError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    m_max = min(dim, max_iter if max_iter is not None else 300)
    generator = generator or default_generator()
    X = gaussian((min(block, dim), dim), generator, dtype, device)
    X = torch.linalg.qr(X.T.double())[0].T.to(dtype)
    basis = LanczosBasis(dim, dtype, X.device)
    T = torch.zeros(0, 0, dtype=torch.float64)
    matvecs = 0
    converged = False
    theta = U = bounds = None
    while True:
        W = matvec(X).reshape(X.shape[0], dim).to(dtype)
        matvecs += X.shape[0]
        if not all_finite(W):
            raise FloatingPointError(f"the matvec returned non-finite values after {matvecs} products")
        for row in X:
            basis.append(row)
        n_old, n = T.shape[0], basis.n
        # (n, b): the new column block of T = V^T H V, block by block (the basis is never concatenated)
        col = torch.cat([B @ W.T for B in basis._filled()]).double().cpu()
        T2 = torch.zeros(n, n, dtype=torch.float64)
        T2[:n_old, :n_old] = T
        T2[:, n_old:] = col
        T2[n_old:, :n_old] = col[:n_old].T
        T = (T2 + T2.T) / 2
        # the next block: H X with the whole basis projected out (twice), then orthonormalized
        Wp = W
        for _ in range(2):
            for B in basis._filled():
                Wp = Wp - (Wp @ B.T) @ B
        Q, R = torch.linalg.qr(Wp.T.double())
        R = R.cpu()
        theta, U = torch.linalg.eigh(T)
        last = U[n_old:, :]  # components of each Ritz vector on the newest block
        bounds = (R @ last).norm(dim=0)
        scale = max(float(theta.abs().max()), 1e-300)
        keep = R.diagonal().abs() > 1e-12 * scale * math.sqrt(dim)
        if not bool(keep.any()) or n >= dim:
            converged = True
            bounds = torch.zeros_like(bounds)
            break
        if tol > 0 and extremes_converged(theta, bounds, k, tol, which):
            converged = True
            break
        if matvecs >= m_max:
            break
        X = Q.T[keep.to(Q.device)][: m_max - matvecs].to(dtype)
        if X.shape[0] == 0:
            break
    return LanczosResult(
        ritz_values=theta,
        bounds=bounds,
        steps=T.shape[0],
        converged=converged,
        matvecs=matvecs,
        alpha=torch.diagonal(T).clone(),
        beta=torch.zeros(0, dtype=torch.float64),
        U=U,
    )
