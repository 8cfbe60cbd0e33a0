"""Quadratic nn.Modules whose Hessian is known in closed form: the shared harness of the metric tests.

``loss(w) = ½ wᵀ A w − bᵀ w`` with ``w`` the concatenation of the module's parameters ``w0, w1, ...``
(each one block of the Landscape), so ``H = A`` everywhere and ``∇L = A w − b``. ``A`` comes in three
shapes: dense ``(d, d)`` (diagonal, block-diagonal, SPD, indefinite), or diagonal plus first off-diagonal (tridiagonal,
elementwise HVPs, cheap at d = 1e5). The batch only carries the sample count
``n`` the Landscape reports (the OLS baseline's batch size); the loss does not read it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geomprobe import Landscape

F64 = torch.float64


class Quadratic(nn.Module):
    """``½ wᵀAw − bᵀw`` over parameters ``w0, w1, ...`` of the given sizes.

    Give ``A`` dense ``(d, d)`` (symmetric), or its diagonal ``(d,)`` with optionally the first
    off-diagonal ``offdiag`` ``(d - 1,)``: a symmetric tridiagonal A whose HVP is a few elementwise
    products, cheap at d = 1e5.
    """

    def __init__(self, A: torch.Tensor, sizes: Sequence[int], *, offdiag: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, w: torch.Tensor | None = None, dtype: torch.dtype = F64):
        super().__init__()
        d = int(sum(sizes))
        self.kind = "dense" if A.dim() == 2 else "banded"
        if A.shape[0] != d or (offdiag is not None and offdiag.shape != (d - 1,)):
            raise ValueError("A (and offdiag) must match the parameter sizes")
        self.register_buffer("A", A.to(dtype))
        self.register_buffer("c", (torch.zeros(d - 1) if offdiag is None else offdiag).to(dtype))
        self.register_buffer("b", (torch.zeros(d) if b is None else b).to(dtype))
        w = torch.zeros(d) if w is None else w
        for i, piece in enumerate(w.to(dtype).split(list(sizes))):
            setattr(self, f"w{i}", nn.Parameter(piece.clone()))
        self.sizes = list(sizes)

    def flat(self) -> torch.Tensor:
        return torch.cat([getattr(self, f"w{i}") for i in range(len(self.sizes))])

    def forward(self) -> torch.Tensor:
        w = self.flat()
        if self.kind == "dense":
            # F.linear rather than A @ w: batched double backward through a 1-D matmul is ~20x slower
            quad = 0.5 * (w * F.linear(w, self.A)).sum()
        else:
            # products of shifted slices: elementwise, and batched HVPs stay fast
            quad = 0.5 * (self.A * w * w).sum() + (self.c * w[1:] * w[:-1]).sum()
        return quad - self.b @ w

    def dense_hessian(self) -> torch.Tensor:
        """H = A as a dense float64 matrix (small d only)."""
        if self.kind == "dense":
            return self.A.double().clone()
        c = self.c.double()
        return torch.diag(self.A.double()) + torch.diag(c, 1) + torch.diag(c, -1)

    def hessian_diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.A).double().clone() if self.kind == "dense" else self.A.double().clone()

    def gradient(self) -> torch.Tensor:
        """∇L = A w − b in float64."""
        w = self.flat().detach().double()
        if self.kind == "dense":
            Aw = self.A.double() @ w
        else:
            c = self.c.double()
            Aw = self.A.double() * w
            Aw[:-1] += c * w[1:]
            Aw[1:] += c * w[:-1]
        return Aw - self.b.double()


def quadratic_loss(model: Quadratic, batch) -> torch.Tensor:
    return model()


def landscape(model: Quadratic, n: int = 32, **kw) -> Landscape:
    """A Landscape of ``model`` whose probe batch has ``n`` samples (``land.n_samples == n``)."""
    return Landscape(model, quadratic_loss, {"x": torch.zeros(n, 1)}, **kw)


# ---------------------------------------------------------------------------------------- matrices
def spd(d: int, *, seed: int = 0, cond: float = 100.0) -> torch.Tensor:
    """Dense SPD with log-spaced eigenvalues in [1, cond] and a random orthogonal basis."""
    return with_spectrum(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=F64), seed=seed)


def with_spectrum(eigs: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Qᵀ`` with a Haar-random orthogonal ``Q`` (float64, symmetric to rounding)."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * eigs.to(F64)) @ Q.T
    return (A + A.T) / 2


def indefinite(d: int, *, neg: int, seed: int = 0) -> torch.Tensor:
    """Dense symmetric with ``neg`` eigenvalues in [-2, -0.5] and the rest in [0.5, 10]."""
    g = torch.Generator().manual_seed(seed + 1)
    e = torch.cat([-0.5 - 1.5 * torch.rand(neg, generator=g, dtype=F64),
                   0.5 + 9.5 * torch.rand(d - neg, generator=g, dtype=F64)])
    return with_spectrum(e, seed=seed)


def banded(d: int, *, seed: int = 0, spread: float = 1.0, coupling: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal ``a`` (log-normal, sd ``spread`` of the log) and off-diagonal ``c`` (normal, sd ``coupling``)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.exp(spread * torch.randn(d, generator=gen, dtype=F64))
    c = coupling * torch.randn(d - 1, generator=gen, dtype=F64)
    return a, c


# ---------------------------------------------------------------------------------------- checks
def within(estimate: float, exact: float, err: float, *, rel: float, scale: float = 1.0) -> bool:
    """``|estimate - exact| <= err`` plus rounding room ``rel * scale`` (the reported error says how far)."""
    return abs(estimate - exact) <= err + rel * scale


def covers(ci, exact: float, *, rel: float = 0.0, scale: float = 1.0) -> bool:
    """The interval ``[lo, hi]`` contains ``exact`` up to rounding room ``rel * scale``."""
    lo, hi = ci
    return lo - rel * scale <= exact <= hi + rel * scale


def exact_rmed(h: torch.Tensor) -> tuple[float, float]:
    """(R_med, R_q99) of a diagonal, with absolute values, median and linear q0.99 as numpy defines them."""
    import numpy as np

    a = h.abs().double().numpy()
    return float(a.max() / np.median(a)), float(np.quantile(a, 0.99) / np.median(a))


def dense_share(H: torch.Tensor, sizes: Sequence[int]) -> tuple[float, list[float], float]:
    """(delta, per-block delta, block-diagonal share) of a dense matrix cut into blocks of ``sizes``."""
    A = H.double().abs()
    per, inner, at = [], 0.0, 0
    for s in sizes:
        sub = A[at : at + s, at : at + s]
        per.append(float(torch.diagonal(sub).sum() / sub.sum()))
        inner += float(sub.sum())
        at += s
    return float(torch.diagonal(A).sum() / A.sum()), per, inner / float(A.sum())
