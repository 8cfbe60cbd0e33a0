"""Saddle flag: a small gradient with certified negative curvature (docs/metrics.md#saddle).

::

    saddle  <=>  ||grad L|| <= eps_g   and   lambda_min <= -eps_H
    eps_g = 1e-3 ||grad L(w0)||,   eps_H = 1e-3 lambda_max            (defaults)

``lambda_min`` and ``lambda_max`` come from one Lanczos run on HVPs, ``lambda_min`` with its certified
error ``err``: ``lambda_min`` lies in ``[theta_min - err, theta_min]`` with probability ``>= 1 - risk``
(1e-2) over the random start (:mod:`geomprobe.linalg.certify`; a residual bound alone would say only that
some eigenvalue lies near ``theta_min``, not that none lies below). The curvature test has three outcomes:

* ``"yes"`` (certified): ``theta_min + err <= -eps_H``, so an eigenvalue at most ``-eps_H`` exists;
* ``"no"``: Lanczos converged and ``theta_min - err > -eps_H``: no eigenvalue is that negative, with
  probability ``>= 1 - risk``;
* ``"uncertain"``: anything else (the bound straddles ``-eps_H``, or Lanczos stopped short).

``saddle`` is ``"yes"`` when the gradient test passes and the curvature test says yes, ``"no"`` when either
test fails for certain, ``"uncertain"`` otherwise; ``flag`` is ``saddle == "yes"``.

The reference gradient norm ``||grad L(w0)||`` belongs to the start of training, which a single probe does
not see: pass ``grad_norm0=`` (a GeometryProbe passes its first record's gradient norm). Without it the
current gradient norm is the reference, i.e. ``eps_g = 1e-3 ||grad L(w)||``: the gradient test then passes
only at an exact stationary point, so the flag reduces to the curvature test at such points and is
otherwise "no"; ``grad_norm0_source`` says which reference was used. If ``lambda_max <= 0`` the default
``eps_H`` uses ``|lambda_min|`` instead (a region with no positive curvature).

Reference: docs/metrics.md#saddle; Staib et al. 2019 ("Escaping saddle points with adaptive gradient methods").
Cost: the Lanczos steps (``hvps``), 10-150 typically; the gradient is the Landscape's own.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigurationError
from .registry import register
from .shared import Reuse
from .spectrum import run_lanczos

__all__ = ["saddle", "curvature_verdict"]


def curvature_verdict(lambda_min: float, err: float, eps_h: float, converged: bool) -> str:
    """``"yes"``, ``"no"`` or ``"uncertain"`` for "lambda_min <= -eps_h" given a Ritz value and its bound.

    >>> curvature_verdict(-1.0, 0.1, 0.5, True), curvature_verdict(-0.55, 0.1, 0.5, True)
    ('yes', 'uncertain')
    >>> curvature_verdict(0.2, 0.01, 0.5, True), curvature_verdict(0.2, 0.01, 0.5, False)
    ('no', 'uncertain')
    """
    if lambda_min + err <= -eps_h:
        return "yes"
    if converged and lambda_min - err > -eps_h:
        return "no"
    return "uncertain"


@register("saddle", cost="Lanczos steps until lambda_min's bound meets tol: ~10-150 HVPs (none when spectrum of the "
          "same probe ran the same Lanczos: tol, max_iter and seed alike)", after=("spectrum",))
def saddle(
    land: Any,
    *,
    grad_norm0: float | None = None,
    eps_g: float | None = None,
    eps_h: float | None = None,
    rel_g: float = 1e-3,
    rel_h: float = 1e-3,
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
) -> dict:
    """The saddle flag of docs/metrics.md#saddle with a certified lambda_min.

    Args:
        land: the Landscape.
        grad_norm0: ``||grad L(w0)||`` at the start of training; ``eps_g = rel_g * grad_norm0``.
        eps_g, eps_h: explicit thresholds (override the relative defaults).
        rel_g, rel_h: the relative defaults (1e-3 of ``grad_norm0``, 1e-3 of ``lambda_max``).
        tol: Lanczos tolerance (relative to the spectrum's spread); tighter than ``spectrum``'s default,
            because the bound is compared with ``eps_H``, itself 1e-3 of ``lambda_max``.
        max_iter: Lanczos step cap (default ``min(d, 300)``).
        seed, generator: the Lanczos start.
        basis_device: where the Lanczos basis lives (``"cpu"``: host memory; see krylov.lanczos).

    Returns ``saddle`` ("yes"/"no"/"uncertain"), ``flag``, ``grad_norm``, ``eps_g``, ``grad_small``,
    ``grad_norm0``, ``grad_norm0_source`` ("given"/"current"), ``eps_h``, ``negative_curvature``
    ("yes"/"no"/"uncertain"), ``lambda_min``, ``lambda_min_err``, ``lambda_max``, ``lambda_max_err``
    (certified distances to the true extremes, as in :func:`geomprobe.metrics.spectrum`), ``converged``,
    ``hvps``.

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    >>> model = nn.ParameterList([w])
    >>> loss = lambda model, batch: model[0][0] ** 2 - model[0][1] ** 2     # saddle at 0: H = diag(2, -2)
    >>> out = saddle(Landscape(model, loss, {"x": torch.zeros(1)}), grad_norm0=1.0)
    >>> out["saddle"], out["grad_norm"], round(out["lambda_min"], 9)
    ('yes', 0.0, -2.0)
    """
    if rel_g < 0 or rel_h < 0 or tol < 0:
        raise ConfigurationError(f"saddle needs rel_g, rel_h, tol >= 0; got {rel_g}, {rel_h}, {tol}")
    if grad_norm0 is not None and not (math.isfinite(grad_norm0) and grad_norm0 >= 0):
        raise ConfigurationError(f"grad_norm0 must be a finite number >= 0, got {grad_norm0!r}")
    g = float(land.grad.double().norm())
    source = "given" if grad_norm0 is not None else "current"
    ref = float(grad_norm0) if grad_norm0 is not None else g
    eps_g = rel_g * ref if eps_g is None else float(eps_g)
    before, reuse = land.hvps, Reuse(land, "saddle")
    r = run_lanczos(land, tol=tol, max_iter=max_iter, seed=seed, generator=generator, basis_device=basis_device,
                    reuse=reuse)
    (lmin,), (lmin_err,) = r.bottom(1)
    (lmax,), (lmax_err,) = r.top(1)
    # the certified distances to the true extremes, where the run certifies them (a random start always does)
    lmin_err = r.extreme_err[0] if r.certified[0] else lmin_err
    lmax_err = r.extreme_err[1] if r.certified[1] else lmax_err
    if eps_h is None:
        eps_h = rel_h * (lmax if lmax > 0 else abs(lmin))
    curv = curvature_verdict(lmin, lmin_err, float(eps_h), bool(r.converged))
    small = g <= eps_g
    verdict = "no" if (not small or curv == "no") else curv
    return {
        "saddle": verdict,
        "flag": verdict == "yes",
        "grad_norm": g,
        "eps_g": float(eps_g),
        "grad_small": bool(small),
        "grad_norm0": ref,
        "grad_norm0_source": source,
        "eps_h": float(eps_h),
        "negative_curvature": curv,
        "lambda_min": lmin,
        "lambda_min_err": lmin_err,
        "lambda_max": lmax,
        "lambda_max_err": lmax_err,
        "converged": bool(r.converged),
        "hvps": land.hvps - before,  # 0 when the run was spectrum's (``shared`` says so)
        **reuse.fields(),
    }
