"""Lanczos with partial or full reorthogonalization: extreme eigenvalues of a symmetric matvec with residual bounds
``|lambda - theta_i| <= beta_m |u_{m,i}|`` (and the sharper gap bounds), a converged flag, and the basis in
fixed blocks that may live off the compute device (:mod:`.krylov_basis`). Vectors stay in the caller's dtype
(float32 accumulation for half types); only the small scalars and ``T`` are float64, and each step
synchronizes with the host once. With ``max_basis`` below the steps a run may take, :mod:`.restarted_lanczos`
runs in bounded memory instead."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigurationError
from .certify import DEFAULT_RISK, extreme_errors, rounding_level, start_threshold
from .delayed_host import delayed_host_due, run_delayed_host
from .delayed_lanczos import delayed_due, run_delayed
from .krylov_basis import (
    LanczosBasis,
    LanczosMemory,
    krylov_step,
    lanczos_memory_bytes,
    orthogonalize_step,
)
from .krylov_start import start_basis
from .lean_vectors import lean_step_bytes
from .measured_reorth import measured_step, sketched_gram
from .orthogonality import REORTH_MODES, SELECTIVE_ENDS, OrthogonalityEstimate
from .restarted_lanczos import RestartFrom, min_basis, restarted_lanczos
from .ritz import (
    LanczosResult,
    certificate_limits,
    check_lanczos_args,
    extremes_certified,
    extremes_converged,
    form_ritz_vectors,
    gap_bounds,
    prefetch_solver,
    ritz_pairs,
)
from .space import VectorSpace, space_of
from .vectors import Matvec, sub_rows

__all__ = [
    "LanczosBasis", "LanczosMemory", "LanczosResult", "extremes_converged", "gap_bounds", "lanczos",
    "lanczos_memory_bytes",
]


def _keep_ritz(basis: LanczosBasis, Uk: torch.Tensor, kept: list[torch.Tensor], w: torch.Tensor,
               ) -> tuple[torch.Tensor, float]:
    """Form the Ritz vectors ``V Uk`` (one pass over the basis, on the compute device), orthonormalize them
    against ``kept`` and each other, append them to ``kept``, and remove their part from ``w`` in place;
    returns ``w`` and its new norm."""
    space = basis.space
    Y = form_ritz_vectors(list(basis._filled()), Uk, basis.compute if basis.offloaded else None)
    for y in Y:
        y = y.to(device=w.device).contiguous()
        for _ in range(2):  # twice is enough
            for q in kept:
                sub_rows(y, space.dots(q[None], y), q[None])
        n = float(space.norm(y))
        if n <= 0.5:  # (nearly) in the span of the kept ones already
            continue
        kept.append(y.div_(n))
        sub_rows(w, space.dots(y[None], w), y[None])
    return w, float(space.norm(w))


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
    max_basis: int | None = None,
    risk: float | None = DEFAULT_RISK,
    v0_random: float = 0.0,
    space: VectorSpace | None = None,
    reorth: str = "partial",
    delayed: bool | str = True,
    selective: bool = True,
    basis_dtype: torch.dtype | None = None,
    draw_device: torch.device | str | None = None,
    lean: bool | str = False,
    sketch: bool | None = None,
) -> LanczosResult:
    """Lanczos with partial (default) or full reorthogonalization for the extreme eigenvalues of a symmetric
    matvec.

    Runs ``v_{j+1} beta_j = H v_j - alpha_j v_j - beta_{j-1} v_{j-1}``, then projects every stored vector out
    of the result by classical Gram-Schmidt as matrix products over the stored blocks (a second pass when
    the first removed most of the norm, the DGKS criterion, as "twice is enough" asks); the tridiagonal ``T_m`` is diagonalized in float64. Each Ritz value ``theta_i``
    carries the residual bound ``beta_m |u_{m,i}|``: some eigenvalue of H lies within it. Iteration stops once the
    ``k`` Ritz values at the requested end(s) (``which`` = ``"both"``, ``"largest"``, ``"smallest"``) have
    bounds below ``tol * max(|theta_i|, theta_max - theta_min)``, on an exact invariant subspace
    (``beta_m ~ 0``), or after ``max_iter`` steps (default ``min(dim, 300)``) with ``converged=False``.

    Extremes: a residual bound does not say the extreme eigenvalue was found (an eigenvector the Krylov
    space has barely seen leaves no residual). With a random start, ``extreme_err`` certifies it with
    probability ``>= 1 - risk`` per end (:mod:`geomprobe.linalg.certify`, no extra matvec), and a run with
    ``tol > 0`` stops only once the certified errors at the requested end(s) also meet ``tol``: a few more
    steps on an isolated eigenvalue, more at a bulk edge. A given ``v0`` certifies only as
    ``v0 = a + v0_random * z`` with ``||a|| <= 1`` and ``z`` a uniformly random unit vector independent of
    ``H`` (the warm start); with ``v0_random=0`` (or ``risk=None``) nothing is certified
    (``extreme_err`` is ``inf``) and the stopping rule is the residual one alone.

    ``bound="gap"`` replaces each bound ``r_i`` by the quadratic (Kato-Temple) bound ``min(r_i, r_i^2 / g_i)``
    with ``g_i = min_{j != i} (|theta_i - theta_j| - r_j)``, the gap to the other Ritz values less their own
    bounds. A Ritz value's error falls as the square of its residual, so at the same true accuracy the
    iteration stops several steps earlier; the price is an assumption the residual bound does not make, that
    no eigenvalue lies unseen between ``theta_i`` and its neighbours (a Ritz value may still be missing, as
    for any Krylov method). That assumption fails in practice when the top eigenvalues cluster: on a
    6-layer transformer it stopped at a true error of 2.5e-3 for ``tol=1e-3`` (benchmarks/RESULTS.md §2).
    The default ``"residual"`` is the one of docs/metrics.md#spectrum and makes no such assumption.

    ``asymmetry``: ``max_j |(H v_j)^T v_{j-1} - beta_{j-1}|`` relative to a bound on ``||T||``, free evidence
    of the matvec's own error, which the residual bounds do not include: eigenvalues are not known to better
    than about ``asymmetry * ||H||`` however small the bounds. It sees only the asymmetric part of that
    error (float64: ~1e-16; fp32 HVPs on an H100: ~3e-8), not the symmetric part from a forward pass
    rounded to fp32, which is the exact Hessian of a slightly different function.

    Precision: vectors are kept in ``dtype`` and drawn on ``device``; inner products accumulate in float32
    for bf16/fp16 (float64 for float64) without full-length copies; ``alpha``, ``beta`` and ``T`` are
    float64. Each step transfers one small tensor to the host (the coefficients and ``beta``) for the
    stopping test and nothing else.

    ``reorth``: ``"full"`` runs the Gram-Schmidt pass over the whole basis at every step; ``"partial"``
    (default, :mod:`.orthogonality`) runs it against the two newest vectors only and adds the whole-basis pass
    at the steps where Simon's estimate of the vectors' inner products passes ``sqrt(eps)`` (and the step
    after). Once such passes come back to back (an eigenvalue far outside the rest has converged, and
    orthogonality leaks along its Ritz vector at every step) the run keeps the converged Ritz vectors at the
    ends on the compute device and removes them from each new vector (selective orthogonalization: Paige's
    theorem puts the loss there), or, where that does not hold (a matvec with its own asymmetric error, half
    precision over few entries, Ritz vectors converging inside the spectrum or more than two at an end),
    orthogonalizes every step against the whole basis: the same Ritz values and bounds to rounding (the residual bounds widened by
    ``1 / sqrt(1 - (m - 1) level)`` for the estimated level of the inner products, at most ~2 % at 100 float32
    steps), at a fraction of the reads. ``result.reorthogonalizations`` counts the whole-basis passes.

    Cost: one matvec per step (5-9 steps for an outlying top eigenvalue to 1e-3, 100+ for a bulk edge), plus,
    with ``reorth="full"``, two reads of the stored basis per step (``2 m d`` at step ``m``; four with a
    second pass), with ``"partial"`` a few reads of three d-vectors per step and that only where due; memory
    ``m d`` in ``dtype`` plus two d-vectors (:func:`~geomprobe.linalg.krylov_basis.lanczos_memory_bytes`). ``tol=0`` runs exactly ``max_iter`` steps.
    ``basis_device="cpu"`` keeps the ``m`` basis vectors in host memory (page-locked for ``reorth="full"``), so the accelerator holds
    only a few vectors of length ``d``; each step then streams the basis through once (block by block,
    each piece applied in place), which costs about ``m d`` bytes of transfer per step.
    ``max_basis``: at most this many basis vectors are stored; when the run may need more steps than that, it
    runs as above (reorthogonalizing as ``reorth`` asks) until the basis is full and
    :func:`geomprobe.linalg.restarted_lanczos.restarted_lanczos` continues from it (thick restart, same stopping
    rule, ``restarts`` counted, more matvecs; a semi-orthogonal basis hands over a residual orthogonal to all of
    it, one pass, and the restarted run goes on reorthogonalizing partially with the same estimate, which
    follows the kept Ritz vectors through each restart and widens the later bounds by the basis's estimated
    departure from orthonormality, ~1e-3 relative at most in float32); with ``tol=0`` the restarted run takes it
    from the start (every step a pass).
    ``delayed``: where every remaining step takes a whole-basis pass over a basis offloaded from a CUDA device
    (from step :data:`~geomprobe.linalg.delayed_lanczos.DELAYED_FROM_STEP` on), each pass runs on a second
    stream beside the next product, which is corrected through the Lanczos relation
    (:mod:`~geomprobe.linalg.delayed_lanczos`: the same tridiagonal to the order of the product's own error, one
    product more per run, :data:`~geomprobe.linalg.delayed_lanczos.DELAYED_EXTRA_VECTORS` more d-vectors on the
    device); ``False`` keeps the passes between the products. ``"host"`` (opt-in, for a matvec that runs on an
    accelerator and takes host vectors) also runs them beside the products where basis and vectors are in host
    memory, on a CPU thread (:mod:`~geomprobe.linalg.delayed_host`, from step
    :data:`~geomprobe.linalg.delayed_host.DELAYED_HOST_FROM_STEP`; four host d-vectors besides the basis;
    measured slower on a 1B bf16 model, whose streamed products need the same host).
    ``basis_dtype``: the type the basis and the working vectors are kept in when wider than ``dtype`` (the
    matvec's type, which still sets every rounding level): float32 for a half-precision model whose vectors live
    in host memory, where the CPU converts half-precision rows chunk by chunk (2.9x the step time of float32 rows
    on a 2-core host; about the same on an H200's 16-core host at 3.5e8 entries, where the 1B Llama's streamed
    products, summed in float32, also came out slower: benchmarks/RESULTS.md section 6, fourteenth round; so
    the metrics do not ask for it). Each stored vector is rounded to ``dtype``'s values
    (:class:`~geomprobe.linalg.krylov_basis.LanczosBasis` ``round_to``), so the matvec reads exactly what is
    stored; the products come back as the matvec gives them (float32 for a host-vector Landscape), and the
    arithmetic between products stays float32. Twice the basis's bytes; the matvec must take such vectors.
    ``selective``: whether the partial regime may keep converged Ritz vectors on the compute device (up to
    :data:`~geomprobe.linalg.orthogonality.SELECTIVE_VECTORS` d-vectors beside the basis); ``False`` (a memory
    plan without room for them) takes whole-basis steps where it would have, with the same Ritz values.
    ``space``: a :class:`~geomprobe.linalg.space.ShardedSpace` when each process holds a slice of every vector
    (a sharded model): ``matvec`` then maps slices to slices, the random start is the same global vector
    whatever the layout, every inner product is reduced over the holders (one small collective per
    Gram-Schmidt pass and norm), and every process takes the same steps. ``dim`` stays the global dimension.

    ``draw_device``: where a random start of host vectors (``device`` the CPU) is drawn when it is an accelerator
    (the host-vector mode passes the model's device): drawn there a piece at a time and written once into the
    basis's first row (:func:`~geomprobe.linalg.krylov_start.start_basis`); reproducible per seed on devices of
    one kind, not the values of the CPU's draw of that seed.

    ``lean``: with the basis in host memory (``basis_device="cpu"``) and the vectors on ``device``, the device
    holds two d-vectors across the run: the newest vector and the next product's output, written through the
    matvec's ``out`` (the two alternate); the previous vector is read back from its stored row after each
    product, a whole-basis pass brings one row at a time, and neither the delayed loop nor selective
    orthogonalization (each keeps more vectors there) runs. The same arithmetic as the offloaded run otherwise.
    For a matvec whose vectors may live on the device but whose memory leaves room for no third d-vector
    beside a product (the host-vector mode's 1B-parameter models: benchmarks/RESULTS.md section 6).
    ``lean="streamed"``: the same, but each product reads its input from the newest vector's stored row (a
    matvec that takes host input, e.g. the host-vector mode's), so the device holds only the product's output
    while it runs; the newest vector's device memory is given back meanwhile and filled again from its row for
    the three-term step. Between products: ``w``, the newest and the previous vector at most, ``w`` and one row
    in a whole-basis pass (:mod:`.lean_vectors`).
    ``sketch`` (None: where the vectors are on an accelerator, whose sketches cost a few milliseconds; on the
    CPU they cost about as much as a product): a run of half-precision vectors with ``tol > 0`` and no delayed
    loop sketches each vector (two ``2^19``-bucket sign sketches at most, on the host: :mod:`.sketched_gram`);
    where the product's asymmetry would send every later step to a whole-basis pass, the inner products are
    then measured instead and a pass runs only when one may exceed ``min(sqrt(asymmetry / ||T||), sqrt(tol / 10))``
    (:mod:`.measured_reorth`; the regime reads "sketched from step ..."; the certified errors include
    ``level^2 ||T||``). Cost: one read of each vector on its device and its random signs, and a few
    milliseconds on the host a step.

    >>> H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = lanczos(lambda v: v @ H, 100, tol=1e-8)
    >>> round(r.top(1)[0][0], 6), round(r.bottom(1)[0][0], 6), r.converged
    (100.0, 1.0, True)
    """
    m_max = check_lanczos_args(dim, k, tol, which, bound, max_iter)
    if reorth not in REORTH_MODES:
        raise ConfigurationError(f"reorth must be one of {REORTH_MODES}, got {reorth!r}")
    if max_basis is not None and (not isinstance(max_basis, int) or max_basis < 1):
        raise ConfigurationError(f"max_basis must be a positive integer or None (no cap), got {max_basis!r}")
    capped = max_basis is not None and max_basis < m_max
    restart_options = {"max_basis": max_basis, "k": k, "tol": tol, "max_iter": max_iter, "which": which, "v0": v0,
                           "generator": generator, "dtype": dtype, "device": device, "keep_basis": keep_basis, "bound": bound,
                           "basis_device": basis_device, "risk": risk, "v0_random": v0_random, "space": space,
                           "basis_dtype": basis_dtype, "draw_device": draw_device, "lean": lean}
    if lean:
        delayed, selective = False, False  # each would hold more d-vectors on the device than a lean run does
    if basis_dtype is not None and (not basis_dtype.is_floating_point
                                    or torch.finfo(basis_dtype).eps > torch.finfo(dtype).eps):
        raise ConfigurationError(f"basis_dtype must be a floating type at least as precise as dtype ({dtype}), got "
                                 f"{basis_dtype}: pass None to keep the basis in {dtype}")
    if basis_dtype not in (None, dtype) and delayed == "host":
        delayed = True  # the host loop writes rows of the matvec's type (delayed_host.py): the plain passes here
    if capped and (tol == 0 or max_basis < min_basis(k, which)):  # (the restarted run names a cap too small)
        return restarted_lanczos(matvec, dim, **restart_options)
    # a capped run (tol > 0) runs the plain loop until its basis is full, and restarts only then: most runs
    # converge before (a GPT-2 124M bf16 spectrum: ~100 steps under a cap of 266), and their passes over an
    # offloaded basis run beside the products. It reorthogonalizes as asked (partially by default: a float32
    # product's run skips most whole-basis passes, which the cap used to force at every step); the hand-over
    # to the restarted loop makes the residual orthogonal to the whole basis first (below)
    limit = max_basis if capped else m_max
    log_t = start_threshold(dim, risk, v0 is None, v0_random)
    prefetch_solver()  # the Ritz problem's solver imported beside the first product
    space = space_of(dim, space)
    # a fixed-length run whose basis is returned (SLQ, the deflated trace) knows its length: one block, no copy
    # a capped run's blocks stop at the cap (whole 16-row blocks would hold up to 15 vectors more than the memory
    # plan counted)
    basis, cur = start_basis(space, v0, generator, dtype, device, basis_dtype=basis_dtype, basis_device=basis_device,
                             capacity=max_basis if capped else (m_max if tol == 0 and keep_basis else None),
                             contiguous=tol == 0 and keep_basis, draw_device=draw_device, lean=lean,
                             rows_limit=limit)
    prev = None  # cur: the newest basis vector, on the compute device
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    theta = U = bounds = None
    asym = log_beta = 0.0
    errors = (math.inf, math.inf)
    ortho = OrthogonalityEstimate(dtype, dim, selective=selective) if reorth == "partial" else None
    # a half-precision product's asymmetry would send the estimate to a whole-basis pass at every step: its
    # vectors' inner products are sketched from the first so that the run can measure them instead
    gram = sketched_gram(ortho, dtype, dim, (cur.device.type != "cpu" if sketch is None else sketch)
                        and not delayed and tol > 0)
    if gram is not None:
        gram.push(cur)
    # Ritz vectors of a semi-orthogonal basis are not quite unit vectors: their residuals widen (orthogonality.py)
    widen = None if ortho is None else (lambda U: torch.from_numpy(ortho.bound_factors(U.numpy())))

    def floor(gersh: float) -> float:
        # the rounding floor of the certified errors, and what a measured run's looser orthogonality adds to it
        return rounding_level(dtype, gersh) + (ortho.semi_floor(gersh) if ortho is not None else 0.0)

    def resid(beta: float, U: torch.Tensor) -> torch.Tensor:
        r = beta * U[-1, :].abs()
        return r if widen is None else r * widen(U)

    kept: list[torch.Tensor] = []  # converged Ritz vectors of the selective regime, on the compute device
    kept_theta: list[float] = []
    extra_matvecs = 0  # products the tridiagonal does not use (the delayed loop's last, a handed-back step's)
    delayed_from = 0  # the step from which whole-basis passes ran beside the products
    exhausted = False

    def settled(beta_m: float, gersh: float) -> bool:
        # the stopping rule on this step's Ritz pairs: an exhausted space, or the extremes within tol (and
        # certified, from a random start); sets the certified errors as it goes
        nonlocal errors
        if exhausted or len(alphas) == dim:
            return True
        if tol > 0 and extremes_converged(theta, bounds, k, tol, which):
            if log_t is None:
                return True
            errors = extreme_errors(theta, resid(beta_m, U), log_beta, log_t, which=which,
                                    rounding=floor(gersh), limits=certificate_limits(theta, tol))
            return extremes_certified(theta, errors, tol, which)
        return False

    def delayed_test(beta_m: float) -> bool:
        # the same rule, for a tridiagonal the delayed loop has just completed (and the step limit)
        nonlocal theta, U, bounds, exhausted, converged, log_beta, beta
        while ortho is not None and ortho.steps < len(alphas):  # every delayed step is a whole-basis pass
            ortho.full_step()
        beta = beta_m
        log_beta = sum(math.log(b) if b > 0 else -math.inf for b in betas)
        theta, U, bounds, exhausted = ritz_pairs((alphas, betas[:-1]), beta_m, bound, dim, widen=widen)
        converged = settled(beta_m, max(abs(a) for a in alphas) + 2 * max(betas))
        return converged or len(alphas) >= limit

    while len(alphas) < limit:
        j = len(alphas)
        partial = ortho is not None and not ortho.always
        selective = partial and ortho.selective
        w, coeffs, beta = krylov_step(matvec, basis, cur, dim, dtype, j + 1, prev, betas[-1] if betas else 0.0,
                                      local=partial, extra=kept if selective else ())
        alpha = float(coeffs[-1])
        if j > 0:
            # (H v_j)^T v_{j-1} must equal v_j^T H v_{j-1} = beta_{j-1}: the difference is free evidence of
            # the matvec's rounding error (an fp32 HVP through cuDNN can be off by 1e-4 relative)
            asym = max(asym, abs(float(coeffs[-2]) - betas[-1]))
        alphas.append(alpha)
        betas.append(beta)
        # Gershgorin bound on ||T||: lets a fixed-length run (tol=0, as in SLQ) skip the per-step
        # eigendecomposition and still detect an exhausted Krylov space.
        gersh = max(abs(a) for a in alphas) + 2 * max(betas)
        if gram is not None and partial and not selective and not ortho.measured and ortho.asymmetric(gersh, asym):
            # the estimate would take the asymmetry with its worst sign at every step and soon ask for a pass at
            # each: measured from the first step that shows it
            ortho.measured, ortho.regime = True, f"sketched from step {j + 1} (the matvec's asymmetry)"
        measured_now = partial and ortho.measured and not selective
        if selective:
            ortho.selective_step()
        elif measured_now:
            w, beta = measured_step(gram, ortho, basis, w, beta, j + 1, ortho.measured_threshold(gersh, asym, tol))
            betas[-1] = beta
        elif partial and ortho.advance(alphas, betas, gersh, asym):
            w, beta = orthogonalize_step(basis, w, beta, j + 1)
            betas[-1] = beta
            ortho.orthogonalized()
        elif ortho is not None and not partial:  # passes came back to back: whole-basis steps from here on
            ortho.full_step()
        pairs = None  # this step's Ritz pairs, once formed
        if ortho is not None and ortho.selective and not ortho.always:
            # the Ritz vectors converged by now join the kept ones and w loses its part along them; one that
            # converged away from the ends (or more than the ends hold) ends the selective regime
            pairs = ritz_pairs((alphas, betas[:-1]), beta, bound, dim, widen=widen)
            th, Uj = pairs[0], pairs[1]
            new, at_ends = ortho.good(th.numpy(), (beta * Uj[-1, :].abs()).numpy(), gersh, kept_theta)
            if new and (not at_ends or len(kept) + len(new) > 2 * SELECTIVE_ENDS):
                ortho.always, ortho.selective = True, False
                why = "a Ritz vector converged inside the spectrum" if not at_ends else "more Ritz vectors than kept"
                ortho.regime += f", whole-basis from step {j + 1} ({why})"
                kept.clear()
                w, beta = orthogonalize_step(basis, w, beta, j + 1)
                betas[-1] = beta
                ortho.full_passes += 1
            elif new:
                w, beta = _keep_ritz(basis, Uj[:, new], kept, w)
                kept_theta += [float(th[i]) for i in new]
                betas[-1] = beta
                ortho.full_passes += 1  # forming them read the basis once
            if new:
                pairs = None  # beta changed: the bounds below are formed again
        if gram is not None and beta > 0:
            gram.push(None if measured_now else w, beta)  # the measured step sketched w already
        log_beta += math.log(beta) if beta > 0 else -math.inf
        last = j + 1 == m_max or j + 1 == dim
        if tol == 0 and not last and beta > 1e-12 * gersh * math.sqrt(dim):
            prev, cur = basis.predecessor(cur), basis.append_normalized(w, beta)
            continue
        if pairs is None:
            pairs = ritz_pairs((alphas, betas[:-1]), beta, bound, dim, widen=widen)
        theta, U, bounds, exhausted = pairs
        if settled(beta, gersh):
            converged = True
            break
        every = ortho is None or ortho.always
        host_loop = delayed == "host" and delayed_host_due(basis, every, j + 1)
        if delayed and j + 1 < limit and tol > 0 and (host_loop or delayed_due(basis, every, j + 1)):
            # every later step takes a whole-basis pass over a basis in host memory: each pass now runs beside
            # the next product (delayed_lanczos.py; on a host thread, delayed_host.py) instead of between two
            loop = run_delayed_host if host_loop else run_delayed
            state = loop(matvec, basis, cur, w, beta, alphas, betas, delayed_test)
            extra_matvecs += state.extra_matvecs
            delayed_from = delayed_from or j + 2
            if state.stop:
                w = state.w
                break
            cur, prev, w, beta = state.cur, state.prev, state.w, state.beta
            j = len(alphas) - 1
        if j + 1 < limit:
            prev, cur = basis.predecessor(cur), basis.append_normalized(w, beta)
    if capped and not converged and len(alphas) < m_max:
        # the basis is full: the thick-restart run continues from this one's decomposition. A semi-orthogonal
        # basis (partial reorthogonalization) hands over a residual orthogonal to all of it (one pass, unless
        # every step took one), so that the kept Ritz vectors' couplings are the decomposition's; their own
        # inner products stay at the estimated level, by which the restarted bounds widen, and the restarted
        # run goes on partially with the same estimate unless every step had come to take a pass
        widen_by = 1.0
        if ortho is not None:
            if not ortho.always:  # (a measured step's residual too: its bounds allowed up to eta)
                w, beta = orthogonalize_step(basis, w, beta, len(alphas))
                betas[-1] = beta
                ortho.full_passes += 1
            spread = ortho.gram_spread(basis.n)
            widen_by = 1.0 / math.sqrt(1.0 - spread) if spread < 0.5 else math.inf
            if ortho.measured:  # the restarted loop has no sketches: whole-basis steps from here, as before
                ortho.always = True
        return restarted_lanczos(matvec, dim, **restart_options, resume=RestartFrom(
            basis=basis, cur=cur, alphas=alphas, betas=betas, w=w, beta=beta, matvecs=len(alphas) + extra_matvecs,
            log_beta=log_beta, asymmetry=asym, widen=widen_by,
            passes=ortho.full_passes if ortho is not None else len(alphas),
            ortho=ortho if ortho is not None and not ortho.always else None))
    steps = len(alphas)
    kept.clear()
    basis.release_work()
    if log_t is not None:
        errors = extreme_errors(theta, resid(beta, U), log_beta, log_t, exhausted=exhausted or steps == dim,
                                rounding=floor(gersh))
    return LanczosResult(
        ritz_values=theta,
        bounds=bounds,
        steps=steps,
        converged=converged,
        matvecs=steps + extra_matvecs,
        alpha=torch.tensor(alphas, dtype=torch.float64),
        beta=torch.tensor(betas, dtype=torch.float64),
        U=U,
        basis_blocks=list(basis._filled()) if keep_basis else None,  # no copy: see LanczosResult.basis
        compute_device=torch.device(basis.compute) if basis.offloaded else None,
        work_room_bytes=lean_step_bytes(basis.dim, basis.dtype.itemsize) if basis.lean else 0,
        asymmetry=asym / max(max((abs(a) for a in alphas), default=0.0) + 2 * max(betas, default=0.0), 1e-300),
        basis_peak=basis.peak,
        extreme_err=errors,
        risk=None if log_t is None else risk,
        log_beta=log_beta,
        resid=resid(beta, U),
        reorthogonalizations=steps if ortho is None else ortho.full_passes,  # delayed steps included
        reorth_regime=("full" if ortho is None else ortho.regime)
        + (f", passes beside the products from step {delayed_from}" if delayed_from else ""),
    )
