"""Preconditioned Steihaug–Toint conjugate gradients for the ellipsoidal trust-region subproblem.

Approximately solves::

    min_s  m(s) = gᵀs + ½ sᵀHs     s.t.  ‖s‖_M = sqrt(sᵀ M s) ≤ Δ,     M = diag(a), a > 0

with ``M`` both the trust-region norm and the CG preconditioner (Conn, Gould, Toint, "Trust Region
Methods", Alg. 7.5.1)::

    s_0 = 0, r_0 = g, v_0 = M⁻¹ r_0, p_0 = −v_0
    for k = 0, 1, ...:
        κ_k = p_kᵀ H p_k
        κ_k ≤ 0            → s = s_k + τ p_k with ‖s_k + τ p_k‖_M = Δ, τ > 0   (negative curvature)
        α_k = r_kᵀv_k / κ_k
        ‖s_k + α_k p_k‖_M ≥ Δ → s = s_k + τ p_k on the boundary               (boundary)
        s_{k+1} = s_k + α_k p_k,  r_{k+1} = r_k + α_k H p_k
        ‖r_{k+1}‖ ≤ ‖g‖ min(κ, ‖g‖^{1/2}) → stop                             (converged)
        v_{k+1} = M⁻¹ r_{k+1},  β_k = r_{k+1}ᵀv_{k+1} / r_kᵀv_k,  p_{k+1} = −v_{k+1} + β_k p_k

The residual ``r = g + Hs`` and the stopping test use the Euclidean norm. In exact arithmetic ``‖s_k‖_M``
grows and ``m(s_k)`` falls along the iterates (CGT Thm. 7.5.1), and the first iterate is the Cauchy point of
the ``M``-norm (the model minimizer along ``−M⁻¹g`` inside the region), so the result is feasible and no
worse than the Cauchy point; the solver checks the second claim against rounding and returns the Cauchy
point itself if CG's model value is higher. The model value comes from ``m(s) = ½ (g + r)ᵀ s``, which
needs no extra product.

Cost: one matvec (one HVP) per iteration, at most ``max_iter``; nothing else touches ``H``.

>>> import torch
>>> H = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
>>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
>>> res = steihaug_cg(lambda v: H @ v, g, radius=10.0)
>>> res.s, res.exit
(tensor([-1.0000, -0.2500], dtype=torch.float64), 'converged')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigurationError, NonFiniteLossError

__all__ = ["SteihaugResult", "steihaug_cg", "cauchy_point"]

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SteihaugResult:
    """The step and how it was found.

    ``model_value`` is ``m(s) = gᵀs + ½ sᵀHs`` (so the predicted decrease is ``-model_value``);
    ``exit`` is ``"converged"``, ``"boundary"``, ``"negative_curvature"``, ``"max_iter"`` or
    ``"zero_gradient"``; ``hvps`` counts matvecs; ``cauchy`` says the Cauchy point replaced CG's step.
    """

    s: torch.Tensor
    model_value: float
    iterations: int
    hvps: int
    exit: str
    cauchy: bool = False


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x, y))


def _norm_m(x: torch.Tensor, a: torch.Tensor) -> float:
    return math.sqrt(max(_dot(a * x, x), 0.0))


def _to_boundary(s: torch.Tensor, p: torch.Tensor, a: torch.Tensor, radius: float) -> float:
    """The positive root τ of ``‖s + τp‖_M = Δ`` for ``‖s‖_M ≤ Δ``."""
    pp = _dot(a * p, p)
    sp = _dot(a * s, p)
    # c ≤ 0 because s is feasible; clamping keeps rounding from producing a complex root.
    c = min(_dot(a * s, s) - radius * radius, 0.0)
    root = math.sqrt(sp * sp - pp * c)
    # Two algebraically equal forms: pick the one without cancellation.
    return (-c) / (sp + root) if sp > 0.0 else (root - sp) / pp


def cauchy_point(g: torch.Tensor, Hd: torch.Tensor | None, radius: float,
                 a: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The Cauchy point of the ``M``-norm trust region and its model value.

    Minimizes ``m(t d)`` over ``0 ≤ t ≤ Δ / ‖d‖_M`` along ``d = −M⁻¹g``; ``Hd`` must be ``H d`` (one HVP,
    which the solver shares with its first iteration). Returns ``(s_c, m(s_c))``.
    """
    a = torch.ones_like(g) if a is None else a
    d = -g / a
    gd = _dot(g, d)
    if gd == 0.0:
        return torch.zeros_like(g), 0.0
    if Hd is None:
        raise ConfigurationError("cauchy_point needs Hd = H @ (-g / a) for a nonzero gradient")
    dHd = _dot(d, Hd)
    t_max = radius / _norm_m(d, a)
    t = t_max if dHd <= 0.0 else min(-gd / dHd, t_max)
    return t * d, t * gd + 0.5 * t * t * dHd


