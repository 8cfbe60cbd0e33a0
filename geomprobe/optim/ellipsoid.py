"""Diagonal trust-region ellipsoids: the sphere, the Adagrad and the RMSProp ellipsoid.

The trust region of Kohler, Adolphs, Lucchi ("Adaptive norms for deep learning with regularized Newton
methods") is the ball ``‖s‖_A = sqrt(sᵀ A s) ≤ Δ`` of a diagonal matrix ``A = diag(a)`` built from the
gradients seen so far, the same accumulators as the first-order methods they are named after::

    G_0 = ε
    sphere:   a = 1
    Adagrad:  G_t = G_{t−1} + g_t²
    RMSProp:  G_t = β G_{t−1} + (1 − β) g_t²        (β = 0.8)
    a_t = sqrt(max(G_t, ε))                          elementwise

The floor at ``ε`` is this implementation's choice (unconfirmed in the paper): RMSProp's ``G`` of a
coordinate whose gradient stays zero decays like ``β^t ε`` and would underflow to an ``a`` of 0, a
degenerate norm and a division by zero in the preconditioner. Updating costs no backprop; it reads the
gradient the step computes anyway.

An ellipsoid is an init/update pair and holds no tensors itself: the accumulator ``G`` lives in the
optimizer's per-parameter state, so it is saved with ``state_dict`` and moves with the parameters.

>>> import torch
>>> ell = DiagonalEllipsoid("adagrad", eps=1e-10)
>>> G = ell.init(torch.zeros(2, dtype=torch.float64))
>>> G = ell.update(G, torch.tensor([3.0, 0.0], dtype=torch.float64))
>>> ell.diagonal(G, torch.zeros(2, dtype=torch.float64))
tensor([3.0000e+00, 1.0000e-05], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigurationError

__all__ = ["ELLIPSOIDS", "DiagonalEllipsoid"]

ELLIPSOIDS: tuple[str, ...] = ("sphere", "adagrad", "rmsprop")


class DiagonalEllipsoid:
    """The rule that turns gradients into the diagonal ``a`` of ``A = diag(a)``.

    Args:
        kind: ``"sphere"``, ``"adagrad"`` or ``"rmsprop"``.
        beta: RMSProp's decay ``β`` in ``[0, 1)`` (ignored by the other kinds).
        eps: ``G_0`` and the floor of ``G``; positive.
    """

    def __init__(self, kind: str, *, beta: float = 0.8, eps: float = 1e-10) -> None:
        if kind not in ELLIPSOIDS:
            raise ConfigurationError(
                f"unknown ellipsoid {kind!r}; expected one of {', '.join(ELLIPSOIDS)}"
            )
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ConfigurationError(f"ellipsoid beta must lie in [0, 1), got {beta!r}")
        if not (isinstance(eps, (int, float)) and eps > 0.0 and math.isfinite(eps)):
            raise ConfigurationError(f"ellipsoid eps must be a positive finite number, got {eps!r}")
        self.kind = kind
        self.beta = float(beta)
        self.eps = float(eps)

    def __repr__(self) -> str:
        return f"DiagonalEllipsoid({self.kind!r}, beta={self.beta}, eps={self.eps})"

    def init(self, like: torch.Tensor) -> torch.Tensor | None:
        """``G_0 = ε`` shaped like ``like`` (``None`` for the sphere, which keeps no accumulator)."""
        if self.kind == "sphere":
            return None
        return torch.full_like(like, self.eps, memory_format=torch.preserve_format)

    @torch.no_grad()
    def update(self, G: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor | None:
        """Fold the gradient ``g`` into ``G`` in place and return it."""
        if self.kind == "sphere":
            return G
        if G is None:
            raise ConfigurationError(f"the {self.kind} ellipsoid needs an accumulator from init()")
        if self.kind == "adagrad":
            G.addcmul_(g, g)
        else:
            G.mul_(self.beta).addcmul_(g, g, value=1.0 - self.beta)
        return G

    @torch.no_grad()
    def diagonal(self, G: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """``a = sqrt(max(G, ε))`` (all ones for the sphere), shaped like ``like``."""
        if self.kind == "sphere":
            return torch.ones_like(like)
        if G is None:
            raise ConfigurationError(f"the {self.kind} ellipsoid needs an accumulator from init()")
        return G.clamp(min=self.eps).sqrt()
