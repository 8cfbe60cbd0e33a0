"""Extreme eigenvalues of the Hessian by Lanczos on HVPs (docs/metrics.md#spectrum)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigurationError
from ..linalg.certify import DEFAULT_RISK
from ..linalg.host_blocks import populated_ahead
from ..linalg.lanczos import LanczosResult, extremes_converged, lanczos
from ..linalg.vectors import default_generator, is_host
from ._common import lanczos_placement, plan_options
from .registry import CostPlan, PlanContext, register
from .ritz_vectors import LazyRitzPair, keep_ritz
from .shared import RAW_SPECTRUM, Reuse, lanczos_key

__all__ = ["run_lanczos", "spectrum", "vector_device"]


def run_lanczos(
    land: Any,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "both",
    seed: int = 0,
    generator: torch.Generator | None = None,
    keep_basis: bool = False,
    bound: str = "residual",
    basis_device: torch.device | str | None = None,
    max_basis: int | None = None,
    risk: float | None = DEFAULT_RISK,
    reuse: Reuse | None = None,
    reorth: str = "partial",
) -> LanczosResult:
    """Lanczos on ``land.hvp`` in the Landscape's dtype, its vectors where the Landscape's live
    (:func:`vector_device`: the host in the host-vector mode, so the Krylov arithmetic runs on the CPU and
    the device holds no d-vector; or, where the memory plan says so, two d-vectors on the device and the basis
    on the host: :func:`._common.lanczos_placement`; the raw result, Ritz vectors available).

    A seeded run (no ``generator``, no basis kept) is a shared product (:mod:`.shared`): kept on the Landscape
    under its options and seed, so that a second metric asking for the same run (``precond``'s raw spectrum
    after ``spectrum``) gets it without another HVP; ``reuse`` (the asking metric's view) records who computed
    it. Where the basis lives does not change the result, so it is not part of the key.
    """
    key = lanczos_key(k=k, tol=tol, max_iter=max_iter, which=which, seed=seed, bound=bound, max_basis=max_basis,
                      risk=risk)
    reuse = reuse if reuse is not None else Reuse(land, "a direct call")
    cacheable = generator is None and not keep_basis
    if cacheable:
        kept = reuse.find(key)
        if kept is not None:
            return kept
    mark = len(getattr(land, "hvp_errors", ()))
    r = lanczos(
        land.hvp, land.dim, k=k, tol=tol, max_iter=max_iter, which=which,
        generator=generator or default_generator(seed), dtype=land.dtype, **lanczos_placement(land, basis_device),
        keep_basis=keep_basis, bound=bound, max_basis=max_basis, risk=risk,
        space=getattr(land, "vector_space", None), reorth=reorth, draw_device=land.device, **plan_options(land),
    )
    widen_by_matvec_error(land, r, mark, k, tol, which)
    if cacheable:
        reuse.keep(key, RAW_SPECTRUM, r, r.matvecs)
    return r


def vector_device(land: Any) -> torch.device:
    """Where ``land``'s vectors live: its ``vector_device`` (host memory in the host-vector mode,
    :mod:`geomprobe.engine.host_stream`), else its device."""
    return getattr(land, "vector_device", None) or land.device


def widen_by_matvec_error(land: Any, r: LanczosResult, mark: int, k: int, tol: float, which: str) -> None:
    """Add the error estimates of the approximate HVPs this run took (``land.hvp_errors`` from ``mark`` on;
    the sharded finite-difference route keeps them) to every bound of ``r``.

    With ``H v_j`` computed to within ``e_j`` for the unit Lanczos vectors ``v_j``, the Ritz vector ``y = V u``
    has ``||H y - theta y|| <= beta_m |u_m| + ||E u|| <= beta_m |u_m| + sqrt(sum_j e_j^2)``, so some eigenvalue
    lies within the widened bound; the certified distances to the extremes (``extreme_err``) widen by the same
    amount, the run having been one on ``H`` plus an error of that size along its Krylov vectors.
    ``converged`` is re-judged on the widened bounds."""
    errors = getattr(land, "hvp_errors", None)
    if not errors or len(errors) <= mark or r.bounds is None:
        return
    delta = math.sqrt(sum(e * e for e in errors[mark:]))
    r.bounds = r.bounds + delta
    r.extreme_err = tuple(e + delta for e in r.extreme_err)
    r.matvec_error = delta
    r.converged = bool(r.converged and extremes_converged(r.ritz_values, r.bounds, k, tol, which))


def lanczos_summary(r: LanczosResult, k: int) -> dict:
    """The result dict of a Lanczos run: extremes, top/bottom k, their bounds, what is certified, cost.

    ``top_err[0]``/``bottom_err[0]`` (= ``lambda_max_err``/``lambda_min_err``) are the certified distances to
    the true extremes when the run certifies them (``extreme_certified``), else the residual bounds; every
    later entry is a residual bound (some eigenvalue lies within it), certified as the ``i``-th eigenvalue
    by nothing (``top_certified``/``bottom_certified`` say which entries are).
    """
    top, top_res = r.top(k)
    bottom, bottom_res = r.bottom(k)
    cert_min, cert_max = r.certified
    top_err = [r.extreme_err[1] if cert_max else top_res[0]] + top_res[1:]
    bottom_err = [r.extreme_err[0] if cert_min else bottom_res[0]] + bottom_res[1:]
    return {
        "lambda_max": top[0],
        "lambda_max_err": top_err[0],
        "lambda_min": bottom[0],
        "lambda_min_err": bottom_err[0],
        "lambda_max_resid": top_res[0],
        "lambda_min_resid": bottom_res[0],
        "top": top,
        "top_err": top_err,
        "bottom": bottom,
        "bottom_err": bottom_err,
        "extreme_certified": bool(cert_min and cert_max),
        "top_certified": [cert_max] + [False] * (len(top) - 1),
        "bottom_certified": [cert_min] + [False] * (len(bottom) - 1),
        "risk": r.risk,
        "converged": bool(r.converged),
        "steps": r.steps,
        "hvps": r.matvecs,
        "hvp_asymmetry": r.asymmetry,
        "reorthogonalizations": r.reorthogonalizations,
        "reorth_regime": r.reorth_regime,
        **({"hvp_error": r.matvec_error} if getattr(r, "matvec_error", None) is not None else {}),
    }


def _plan(o: dict, c: PlanContext) -> CostPlan:
    """At most ``min(d, max_iter or 300)`` Lanczos steps, one HVP each; the basis holds one vector per step."""
    m = min(c.dim, o["max_iter"] if o["max_iter"] is not None else 300)
    return CostPlan(m, exact=False, vectors=m + 3)


@register("spectrum", cost="Lanczos steps until the bounds meet tol: ~10-150 HVPs (max_iter caps it)", plan=_plan)
def spectrum(
    land: Any,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    bound: str = "residual",
    basis_device: torch.device | str | None = None,
    max_basis: int | None = None,
    warm: Any = None,
    which: str = "both",
    risk: float | None = DEFAULT_RISK,
    reorth: str = "partial",
) -> dict:
    """The Hessian's ``k`` largest and ``k`` smallest eigenvalues by Lanczos on HVPs, each with its bound.

    Returns ``lambda_max``, ``lambda_min``, ``top``/``bottom`` (``k`` values each, ``top[0] = lambda_max``)
    and their errors. What each error means:

    * ``lambda_max_err``/``lambda_min_err`` (= ``top_err[0]``/``bottom_err[0]``): a certified distance to the
      true extreme, one-sided: ``lambda_max`` lies in ``[theta_max, theta_max + err]`` and ``lambda_min`` in
      ``[theta_min - err, theta_min]``, each with probability ``>= 1 - risk`` over the random start (the
      Ritz-value side is certain). A residual bound alone says only that *some* eigenvalue is near a Ritz
      value; this one also bounds the mass an unseen eigenvalue beyond it could hold
      (:mod:`geomprobe.linalg.certify`, no extra HVP). ``extreme_certified`` is True when both are such
      certificates. Where one is not (``risk=None``, or a run whose own data show its start too unlucky to
      certify that end) the residual bound stands in for it, with no promise about extremeness, and
      ``top_certified[0]``/``bottom_certified[0]`` say which.
    * ``top_err[i]``/``bottom_err[i]`` for ``i >= 1``: residual bounds, the distance to the *nearest*
      eigenvalue. One start vector sees one direction per eigenspace, so no bound from it can say that a
      value is the ``i``-th largest (a repeated eigenvalue looks simple): ``top_certified``/
      ``bottom_certified`` are True for the extremes only.
    * ``lambda_max_resid``/``lambda_min_resid``: the extremes' residual bounds (nearest eigenvalue).

    ``converged`` is True when the certified extreme errors and every reported value's residual bound are
    below ``tol * max(|theta|, spread)``; ``False`` means ``max_iter`` (default ``min(d, 300)``) ran out first
    and the bounds say how far off the values may be. Cost: one HVP per Lanczos step (``hvps``); waiting for
    the certificate costs extra steps over the residual rule alone: on 260 random tanh MLPs of 20-150
    parameters (tests/test_spectrum_certified.py, tol 1e-3) a median of 6 HVPs (mean 5.9, 90th percentile
    9, most 14; 21.5 per run against 15.6); on a 5.8k-parameter tanh MLP, 49-58 against 33-49. The extra
    steps go where the extreme sits at a dense bulk edge, whose place the run must then actually resolve.
    ``risk`` (default 1e-2 per end) is the certificate's failure probability; ``bound="gap"`` reports and stops on the quadratic bounds
    ``min(r, r^2 / gap)`` of :func:`geomprobe.linalg.lanczos.lanczos` for the later values instead:
    several HVPs fewer for the same true accuracy, under the assumption stated there.
    ``basis_device="cpu"`` keeps the Lanczos basis in host
    memory, so that on a GPU the probe needs little more than its graph (``micro_batch_size`` bounds that).
    ``max_basis`` caps the stored Lanczos vectors (thick restart beyond it, the same bounds and certificate,
    more HVPs; the result then says ``restarts``). ``reorth``: ``"partial"`` (default) orthogonalizes a step
    against the whole basis only where an estimate of the vectors' inner products asks
    (:mod:`geomprobe.linalg.orthogonality`), ``"full"`` at every step; the same values and bounds to
    rounding, ``reorthogonalizations`` in the result counts the whole-basis passes (each reads the basis twice).

    ``warm``: a :class:`geomprobe.probe.warm_start.WarmStart` (what :class:`GeometryProbe` passes along a
    trajectory): Lanczos starts from the previous call's extreme Ritz vectors, each moved on along its last
    step by a gain fitted along the trajectory (``WarmStart(extrapolate=False)``: as kept), mixed with a random
    component, and the new ones are kept for the next call; ``warm`` in the result says whether this start
    was warm. With residual bounds (``risk=None``) on a 0.13M-parameter GPT-2 under AdamW, a probe every
    step: 6.5 HVPs per probe against 19.9 cold (CPU, benchmarks/warm_start.py).
    The bounds and ``converged`` mean what they mean for a cold start: the certificate counts only the random
    component (weight ``warm.mix``), so it asks a little more of the run; only the number of HVPs changes.

    ``which="largest"`` (or ``"smallest"``) stops once that end's ``k`` values meet ``tol``: the sharpness
    alone, as edge-of-stability tracking needs, in fewer HVPs. Both ends are still reported with their
    bounds, which stay true; ``converged`` then speaks for the requested end only (the result says ``which``).

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> model = nn.Linear(4, 1, bias=False).double()
    >>> X = torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(4, 1, dtype=torch.float64)))
    >>> out = spectrum(land, tol=1e-8)     # H = 2 X^T X / 4 = diag(0.5, 2, 4.5, 8)
    >>> round(out["lambda_max"], 8), round(out["lambda_min"], 8), out["converged"]
    (8.0, 0.5, True)
    """
    if which not in ("both", "largest", "smallest"):
        raise ConfigurationError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    before = land.hvps
    started_warm = False
    reuse = Reuse(land, "spectrum")
    if getattr(land, "vector_space", None) is not None:
        warm = None  # a warm start keeps whole vectors on the host; a sharded Landscape holds slices
    if warm is None:
        r = run_lanczos(land, k=k, tol=tol, max_iter=max_iter, which=which, seed=seed, generator=generator,
                        bound=bound, basis_device=basis_device, max_basis=max_basis, risk=risk, reuse=reuse,
                        reorth=reorth)
    else:
        r, started_warm = _warm_lanczos(land, warm, reuse, k=k, seed=seed, generator=generator, tol=tol,
                                        max_iter=max_iter, bound=bound, basis_device=basis_device,
                                        max_basis=max_basis, which=which, risk=risk, reorth=reorth)
    out = lanczos_summary(r, k)
    if max_basis is not None:
        out["restarts"] = r.restarts
    out["hvps"] = land.hvps - before  # 0 when another metric of this probe already ran the same Lanczos
    out.update(reuse.fields())  # and then it says which, and what that run cost
    if bound != "residual":
        out["bound"] = bound
    if which != "both":
        out["which"] = which
    if warm is not None:
        out["warm"] = started_warm
        if not started_warm and getattr(warm, "reason", ""):
            out["cold_because"] = warm.reason
    if getattr(land, "sharded", False):
        out["hvp_route"] = land.hvp_method  # which route measured it, in every record
    return out


def forms_later(land: Any, r: LanczosResult) -> bool:
    """Whether a spectrum's Ritz vectors that no warm start keeps wait until a later metric reads them
    (:class:`~geomprobe.metrics.ritz_vectors.LazyRitzPair`): for a model on an accelerator whose basis lies in host
    memory (a lean or host-vector run), where the pass over it crosses the bus or runs on the host and holding
    the basis holds no device memory. A model on the CPU forms them at once: its basis would hold the memory the
    next metric plans with."""
    return (r.basis_blocks is not None and is_host(r.basis_blocks[0])
            and torch.device(getattr(land, "device", "cpu")).type != "cpu")


def _warm_lanczos(land: Any, warm: Any, reuse: Reuse, *, k: int, seed: int, generator: torch.Generator | None,
                  **options: Any) -> tuple[LanczosResult, bool]:
    """Lanczos from ``warm``'s start vector when it has one, else the seeded cold run; keeps the new extreme
    Ritz vectors in ``warm`` for the next probe. Returns the result and whether the start was warm.

    A warm run is never kept as a shared product (its start is not part of any key another metric asks
    for), so a metric asking for the seeded cold run never receives it. A cold run here is that seeded run
    exactly and is stored under its key; when another metric already ran it, it is reused and ``warm``
    keeps its older vectors (still a valid start, as any start is).
    """
    if not (callable(getattr(warm, "start", None)) and callable(getattr(warm, "keep", None))):
        raise ConfigurationError(
            f"warm must be a geomprobe.probe.WarmStart (an object with start() and keep()), got "
            f"{type(warm).__name__}; pass warm=None for a cold start"
        )
    gen = generator or default_generator(seed)
    v0 = warm.start(land, which=options.get("which", "both"), generator=gen, risk=options.get("risk"))
    key = lanczos_key(k=k, tol=options["tol"], max_iter=options["max_iter"], which=options.get("which", "both"),
                      seed=seed, bound=options["bound"], max_basis=options.get("max_basis"), risk=options.get("risk"))
    cacheable = v0 is None and generator is None
    kept = reuse.find(key) if cacheable else None
    if kept is not None:
        return kept, False
    # the start's random part (weight warm.mix, independent of H) is what certifies the extremes
    mark = len(getattr(land, "hvp_errors", ()))
    place = lanczos_placement(land, options.pop("basis_device", None))
    # host vectors: the Ritz vectors' host memory is faulted in beside the products, not at the end; a lean run
    # writes them into its page-locked rows (1.46 s of the 1.1B Llama's first probe went to blocks it never used)
    ahead = ([populated_ahead(k, land.dim, land.dtype) for _ in ("top", "bottom")]
             if torch.device(vector_device(land)).type == "cpu" and not place["lean"] else None)
    r = lanczos(land.hvp, land.dim, k=k, v0=v0, generator=gen, dtype=land.dtype, **place, keep_basis=True,
                v0_random=float(warm.mix) if v0 is not None else 0.0, draw_device=land.device,
                **plan_options(land), **options)
    widen_by_matvec_error(land, r, mark, k, options["tol"], options.get("which", "both"))
    n = len(r.ritz_values)
    hi, lo = list(range(n - 1, max(n - k, 0) - 1, -1)), list(range(min(k, n)))
    # one pass over the basis for both ends, not one per vector; the basis (m vectors of length d) is never kept
    # past the run nor in the cache; page-locked basis rows, else the blocks populated ahead, take the vectors
    out = None if ahead is None else [a if a is None else a[: len(g)] for a, g in zip(ahead, (hi, lo))]
    pair = LazyRitzPair(r, [hi, lo], out)
    serves = getattr(warm, "serves", None)
    keeps = serves is None or serves(options.get("risk"))  # a start that will stay cold needs no copy on the host
    if keeps or not forms_later(land, r):
        top, bottom = pair.vectors()
        if keeps:
            warm.keep(land, top, bottom)
    keep_ritz(land, "top", *r.top(k), pair.end(0))  # the direction metric and views reuse them: no HVP
    keep_ritz(land, "bottom", *r.bottom(k), pair.end(1))
    if cacheable:
        reuse.keep(key, RAW_SPECTRUM, r, r.matvecs)
    return r, v0 is not None