def _check(g: torch.Tensor, radius: float, a: torch.Tensor | None, kappa: float, max_iter: int) -> None:
    if not isinstance(g, torch.Tensor) or g.ndim != 1 or not g.is_floating_point():
        raise ConfigurationError(
            f"steihaug_cg expects g as a 1-D floating tensor, got "
            f"{type(g).__name__} {tuple(getattr(g, 'shape', ()))}; "
            f"flatten with torch.cat([t.reshape(-1) ...])"
        )
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0.0):
        raise ConfigurationError(f"trust-region radius must be positive and finite, got {radius!r}")
    if a is not None:
        if a.shape != g.shape:
            raise ConfigurationError(
                f"ellipsoid diagonal a has shape {tuple(a.shape)} but g has {tuple(g.shape)}; they must match"
            )
        if not bool(torch.all(a > 0)) or not bool(torch.isfinite(a).all()):
            raise ConfigurationError("ellipsoid diagonal a must be positive and finite everywhere")
    if not (0.0 < kappa <= 1.0):
        raise ConfigurationError(f"kappa must lie in (0, 1], got {kappa!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigurationError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not bool(torch.isfinite(g).all()):
        raise NonFiniteLossError("the gradient passed to steihaug_cg has NaN or infinite entries")


def steihaug_cg(hvp: Matvec, g: torch.Tensor, radius: float, a: torch.Tensor | None = None, *,
                kappa: float = 0.1, max_iter: int = 50) -> SteihaugResult:
    """Approximate ``argmin gᵀs + ½ sᵀHs`` over ``‖s‖_M ≤ Δ`` by preconditioned Steihaug–Toint CG.

    Args:
        hvp: ``v ↦ H v`` on flat tensors shaped like ``g``.
        g: the gradient, a 1-D tensor.
        radius: the trust-region radius ``Δ`` in the ``M``-norm.
        a: the diagonal of ``M`` (positive); ``None`` is the sphere ``M = I``.
        kappa: the forcing constant κ of the stopping test ``‖r‖ ≤ ‖g‖ min(κ, ‖g‖^{1/2})``.
        max_iter: at most this many CG iterations, i.e. HVPs.

    Cost: ``hvps`` matvecs, ``≤ max_iter``. Reference: Conn, Gould, Toint, "Trust Region Methods",
    Alg. 7.5.1; Kohler, Adolphs, Lucchi, "Adaptive norms for deep learning with regularized Newton methods".
    """
    _check(g, radius, a, kappa, max_iter)
    a = torch.ones_like(g) if a is None else a.to(dtype=g.dtype)
    s = torch.zeros_like(g)
    g_norm = float(torch.linalg.vector_norm(g))
    if g_norm == 0.0:
        return SteihaugResult(s, 0.0, 0, 0, "zero_gradient")
    tol = g_norm * min(kappa, math.sqrt(g_norm))

    r = g.clone()
    v = r / a
    p = -v
    rv = _dot(r, v)
    exit_reason = "max_iter"
    cauchy: tuple[torch.Tensor, float] | None = None
    hvps = 0
    for _ in range(max_iter):
        Hp = hvp(p)
        hvps += 1
        curv = _dot(p, Hp)
        if not math.isfinite(curv):
            raise NonFiniteLossError(
                "a Hessian-vector product inside the trust-region solver is NaN or infinite"
            )
        if cauchy is None:
            cauchy = cauchy_point(g, Hp, radius, a)
        if curv <= 0.0:
            tau = _to_boundary(s, p, a, radius)
            s.add_(p, alpha=tau)
            r.add_(Hp, alpha=tau)
            exit_reason = "negative_curvature"
            break
        alpha = rv / curv
        s_next = s + alpha * p
        if _norm_m(s_next, a) >= radius:
            tau = _to_boundary(s, p, a, radius)
            s.add_(p, alpha=tau)
            r.add_(Hp, alpha=tau)
            exit_reason = "boundary"
            break
        s = s_next
        r.add_(Hp, alpha=alpha)
        if float(torch.linalg.vector_norm(r)) <= tol:
            exit_reason = "converged"
            break
        v = r / a
        rv_next = _dot(r, v)
        p = -v + (rv_next / rv) * p
        rv = rv_next

    model_value = 0.5 * (_dot(g, s) + _dot(r, s))
    if cauchy is not None and model_value > cauchy[1]:
        return SteihaugResult(cauchy[0], cauchy[1], hvps, hvps, exit_reason, cauchy=True)
    return SteihaugResult(s, model_value, hvps, hvps, exit_reason)
