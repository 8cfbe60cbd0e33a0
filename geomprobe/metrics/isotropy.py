"""Isotropy of gradient noise, raw and preconditioned by the optimizer's ``P`` (docs/metrics.md#isotropy,
Staib et al. 2019).

Adaptive methods are preconditioned SGD, ``x ← x − η P g``; the noise they inject is ``Pξ``. Staib et al.
argue that the preconditioner makes the noise more isotropic near stationary points, which helps escape
saddles. From P ≥ 32 noise samples ``ξ_p = g_p − ḡ`` (per-example gradients, or minibatches through
``noise_data=`` as in the ``noise`` metric) this metric reports, for ``C = Cov(ξ)`` and ``C_P = P C P``:

- ``cv``: the spread ``std(c)/mean(c)`` of the per-coordinate variances ``c_i = Var_p(ξ_i)`` (0 when every
  coordinate is equally noisy), raw and preconditioned (``c_i p_i²``), overall and per block;
- ``isotropy_index``: ``ι(C) = (tr C)²/(d tr C²) ∈ [1/d, 1]`` (:func:`isotropy_index`), from the unbiased
  estimates of ``(tr C)²`` and ``tr C²`` of :func:`geomprobe.stats.covariance.trace_moments`;
- ``escape``: ``E[(u_minᵀ P ξ)²] / (tr C_P / d)``, the noise along the Hessian's most negative direction
  relative to an isotropic share (1 for isotropic noise); ``u_min`` is the Lanczos vector of λ_min.

``P`` comes from :func:`geomprobe.metrics.precond.optimizer_preconditioner` (Adam/AdamW, RMSprop, Adagrad,
SGD → I, or any optimizer with a ``preconditioner()`` method such as the ellipsoidal trust region).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigurationError
from ..stats.covariance import isotropy_index
from ..stats.gradient_noise import (
    DEFAULT_MAX_ELEMENTS,
    NoiseStats,
    ViewStats,
    collect_noise,
    projection_variances,
    ratio,
    trace_estimates,
    with_error,
)
from .noise import DEFAULT_MAX_SAMPLES, gradient_source
from .precond import optimizer_preconditioner
from .registry import register
from .spectrum import run_lanczos

__all__ = ["isotropy", "isotropy_index", "MIN_ISOTROPY_SAMPLES"]

MIN_ISOTROPY_SAMPLES = 32  # docs/metrics.md#isotropy: P >= 32 noise samples


def _view_estimates(stats: NoiseStats, v: ViewStats, suffix: str) -> dict[str, Any]:
    d = stats.d
    out: dict[str, Any] = {}
    out[f"cv{suffix}"], out[f"cv{suffix}_err"] = with_error(v.cv, v.cv_R)
    _, t1sq, t2 = v.moments
    iota_R = [ratio(m[1], d * m[2]) for m in v.moments_R]
    out[f"isotropy_index{suffix}"], out[f"isotropy_index{suffix}_err"] = with_error(ratio(t1sq, d * t2), iota_R)
    tr = trace_estimates(stats, v)
    out[f"trace_cov{suffix}"], out[f"trace_cov{suffix}_err"] = with_error(tr["trace"], tr["trace_R"])
    pv = projection_variances(stats, v)
    if pv is not None:
        full, reps = pv
        esc_R = [ratio(float(r[0]), t / d) for r, t in zip(reps, tr["trace_R"])]
        out[f"escape{suffix}"], out[f"escape{suffix}_err"] = with_error(ratio(float(full[0]), tr["trace"] / d), esc_R)
    else:
        out[f"escape{suffix}"], out[f"escape{suffix}_err"] = None, None
    return out


def _block_estimates(stats: NoiseStats, views: list[tuple[str, str]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for j, b in enumerate(stats.blocks):
        entry: dict[str, Any] = {}
        for key, suffix in views:
            v = stats.views[key]
            entry[f"cv{suffix}"], entry[f"cv{suffix}_err"] = with_error(v.block_cv[j], [r[j] for r in v.block_cv_R])
            tr = trace_estimates(stats, v, block=j)
            entry[f"trace_cov{suffix}"], entry[f"trace_cov{suffix}_err"] = with_error(tr["trace"], tr["trace_R"])
        out[b.name] = entry
    return out


def _direction(land: Any, u_min: Any, lanczos_tol: float, lanczos_max_iter: int, seed: int,
               basis_device: Any = None, max_basis: int | None = None) -> tuple[Any, dict]:
    """The unit escape direction and what is known about it (λ_min and its bound when Lanczos ran)."""
    if u_min is None:
        return None, {"lambda_min": None, "lambda_min_err": None, "lanczos_converged": None, "hvps": 0}
    if isinstance(u_min, str):
        if u_min != "lanczos":
            raise ConfigurationError(f"u_min must be a vector, 'lanczos' or None, got {u_min!r}")
        r = run_lanczos(land, tol=lanczos_tol, max_iter=lanczos_max_iter, which="smallest", seed=seed,
                        keep_basis=True, basis_device=basis_device, max_basis=max_basis)
        lam, err = r.bottom(1)
        u = r.ritz_vector(0)
        return u, {"lambda_min": lam[0], "lambda_min_err": err[0], "lanczos_converged": bool(r.converged),
                   "hvps": r.matvecs}
    u = torch.as_tensor(u_min).detach().reshape(-1)
    if u.numel() != land.dim:
        raise ConfigurationError(f"u_min must have d = {land.dim} entries, got {u.numel()}")
    norm = float(u.double().norm())
    if not norm > 0 or not torch.isfinite(u).all():
        raise ConfigurationError("u_min must be a nonzero, finite vector")
    return u.double() / norm, {"lambda_min": None, "lambda_min_err": None, "lanczos_converged": None, "hvps": 0}


@register(
    "isotropy",
    cost="P >= 32 gradients (twice when P*d > max_elements), plus Lanczos for u_min (~10-150 HVPs) unless given",
    needs=("optimizer", "noise_batches"),
)
def isotropy(
    land: Any,
    *,
    optimizer: Any = None,
    noise_data: Any = None,
    u_min: Any = "lanczos",
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    min_samples: int = MIN_ISOTROPY_SAMPLES,
    method: str = "auto",
    chunk_size: int = 32,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    lanczos_tol: float = 1e-3,
    lanczos_max_iter: int = 150,
    basis_device: Any = None,
    max_basis: int | None = None,
    seed: int = 0,
) -> dict:
    """Isotropy of the gradient noise, raw and preconditioned by ``optimizer``'s ``P`` (module docstring).

    Args:
        land: the Landscape.
        optimizer: whose ``P`` to apply. The registry lists it as a need, so a GeometryProbe requires one;
            a direct call without it reports the raw noise only (``*_preconditioned`` keys None).
        noise_data: batches of the training batch size, one noise sample each; None → per-example
            gradients of the probe batches (see the ``noise`` metric).
        u_min: the escape direction: ``"lanczos"`` (default: λ_min's Ritz vector, ``lanczos_tol`` and
            ``lanczos_max_iter`` apply), a flat vector of length d, or None to skip ``escape``.
        basis_device, max_basis: where that Lanczos keeps its basis and how many vectors it may hold (thick
            restart beyond; the same bounds), as the probe's memory plan chooses them.
        max_samples: cap on P, as in the ``noise`` metric (default 256; None: all).

    Returns ``cv``, ``isotropy_index``, ``escape``, ``trace_cov`` (each with ``*_err``) and the same with
    ``_preconditioned``; ``isotropy_min = 1/d``; ``lambda_min``/``lambda_min_err``/``lanczos_converged`` when
    Lanczos ran; ``optimizer`` and ``source`` of P; ``samples``, ``method``, ``gradients``, ``hvps``; and
    ``blocks`` with ``cv`` and ``trace_cov`` (raw and preconditioned) per block.

    Errors: delete-a-group jackknife standard errors over 20 groups of samples (or the held groups when
    ``P·d > max_elements``). ``cv`` is a ratio over d estimated variances: with few samples their sampling
    noise alone gives ``cv ≈ sqrt(2/(P−1))`` for perfectly isotropic Gaussian noise, so compare raw with
    preconditioned at the same P rather than with 0.

    Cost: P gradients (no HVPs), plus the Lanczos steps for ``u_min`` (``hvps``).
    """
    src = gradient_source(land, noise_data, min_samples=min_samples, max_samples=max_samples,
                          chunk_size=chunk_size, method=method)
    u, lan = _direction(land, u_min, lanczos_tol, lanczos_max_iter, seed, basis_device, max_basis)
    views: dict[str, torch.Tensor | None] = {"raw": None}
    source = None
    if optimizer is not None:
        p_list, source = optimizer_preconditioner(optimizer, land.params, land.param_names)
        views["precond"] = land.space.flatten(p_list).double()
    gen = torch.Generator().manual_seed(seed)
    # Isotropy reads no tail indices: tail_values = P keeps the coordinate subset minimal.
    stats = collect_noise(src, land.blocks, views=views, directions=None if u is None else u.reshape(1, -1),
                          tail_values=len(src), max_elements=max_elements, generator=gen,
                          device=land.device)
    pairs = [("raw", "")] + ([("precond", "_preconditioned")] if optimizer is not None else [])
    out: dict[str, Any] = {}
    for key, suffix in pairs:
        out.update(_view_estimates(stats, stats.views[key], suffix))
    if optimizer is None:
        for name in ("cv", "isotropy_index", "trace_cov", "escape"):
            out[f"{name}_preconditioned"] = out[f"{name}_preconditioned_err"] = None
    out.update(
        isotropy_min=1.0 / stats.d,
        lambda_min=lan["lambda_min"],
        lambda_min_err=lan["lambda_min_err"],
        lanczos_converged=lan["lanczos_converged"],
        optimizer=None if optimizer is None else type(optimizer).__name__,
        source=source,
        samples=stats.P,
        batch_size=src.batch_size,
        method=src.method,
        fallback_reason=src.fallback_reason,
        exact=stats.exact,
        passes=stats.passes,
        gradients=stats.P * stats.passes,
        hvps=lan["hvps"],
        blocks=_block_estimates(stats, pairs),
    )
    return out
