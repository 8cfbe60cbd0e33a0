"""Lanczos in bounded memory: thick restart (Wu & Simon 2000, the symmetric case of Krylov-Schur), holding at
most ``max_basis`` basis vectors however many matvecs the run takes, with residual bounds that stay valid.

The state is a Krylov-Schur decomposition ``H V_p = V_p S_p + v_{p+1} b_p^T`` with ``V_p`` orthonormal and
``S_p`` symmetric: tridiagonal while the run expands like plain Lanczos, arrowhead-plus-tridiagonal after a
restart. Expanding adds ``v_{p+1}`` and ``S_{p+1} = [[S_p, b_p], [b_p^T, alpha]]``; when the basis is full,
the Ritz pairs ``(theta_i, V_p u_i)`` wanted at the requested end(s) replace it (``S = diag(theta)``,
``b_i = beta u_{p,i}``) and expansion continues from the residual direction, which keeps the Krylov space of
the kept Ritz vectors, so nothing the run has learned about the extremes is lost.

Chosen by measurement (tests/test_restarted_lanczos.py's spectra, n = 400, tol = 1e-6, ``which="both"``):
the full basis takes 91-95 matvecs; thick restart 107-125 with 16 stored vectors and 207-380 with 10 (the
worst a tight cluster at the top); Lanczos with no stored basis (three vectors) takes 91-101 steps, but its
bounds are not rigorous once orthogonality is lost, and a valid residual needs the Ritz vector, i.e. a
second pass of as many matvecs (182-202 in all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigurationError
from .certify import DEFAULT_RISK, extreme_errors, rounding_level, start_threshold
from .krylov_basis import LanczosBasis, krylov_step, orthogonalize_step
from .krylov_start import start_basis
from .lean_vectors import lean_step_bytes
from .orthogonality import OrthogonalityEstimate
from .ritz import (
    LanczosResult,
    certificate_limits,
    check_lanczos_args,
    extremes_certified,
    extremes_converged,
    ritz_pairs,
)
from .space import VectorSpace, space_of
from .vectors import Matvec

__all__ = ["min_basis", "restarted_lanczos"]


def min_basis(k: int, which: str) -> int:
    """The smallest ``max_basis`` a restarted run accepts: the ``k`` wanted Ritz vectors at each requested end
    kept through a restart, and room for at least three new Krylov vectors per cycle."""
    return (2 * k if which == "both" else k) + 3


def _kept(p: int, k: int, which: str, keep: float, capacity: int) -> list[int]:
    """Indices (ascending Ritz values) of the Ritz vectors a restart keeps: a ``keep`` share of the basis,
    at least ``k`` per requested end, leaving room for three new vectors."""
    ends = 2 if which == "both" else 1
    total = min(max(ends * k, round(keep * capacity)), capacity - 3)
    per_end = max(k, total // ends)
    if which == "largest":
        return list(range(p - per_end, p))
    if which == "smallest":
        return list(range(per_end))
    return list(range(per_end)) + list(range(p - per_end, p))


@dataclass
class RestartFrom:
    """A plain Lanczos run whose basis is full (:func:`geomprobe.linalg.lanczos.lanczos` with ``max_basis``):
    its stored basis (orthonormal, or semi-orthogonal after partial reorthogonalization), ``cur`` the newest
    vector on the compute device, the tridiagonal's ``alphas`` and ``betas`` (the last the residual's norm
    ``beta``), the residual ``w`` (orthogonal to the whole basis, not stored), the matvecs it took, ``sum log
    beta`` and its asymmetry. ``widen``: ``1 / sqrt(1 - s)`` for a bound ``s`` on ``||V^T V - I||`` of that
    basis, by which every later residual bound widens (any combination of its vectors has a norm of at least
    ``sqrt(1 - s)`` times its coefficients'). ``passes``: the whole-basis passes it took. ``ortho``: its
    orthogonality estimate, when it reorthogonalized partially and not yet at every step: the restarted run
    then goes on partially (its bounds widened by the estimate instead of ``widen``)."""

    basis: LanczosBasis
    cur: torch.Tensor
    alphas: list[float]
    betas: list[float]
    w: torch.Tensor
    beta: float
    matvecs: int
    log_beta: float
    asymmetry: float
    widen: float = 1.0
    passes: int | None = None
    ortho: OrthogonalityEstimate | None = None


def restarted_lanczos(
    matvec: Matvec,
    dim: int,
    *,
    max_basis: int,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "both",
    keep: float = 0.6,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    keep_basis: bool = False,
    bound: str = "residual",
    basis_device: torch.device | str | None = None,
    risk: float | None = DEFAULT_RISK,
    v0_random: float = 0.0,
    space: VectorSpace | None = None,
    resume: RestartFrom | None = None,
    basis_dtype: torch.dtype | None = None,
    draw_device: torch.device | str | None = None,
    lean: bool | str = False,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric matvec by thick-restart Lanczos, storing at most ``max_basis`` vectors.

    Expands like :func:`geomprobe.linalg.lanczos.lanczos` (each new vector orthogonalized against the whole
    stored basis, or, resumed from a partially reorthogonalized run, against its two predecessors and the whole
    basis only at each restart's first step and where the estimate asks: ``resume.ortho``); when
    ``max_basis`` vectors are stored it keeps the Ritz vectors of the ``keep`` share of the basis (0.6 by
    default, split evenly between the two ends for ``which="both"``, never fewer than ``k`` per end) and
    continues from the residual direction ``v_{p+1}``. Bounds: for every reported Ritz value,
    ``|lambda - theta_i| <= ||H y_i - theta_i y_i|| = beta_p |u_{p,i}|`` in the current (restarted) basis,
    exactly as for plain Lanczos, since the decomposition above holds with an orthonormal basis; a
    semi-orthogonal one widens each by its Ritz vector's estimated norm (``widen``, or the estimate's
    :meth:`~.orthogonality.OrthogonalityEstimate.bound_factors`); ``bound="gap"`` refines them as there.
    Stops on the same rule (``tol`` on the ``k`` values at the requested end(s)), on an invariant subspace,
    or after ``max_iter`` matvecs (default ``min(dim, 300)``; unlike the plain run it may exceed ``dim``)
    with ``converged=False``. The extremes are certified by the same rule (``extreme_err``, ``risk``,
    ``v0_random``): the Christoffel sum of :mod:`geomprobe.linalg.certify` carries the Ritz values each
    restart discards.

    ``asymmetry`` compares each measured coupling ``(H v_j)^T v_i`` with the value the decomposition assumes
    (``beta_{j-1}``, or ``b_i`` right after a restart), relative to a bound on ``||S||``.

    Cost: one matvec per step; a restart costs no matvec, ``2 p l d`` flops for the rotation in place (``l``
    kept vectors) and gives up the discarded directions, so a run takes more matvecs than an unbounded one
    (measured in tests/test_restarted_lanczos.py). Memory: ``max_basis`` d-vectors for the basis plus two
    (:func:`geomprobe.linalg.krylov_basis.lanczos_memory_bytes`); the result's ``basis_peak`` never exceeds the cap.
    ``basis_dtype``, ``draw_device``, ``lean``: as :func:`~geomprobe.linalg.lanczos.lanczos`'s (a resumed run keeps
    its basis and drew its start already).
    ``resume``: a plain run that filled its ``max_basis`` vectors (:class:`RestartFrom`); the run restarts from it
    at once (its matvecs counted) instead of from a start vector.

    >>> H = torch.diag(torch.arange(1.0, 401.0, dtype=torch.float64))
    >>> r = restarted_lanczos(lambda v: v @ H, 400, max_basis=12, tol=1e-6, max_iter=2000)
    >>> round(r.top(1)[0][0], 4), round(r.bottom(1)[0][0], 4), r.converged, r.restarts > 0, r.basis_peak
    (400.0, 1.0, True, True, 12)
    """
    check_lanczos_args(dim, k, tol, which, bound, max_iter)
    # restarts may take more matvecs than dim; the run still ends once the basis spans the whole space
    m_max = max_iter if max_iter is not None else min(dim, 300)
    need = min_basis(k, which)
    if not isinstance(max_basis, int) or max_basis < need:
        raise ConfigurationError(
            f"max_basis must be an integer >= {need} for k={k}, which={which!r} (the kept Ritz vectors and "
            f"room to expand); got {max_basis!r}. Give more memory to the basis or ask for fewer values."
        )
    if not 0 < keep < 1:
        raise ConfigurationError(f"keep must lie in (0, 1), the share of the basis kept at a restart; got {keep}")
    log_t = start_threshold(dim, risk, v0 is None, v0_random)
    space = space_of(dim, space)  # a sharded space: slices of every vector, as in the plain run
    prev = None  # set when the newest vector couples to the one before only (a plain Lanczos step)
    beta_prev = 0.0
    S = torch.zeros(0, 0, dtype=torch.float64)
    b = torch.zeros(0, dtype=torch.float64)  # couplings of the newest vector to the earlier ones
    coupled: list[int] = []  # where b is known from the decomposition (the rest is 0 only by symmetry)
    matvecs = restarts = 0
    asym = norm_bound = log_beta = 0.0
    discarded: list[float] = []  # Ritz values dropped at restarts: factors of the residual's polynomial
    errors = (math.inf, math.inf)
    converged = False
    theta = U = bounds = None
    # a run handed over with its orthogonality estimate goes on reorthogonalizing partially: the estimate follows
    # the kept Ritz vectors through each restart and widens every bound by its Ritz vector's estimated norm
    ortho = resume.ortho if resume is not None and resume.ortho is not None and not resume.ortho.always else None
    if ortho is not None:  # passes back to back go to whole-basis steps: selective orthogonalization is not here
        ortho.may_keep, ortho.keep_none_why = False, "the thick restart keeps no Ritz vectors aside"
    widen_by = 1.0 if resume is None or ortho is not None else resume.widen
    if ortho is not None:
        def widen(U: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(ortho.bound_factors(U.numpy()))
    else:
        # a semi-orthogonal basis handed over: every residual bound widens by the same factor (RestartFrom)
        widen = None if widen_by == 1.0 else (lambda U: torch.full((U.shape[1],), widen_by, dtype=torch.float64))

    def resid(beta: float, U: torch.Tensor) -> torch.Tensor:
        r = beta * U[-1, :].abs()
        return r if widen is None else r * widen(U)

    def restart(p: int, w: torch.Tensor, beta: float) -> torch.Tensor:
        # keep the Ritz vectors of the ends, continue from the residual; returns the new newest vector
        nonlocal S, b, coupled, restarts, prev
        kept = _kept(p, k, which, keep, max_basis)
        discarded.extend(float(theta[i]) for i in sorted(set(range(p)) - set(kept)))
        if ortho is not None:
            ortho.restarted(U[:, kept].numpy())
        basis.rotate(U[:, kept])
        S = torch.diag(theta[kept])
        b = beta * U[-1, kept]
        coupled = list(range(len(kept)))
        restarts += 1
        prev = None
        return basis.append_normalized(w, beta)

    if resume is None:
        basis, cur = start_basis(space, v0, generator, dtype, device, basis_dtype=basis_dtype,
                                 basis_device=basis_device, capacity=max_basis, draw_device=draw_device, lean=lean)
    else:
        basis, beta = resume.basis, resume.beta
        matvecs, log_beta, asym = resume.matvecs, resume.log_beta, resume.asymmetry
        S_new = torch.diag(torch.tensor(resume.alphas, dtype=torch.float64))
        off = torch.tensor(resume.betas[:-1], dtype=torch.float64)
        S_new += torch.diag(off, 1) + torch.diag(off, -1)
        norm_bound = float(S_new.abs().sum(1).max()) + beta
        theta, U, bounds, exhausted = ritz_pairs(S_new, beta, bound, dim, widen=widen)
        cur = restart(basis.n, resume.w, beta)
        beta_prev = beta
    while True:
        # partially: a three-term step against its two predecessors alone, and the whole basis only where the
        # estimate asks; the first step after a restart (its vector couples to every kept one) is whole
        local = ortho is not None and not ortho.always and prev is not None
        w, coeffs, beta = krylov_step(matvec, basis, cur, dim, dtype, matvecs + 1, prev, beta_prev, local=local)
        matvecs += 1
        p = basis.n
        alpha = float(coeffs[-1])
        if local:  # the coefficients are the predecessor's and its own: the coupling measured is beta_prev's
            asym = max(asym, abs(float(coeffs[-2]) - float(b[coupled[-1]])))
        elif coupled:
            asym = max(asym, float((coeffs[coupled] - b[coupled]).abs().max()))
        S_new = torch.zeros(p, p, dtype=torch.float64)
        S_new[: p - 1, : p - 1] = S
        S_new[: p - 1, p - 1] = b
        S_new[p - 1, : p - 1] = b
        S_new[p - 1, p - 1] = alpha
        norm_bound = max(norm_bound, float(S_new.abs().sum(1).max()) + beta)
        whole = not local  # w orthogonal to the whole basis
        if local:
            if ortho.advance_projected(S_new.numpy(), beta, beta_prev, norm_bound, asym):
                w, beta = orthogonalize_step(basis, w, beta, matvecs)
                ortho.orthogonalized()
                whole = True
        elif ortho is not None:
            ortho.passed()
        log_beta += math.log(beta) if beta > 0 else -math.inf
        theta, U, bounds, exhausted = ritz_pairs(S_new, beta, bound, dim, widen=widen)
        if exhausted or p == dim:
            converged = True
            break
        if tol > 0 and extremes_converged(theta, bounds, k, tol, which):
            if log_t is None:
                converged = True
                break
            errors = extreme_errors(theta, resid(beta, U), log_beta, log_t, discarded=discarded,
                                    which=which, rounding=rounding_level(dtype, norm_bound),
                                    limits=certificate_limits(theta, tol))
            if extremes_certified(theta, errors, tol, which):
                converged = True
                break
        if matvecs >= m_max:
            break
        if p == max_basis:
            if not whole:  # the restart takes the residual as orthogonal to the whole basis
                w, beta = orthogonalize_step(basis, w, beta, matvecs)
                ortho.full_passes += 1
            cur = restart(p, w, beta)
        else:
            S = S_new
            b = torch.zeros(p, dtype=torch.float64)
            b[-1] = beta
            coupled = [p - 1]
            prev, cur = basis.predecessor(cur), basis.append_normalized(w, beta)
        beta_prev = beta
    if log_t is not None:
        errors = extreme_errors(theta, resid(beta, U), log_beta, log_t, discarded=discarded,
                                exhausted=exhausted or p == dim, rounding=rounding_level(dtype, norm_bound))
    basis.release_work()
    return LanczosResult(
        ritz_values=theta,
        bounds=bounds,
        steps=matvecs,
        converged=converged,
        matvecs=matvecs,
        alpha=torch.diagonal(S_new).clone(),
        beta=torch.zeros(0, dtype=torch.float64) if restarts else torch.diagonal(S_new, 1).clone(),
        U=U,
        basis_blocks=list(basis._filled()) if keep_basis else None,  # no copy: see LanczosResult.basis
        work_room_bytes=lean_step_bytes(basis.dim, basis.dtype.itemsize) if basis.lean else 0,
        asymmetry=asym / max(norm_bound, 1e-300),
        restarts=restarts,
        basis_peak=basis.peak,
        extreme_err=errors,
        risk=None if log_t is None else risk,
        log_beta=log_beta,
        resid=resid(beta, U),
        reorthogonalizations=passes_of(resume, ortho, matvecs),
        reorth_regime=regime_of(resume, ortho),
        discarded=tuple(discarded),
    )


def passes_of(resume: RestartFrom | None, ortho: OrthogonalityEstimate | None, matvecs: int) -> int:
    """The run's whole-basis passes: the estimate's count (the plain run's and the restarted steps'), or every
    restarted step's plus what the plain run before it took."""
    if ortho is not None:
        return ortho.full_passes
    return matvecs if resume is None or resume.passes is None else resume.passes + matvecs - resume.matvecs


def regime_of(resume: RestartFrom | None, ortho: OrthogonalityEstimate | None) -> str:
    """How the run reorthogonalized, for :attr:`LanczosResult.reorth_regime`."""
    if ortho is not None:
        return ("partial until the cap and after it (thick restart)" if not ortho.always
                else f"partial until the cap, then {ortho.regime} (thick restart)")
    if resume is None or resume.passes is None or resume.passes >= resume.matvecs:
        return "full (thick restart)"
    return "partial until the cap, then full (thick restart)"
