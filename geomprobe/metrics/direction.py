"""Curvature along the directions training actually moves in: the gradient and the optimizer's last step.

For the gradient ``g`` and the last update ``u = theta_t - theta_{t-1}`` (what the optimizer's step did):

* ``grad_curvature = gᵀHg / ‖g‖²`` and ``update_curvature = uᵀHu / ‖u‖²``, the Rayleigh quotients of the
  Hessian along them, and their ratios to ``lambda_max``: near 1, the step points into the sharpest
  directions; near 0, into the flat bulk;
* ``grad_top_share = ‖V_kᵀ g‖² / ‖g‖²``, the share of the gradient in the span of the top-``k`` Hessian
  eigenvectors (Gur-Ari, Roberts, Dyer 2018: most of the gradient lives in a tiny top subspace);
* the quadratic model's loss change for the last step, ``predicted_change = gᵀu - ½ uᵀHu`` (the second-order
  Taylor model at ``theta_t`` evaluated back at ``theta_{t-1}``), against the measured
  ``actual_change = L(theta_t) - L(theta_{t-1})`` on the probe batches. Their difference is the model's
  third-order remainder: large when the step left the region where the quadratic model holds.

The last update comes from :class:`GeometryProbe` (it keeps the parameters from before each optimizer step),
or from the caller (``last_update=``); without it the update's entries are ``None`` and ``update`` says why.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..engine.evaluate import flat_parameters, losses_at
from ..errors import ConfigurationError
from .registry import CostPlan, PlanContext, register
from .ritz_vectors import extreme_ritz

__all__ = ["direction", "as_update"]


def as_update(land: Any, last_update: Any) -> torch.Tensor:
    """``last_update`` as a flat vector of ``land``'s length, device and dtype; a clear error otherwise."""
    if not isinstance(last_update, torch.Tensor):
        raise ConfigurationError(f"last_update must be a flat tensor of length d = {land.dim}, got "
                                 f"{type(last_update).__name__}")
    if last_update.dim() != 1 or last_update.shape[0] != land.dim:
        raise ConfigurationError(f"last_update has shape {tuple(last_update.shape)}; it must be flat, of length "
                                 f"d = {land.dim} (the measured parameters, in the Landscape's order)")
    u = last_update.detach().to(device=land.device, dtype=land.dtype)
    if not torch.isfinite(u).all():
        raise ConfigurationError("last_update has non-finite entries")
    return u


def _ratio(x: float | None, lam: float) -> float | None:
    return None if x is None or not lam > 0 else x / lam


def _plan(o: dict, c: PlanContext) -> CostPlan:
    """Two HVPs (g and u in one block) and at most ``min(d, max_iter or 300)`` Lanczos steps when no Ritz
    vectors are recorded; the basis holds one vector per step. One forward pass per probe batch for the actual
    loss change (none before the first optimizer step)."""
    m = min(c.dim, o["max_iter"] if o["max_iter"] is not None else 300)
    return CostPlan(2 + m, exact=False, vectors=m + 5, forwards=c.batches)


@register("direction", plan=_plan,
          cost="2 HVPs (along g and the last step) + top-k Lanczos unless spectrum's Ritz vectors are present "
               "(~10-150 HVPs); 1 forward pass per probe batch for the actual loss change")
def direction(land: Any, *, k: int = 1, tol: float = 1e-3, max_iter: int | None = None, seed: int = 0,
              last_update: torch.Tensor | None = None, basis_device: Any = None) -> dict:
    """Curvature along the gradient and the last update, their ratios to ``lambda_max``, the gradient's share in
    the top-``k`` eigenspace, and the quadratic model's loss change for the last step against the measured one.

    Cost: 2 HVPs (one block of two vectors), plus a Lanczos run at the top (one HVP per step, basis kept)
    unless ``spectrum`` already recorded at least ``k`` top Ritz vectors on this Landscape (as in a probe with
    warm starts), plus one forward pass per probe batch at ``theta - u``. Errors: the Rayleigh quotients and
    the predicted change are exact up to rounding; ``lambda_max`` is within ``lambda_max_err`` of an eigenvalue
    (Lanczos residual bound), and the top-``k`` share is that of the Ritz vectors' span, which approaches the
    eigenspace's as their residuals (``top_err``) fall below the spectral gap. See the module docstring.
    """
    if last_update is not None:
        u = as_update(land, last_update)
    before = land.hvps
    ritz = extreme_ritz(land, "top", k, tol=tol, max_iter=max_iter, seed=seed, basis_device=basis_device)
    lam = ritz.values[0]
    g = land.grad.to(land.device)  # the host holds it in the host-vector mode; this metric works on the device
    gnorm2 = float(g.double() @ g.double())
    vectors = [g] + ([u] if last_update is not None else [])
    H = land.hvp(torch.stack(vectors))
    out: dict[str, Any] = {
        "lambda_max": lam, "lambda_max_err": ritz.errs[0], "k": len(ritz), "top": ritz.values, "top_err": ritz.errs,
        "grad_norm": math.sqrt(gnorm2),
    }
    if gnorm2 > 0:
        curv = float(g.double() @ H[0].double()) / gnorm2
        proj = ritz.vectors.to(g.device).double() @ g.double()
        out.update(grad_curvature=curv, grad_curvature_ratio=_ratio(curv, lam),
                   grad_top_share=float(proj @ proj) / gnorm2)
    else:
        out.update(grad_curvature=None, grad_curvature_ratio=None, grad_top_share=None)
    keys = ("update_norm", "update_curvature", "update_curvature_ratio", "update_grad_cosine", "predicted_change",
            "actual_change", "quadratic_error")
    if last_update is None:
        out.update(dict.fromkeys(keys), update="no last update (probe before the first optimizer step, or none given)")
    else:
        unorm2 = float(u.double() @ u.double())
        uHu = float(u.double() @ H[1].double())
        slope = float(g.double() @ u.double())
        previous = losses_at(land, [flat_parameters(land) - u])[0]
        predicted = slope - 0.5 * uHu
        actual = land.loss - float(previous)
        curv_u = uHu / unorm2 if unorm2 > 0 else None
        cos = slope / math.sqrt(unorm2 * gnorm2) if unorm2 > 0 and gnorm2 > 0 else None
        out.update(update_norm=math.sqrt(unorm2), update_curvature=curv_u,
                   update_curvature_ratio=_ratio(curv_u, lam), update_grad_cosine=cos, predicted_change=predicted,
                   actual_change=actual, quadratic_error=actual - predicted, update="measured")
    out["hvps"] = land.hvps - before
    out["forwards"] = len(land.batches) if last_update is not None else 0
    return out
