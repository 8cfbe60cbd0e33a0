"""Lanczos with full reorthogonalization: extreme eigenvalues of a symmetric matvec with residual bounds
``|lambda - theta_i| <= beta_m |u_{m,i}|`` (and the sharper gap bounds), a converged flag, and the basis in
fixed blocks that may live off the compute device. Vectors stay in the caller's dtype (float32 accumulation
for half types); only the small scalars and ``T`` are float64, and each step synchronizes with the host once.
With ``max_basis`` below the steps a run may take, :mod:`.restarted_lanczos` runs in bounded memory instead."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import ConfigurationError
from .vectors import (
    HALF_CHUNK_ELEMENTS, Matvec, accumulation_dtype, check_dim, default_generator, gaussian, row_dots, sub_rows,
    vector_norm,
)

__all__ = [
    "LanczosBasis", "LanczosMemory", "LanczosResult", "extremes_converged", "gap_bounds", "krylov_step",
    "lanczos", "lanczos_memory_bytes", "start_vector",
]


# ---------------------------------------------------------------------------------------------- Lanczos
@dataclass
class LanczosResult:
    """Ritz values of ``T_m`` (ascending, float64) with residual bounds ``|lambda - theta_i| <= bounds[i]``.

    ``restarts``: thick restarts of a bounded-memory run (0 for the plain run); ``basis_peak``: the most
    d-vectors the basis held at once. After a restart ``alpha`` is the diagonal of the final projected matrix
    and ``beta`` is empty (it is no longer tridiagonal), ``U`` its eigenvectors.
    """

    ritz_values: torch.Tensor
    bounds: torch.Tensor
    steps: int
    converged: bool
    matvecs: int
    alpha: torch.Tensor
    beta: torch.Tensor
    U: torch.Tensor
    basis: torch.Tensor | None = field(default=None, repr=False)
    asymmetry: float = 0.0
    restarts: int = 0
    basis_peak: int = 0

    def top(self, k: int = 1) -> tuple[list[float], list[float]]:
        """The ``k`` largest Ritz values (descending) and their bounds."""
        idx = list(range(len(self.ritz_values) - 1, max(len(self.ritz_values) - k, 0) - 1, -1))
        return [float(self.ritz_values[i]) for i in idx], [float(self.bounds[i]) for i in idx]

    def bottom(self, k: int = 1) -> tuple[list[float], list[float]]:
        """The ``k`` smallest Ritz values (ascending) and their bounds."""
        idx = list(range(min(k, len(self.ritz_values))))
        return [float(self.ritz_values[i]) for i in idx], [float(self.bounds[i]) for i in idx]

    def ritz_vector(self, i: int) -> torch.Tensor:
        """The unit Ritz vector ``V_m u_i`` of Ritz value ``i`` (negative ``i`` counts from the top).

        Needs ``keep_basis=True``.
        """
        if self.basis is None:
            raise ConfigurationError("Ritz vectors need lanczos(..., keep_basis=True)")
        u = self.U[:, i].to(self.basis.dtype)
        x = u @ self.basis
        return x / x.norm()


def check_lanczos_args(dim: int, k: int, tol: float, which: str, bound: str, max_iter: int | None) -> int:
    """Validate the options shared by the plain and the restarted run; return the step budget ``m_max``."""
    check_dim(dim)
    if which not in ("both", "largest", "smallest"):
        raise ConfigurationError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    if k < 1 or tol < 0:
        raise ConfigurationError(f"need k >= 1 and tol >= 0, got k={k}, tol={tol}")
    if bound not in ("residual", "gap"):
        raise ConfigurationError(f"bound must be 'residual' or 'gap', got {bound!r}")
    m_max = min(dim, max_iter if max_iter is not None else 300)
    if m_max < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}")
    return m_max


def start_vector(dim: int, v0: torch.Tensor | None, generator: torch.Generator | None, dtype: torch.dtype,
                 device) -> torch.Tensor:
    """The unit start vector: ``v0`` normalized, or a Gaussian drawn on ``device`` in ``dtype``."""
    if v0 is None:
        q = gaussian(dim, generator or default_generator(), dtype, device)
    else:
        if v0.shape != (dim,):
            raise ConfigurationError(f"v0 must have shape ({dim},), got {tuple(v0.shape)}")
        q = v0.to(dtype=dtype, device=device if device is not None else v0.device, copy=True)
    qn = vector_norm(q)
    if not bool(torch.isfinite(qn)) or float(qn) == 0:
        raise ConfigurationError("the Lanczos start vector is zero or not finite")
    return q.div_(qn.to(q.dtype))


# DGKS criterion: a second Gram-Schmidt pass only when the first removed more than this share of the norm
# (the new vector was nearly in the span of the basis); after the three-term step that is rare.
REPASS = 1 / math.sqrt(2)


def krylov_step(matvec: Matvec, basis: "LanczosBasis", cur: torch.Tensor, dim: int, dtype: torch.dtype,
                step: int, prev: torch.Tensor | None = None, beta_prev: float = 0.0,
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One expansion of the Krylov basis: ``w = H v`` orthogonalized against every stored vector.

    With ``prev`` (the vector before ``v``, coupled to it by ``beta_prev``) the three-term step
    ``w - alpha v - beta_prev prev`` comes first and one Gram-Schmidt pass over the whole basis removes what
    rounding left (a second pass follows only when the first removed most of the norm, the DGKS criterion);
    without it (the first step, or the first after a restart, where ``v`` couples to every kept vector) two
    passes run (CGS2). Returns ``w`` (unnormalized, on the compute device), the coefficients ``V^T H v``
    (float64, host) and ``beta = ||w||``. One host synchronization: the coefficients and norms travel in one
    small tensor (a second only when the DGKS pass runs). A non-finite matvec shows in them (a NaN or inf
    entry of ``H v`` spreads to the coefficients or the norm), so it is caught without a pass of its own.
    """
    w = matvec(cur).reshape(dim).to(dtype=dtype, copy=True)  # a copy: the matvec may return its input or a buffer
    if prev is None:
        w, coeffs = basis.reorthogonalize(w, passes=2)
        before = None
    else:
        alpha = row_dots(cur[None], w)
        w.sub_(prev, alpha=beta_prev)
        sub_rows(w, alpha, cur[None])
        before = vector_norm(w)
        w, coeffs = basis.reorthogonalize(w, passes=1)
        coeffs[-1] += alpha[0]
        coeffs[-2] += beta_prev
    beta = vector_norm(w)
    extra = [beta.reshape(1)] + ([before.reshape(1)] if before is not None else [])
    packed = torch.cat([coeffs] + [e.to(coeffs.dtype) for e in extra]).cpu().double()
    if not bool(torch.isfinite(packed).all()):
        raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")
    n = coeffs.shape[0]
    coeffs, beta_h = packed[:n], float(packed[n])
    if before is not None and beta_h < REPASS * float(packed[n + 1]):
        w, c2 = basis.reorthogonalize(w, passes=1)
        coeffs = coeffs + c2.cpu().double()
        beta_h = float(vector_norm(w))
    return w, coeffs, beta_h


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
) -> LanczosResult:
    """Lanczos with full reorthogonalization (twice) for the extreme eigenvalues of a symmetric matvec.

    Runs ``v_{j+1} beta_j = H v_j - alpha_j v_j - beta_{j-1} v_{j-1}`` with every earlier vector projected
    out twice (classical Gram-Schmidt as matrix products over the stored basis, which subtracts the
    three-term part too); the tridiagonal ``T_m`` is diagonalized in float64. Each Ritz value ``theta_i``
    carries the residual bound ``beta_m |u_{m,i}|``: some eigenvalue of H lies within it. Iteration stops once the
    ``k`` Ritz values at the requested end(s) (``which`` = ``"both"``, ``"largest"``, ``"smallest"``) have
    bounds below ``tol * max(|theta_i|, theta_max - theta_min)``, on an exact invariant subspace
    (``beta_m ~ 0``), or after ``max_iter`` steps (default ``min(dim, 300)``) with ``converged=False``.

    ``bound="gap"`` replaces each bound ``r_i`` by the quadratic (Kato-Temple) bound ``min(r_i, r_i^2 / g_i)``
    with ``g_i = min_{j != i} (|theta_i - theta_j| - r_j)``, the gap to the other Ritz values less their own
    bounds. A Ritz value's error falls as the square of its residual, so at the same true accuracy the
    iteration stops several steps earlier; the price is an assumption the residual bound does not make, that
    no eigenvalue lies unseen between ``theta_i`` and its neighbours (a Ritz value may still be missing, as
    for any Krylov method). That assumption fails in practice when the top eigenvalues cluster: on a
    6-layer transformer it stopped at a true error of 2.5e-3 for ``tol=1e-3`` (benchmarks/RESULTS.md §2).
    The default ``"residual"`` is SPEC §1's and makes no such assumption.

    ``asymmetry``: ``max_j |(H v_j)^T v_{j-1} - beta_{j-1}|`` relative to a bound on ``||T||``, free evidence
    of the matvec's own error, which the residual bounds do not include: eigenvalues are not known to better
    than about ``asymmetry * ||H||`` however small the bounds. It sees only the asymmetric part of that
    error (float64: ~1e-16; fp32 HVPs on an H100: ~3e-8), not the symmetric part from a forward pass
    rounded to fp32, which is the exact Hessian of a slightly different function.

    Precision: vectors are kept in ``dtype`` and drawn on ``device``; inner products accumulate in float32
    for bf16/fp16 (float64 for float64) without full-length copies; ``alpha``, ``beta`` and ``T`` are
    float64. Each step transfers one small tensor to the host (the coefficients and ``beta``) for the
    stopping test and nothing else.

    Cost: one matvec per step (5-9 steps for an outlying top eigenvalue to 1e-3, 100+ for a bulk edge), plus
    four passes over the stored basis per step (``4 m d`` reads at step ``m``); memory ``m d`` in ``dtype``
    plus two d-vectors (:func:`lanczos_memory_bytes`). ``tol=0`` runs exactly ``max_iter`` steps.
    ``basis_device="cpu"`` keeps the ``m`` basis vectors in (pinned) host memory, so the accelerator holds
    only a few vectors of length ``d``; each step then streams the basis through once (block by block,
    reorthogonalizing twice per block), which costs about ``m d`` bytes of transfer per step.
    ``max_basis``: at most this many basis vectors are stored; when the run may need more steps than that,
    :func:`geomprobe.linalg.restarted_lanczos.restarted_lanczos` runs instead (thick restart, same bounds and
    stopping rule, ``restarts`` counted, more matvecs).

    >>> H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = lanczos(lambda v: v @ H, 100, tol=1e-8)
    >>> round(r.top(1)[0][0], 6), round(r.bottom(1)[0][0], 6), r.converged
    (100.0, 1.0, True)
    """
    m_max = check_lanczos_args(dim, k, tol, which, bound, max_iter)
    if max_basis is not None and (not isinstance(max_basis, int) or max_basis < 1):
        raise ConfigurationError(f"max_basis must be a positive integer or None (no cap), got {max_basis!r}")
    if max_basis is not None and max_basis < m_max:
        from .restarted_lanczos import restarted_lanczos  # the bounded variant builds on this module

        return restarted_lanczos(
            matvec, dim, max_basis=max_basis, k=k, tol=tol, max_iter=max_iter, which=which, v0=v0,
            generator=generator, dtype=dtype, device=device, keep_basis=keep_basis, bound=bound,
            basis_device=basis_device,
        )
    q = start_vector(dim, v0, generator, dtype, device)
    basis = LanczosBasis(dim, dtype, q.device if basis_device is None else torch.device(basis_device), q.device)
    cur = basis.append_normalized(q, 1.0)  # the newest basis vector, on the compute device
    prev = None
    del q
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    theta = U = bounds = None
    asym = 0.0
    for j in range(m_max):
        w, coeffs, beta = krylov_step(matvec, basis, cur, dim, dtype, j + 1, prev, betas[-1] if betas else 0.0)
        alpha = float(coeffs[-1])
        if j > 0:
            # (H v_j)^T v_{j-1} must equal v_j^T H v_{j-1} = beta_{j-1}: the difference is free evidence of
            # the matvec's rounding error (an fp32 HVP through cuDNN can be off by 1e-4 relative)
            asym = max(asym, abs(float(coeffs[-2]) - betas[-1]))
        alphas.append(alpha)
        betas.append(beta)
        last = j + 1 == m_max or j + 1 == dim
        # Gershgorin bound on ||T||: lets a fixed-length run (tol=0, as in SLQ) skip the per-step
        # eigendecomposition and still detect an exhausted Krylov space.
        gersh = max(abs(a) for a in alphas) + 2 * max(betas)
        if tol == 0 and not last and beta > 1e-12 * gersh * math.sqrt(dim):
            prev, cur = cur, basis.append_normalized(w, beta)
            continue
        theta, U = torch.linalg.eigh(tridiagonal(alphas, betas[:-1]))
        bounds = beta * U[-1, :].abs()
        if bound == "gap":
            bounds = gap_bounds(theta, bounds)
        scale = max(float(theta.abs().max()), 1e-300)
        exhausted = beta <= 1e-12 * scale * math.sqrt(dim)
        if exhausted or j + 1 == dim:
            converged = True
            if exhausted:
                bounds = torch.zeros_like(bounds)
            break
        if tol > 0 and extremes_converged(theta, bounds, k, tol, which):
            converged = True
            break
        if j + 1 < m_max:
            prev, cur = cur, basis.append_normalized(w, beta)
    steps = len(alphas)
    return LanczosResult(
        ritz_values=theta,
        bounds=bounds,
        steps=steps,
        converged=converged,
        matvecs=steps,
        alpha=torch.tensor(alphas, dtype=torch.float64),
        beta=torch.tensor(betas, dtype=torch.float64),
        U=U,
        basis=basis.matrix() if keep_basis else None,
        asymmetry=asym / max(max((abs(a) for a in alphas), default=0.0) + 2 * max(betas, default=0.0), 1e-300),
        basis_peak=basis.peak,
    )


def tridiagonal(alphas: list[float], off: list[float]) -> torch.Tensor:
    """The float64 tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``off``."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if off:
        o = torch.tensor(off, dtype=torch.float64)
        T += torch.diag(o, 1) + torch.diag(o, -1)
    return T


class LanczosMemory(NamedTuple):
    """Bytes a Lanczos run holds: on the compute device and, with an offloaded basis, on the host."""

    device: int
    host: int


def lanczos_memory_bytes(dim: int, dtype: torch.dtype, max_basis: int, *, offloaded: bool = False) -> LanczosMemory:
    """The memory a Lanczos run of at most ``max_basis`` stored basis vectors needs beyond the matvec's own.

    The basis (``max_basis`` d-vectors in ``dtype``; without a cap the plain run stores one per step, in
    blocks of ``LanczosBasis.BLOCK``, so pass the step budget rounded up to a block), the new vector and its
    copy during a step (2 d-vectors; 2 more with an offloaded basis), and the float32 scratch of half-precision products or of a restart's
    rotation (``HALF_CHUNK_ELEMENTS`` float32 elements, twice). With ``offloaded=True`` the basis is on the
    host and the device holds ``LanczosBasis.STREAM`` of its vectors at a time.
    """
    check_dim(dim)
    if not isinstance(max_basis, int) or max_basis < 1:
        raise ConfigurationError(f"max_basis must be a positive integer, got {max_basis!r}")
    item = torch.empty(0, dtype=dtype).element_size()
    scratch = 2 * HALF_CHUNK_ELEMENTS * 4
    work = 2 * dim * item + min(scratch, 2 * 4 * dim * (max_basis + 1))
    if offloaded:  # the two newest vectors stay on the device for the three-term step
        work += 2 * dim * item
        return LanczosMemory(device=work + LanczosBasis.STREAM * dim * item, host=max_basis * dim * item)
    return LanczosMemory(device=work + max_basis * dim * item, host=0)


class LanczosBasis:
    """Lanczos vectors stored in fixed blocks: growing never copies (a doubling buffer would need the old and
    the new buffer at once, 3x the basis, which is what runs out first on a 1e8-parameter model).

    ``capacity`` caps the stored vectors (the last block is cut to fit); :meth:`rotate` replaces the basis by
    a few combinations of itself in place, which is how a thick restart stays within the cap.
    """

    BLOCK = 16
    STREAM = 2  # basis vectors on the device at once when the basis is offloaded

    def __init__(self, dim: int, dtype: torch.dtype, device, compute_device=None, capacity: int | None = None):
        self.dim, self.dtype, self.device = dim, dtype, device
        self.compute = compute_device if compute_device is not None else device
        self.offloaded = torch.device(self.compute) != torch.device(device)
        self.pin = self.offloaded and torch.device(device).type == "cpu" and torch.device(self.compute).type == "cuda"
        self.capacity = capacity
        self.blocks: list[torch.Tensor] = []
        self.n = 0
        self.peak = 0

    def append(self, v: torch.Tensor) -> torch.Tensor:
        """Store ``v`` as the next basis vector; return it as it lives on the compute device (a row of a
        block when the basis is there, ``v`` itself when offloaded)."""
        if self.capacity is not None and self.n >= self.capacity:
            raise RuntimeError(f"the Lanczos basis is full ({self.capacity} vectors)")
        b, i = divmod(self.n, self.BLOCK)
        if b == len(self.blocks):
            rows = self.BLOCK if self.capacity is None else min(self.BLOCK, self.capacity - b * self.BLOCK)
            self.blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=self.device,
                                           pin_memory=self.pin))
        row = self.blocks[b][i]
        row.copy_(v, non_blocking=self.pin)
        self.n += 1
        self.peak = max(self.peak, self.n)
        return v if self.offloaded else row

    def append_normalized(self, w: torch.Tensor, beta: float) -> torch.Tensor:
        """Append ``w / beta`` (``w`` is scaled in place, no temporary)."""
        return self.append(w.div_(beta) if beta != 1.0 else w)

    def _filled(self):
        for b, block in enumerate(self.blocks):
            rows = min(block.shape[0], self.n - b * self.BLOCK)
            if rows <= 0:
                break
            yield block[:rows]

    def orthogonalize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w - V V^T w`` in place (classical Gram-Schmidt against every stored vector, one matrix product
        per block for the coefficients and one for the update) and the coefficients ``V^T w``."""
        coeffs = [row_dots(B, w) for B in self._filled()]
        for B, c in zip(self._filled(), coeffs):
            sub_rows(w, c, B)
        return w, torch.cat(coeffs)

    def reorthogonalize(self, w: torch.Tensor, passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """``w`` made orthogonal to every stored vector in place, ``passes`` times over (2: CGS2), and the
        total coefficients of all passes (``V^T w`` to working precision).

        On the compute device: global passes. Offloaded: one pass over the basis, ``STREAM`` vectors at a
        time, each piece brought over once and applied ``passes`` times, so the basis crosses the bus once.
        """
        if not self.offloaded:
            w, total = self.orthogonalize(w)
            for _ in range(passes - 1):
                w, c = self.orthogonalize(w)
                total = total + c
            return w, total
        parts = []
        for B in self._filled():
            # a few vectors at a time: a whole block on the device would be the largest allocation of a
            # memory-bounded probe (16 vectors = 0.7 GB for ResNet-18)
            for s in range(0, B.shape[0], self.STREAM):
                Bc = B[s : s + self.STREAM].to(w.device, non_blocking=self.pin)
                total = None
                for _ in range(passes):
                    c = row_dots(Bc, w)
                    sub_rows(w, c, Bc)
                    total = c if total is None else total + c
                parts.append(total)
        return w, torch.cat(parts)

    def rotate(self, Y: torch.Tensor) -> None:
        """Replace the basis ``V`` (``n`` rows) by the ``l`` rows of ``Y^T V`` for ``Y`` ``(n, l)``, in place.

        Column slices of the basis pass through the compute device (``HALF_CHUNK_ELEMENTS`` float32 elements
        of scratch at most), so no second basis is ever allocated. Cost: ``2 n l d`` flops, no matvec.
        """
        n, l = self.n, Y.shape[1]
        acc = accumulation_dtype(self.dtype)
        Yt = Y.T.to(device=self.compute, dtype=acc)
        blocks = list(self._filled())
        step = max(1, HALF_CHUNK_ELEMENTS // (n + l))
        for s in range(0, self.dim, step):
            X = torch.cat([B[:, s : s + step] for B in blocks]).to(device=self.compute, dtype=acc)
            Z = (Yt @ X).to(self.dtype)
            for b in range(0, l, self.BLOCK):
                rows = Z[b : b + self.BLOCK]
                self.blocks[b // self.BLOCK][: rows.shape[0], s : s + step].copy_(rows)
        self.n = l

    def matrix(self) -> torch.Tensor:
        return torch.cat(list(self._filled()))


def gap_bounds(theta: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Quadratic error bounds ``min(r_i, r_i^2 / g_i)`` of Ritz values ``theta`` (ascending) with residual
    bounds ``r_i``, where ``g_i`` is the gap to the nearest other Ritz value less that value's own bound
    (the residual bound where that gap does not exceed ``r_i``).

    >>> gap_bounds(torch.tensor([1.0, 5.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64))
    tensor([0.0641, 0.0029], dtype=torch.float64)
    """
    n = len(theta)
    if n < 2:
        return bounds
    dist = (theta[:, None] - theta[None, :]).abs() - bounds[None, :]
    dist.fill_diagonal_(float("inf"))
    gap = dist.min(1).values
    refined = torch.where(gap > bounds, bounds**2 / gap.clamp_min(1e-300), bounds)
    return torch.minimum(bounds, refined)


def extremes_converged(theta: torch.Tensor, bounds: torch.Tensor, k: int, tol: float, which: str) -> bool:
    n = len(theta)
    need = 2 * k if which == "both" else k
    if n < need or n < 2:
        return False
    spread = float(theta[-1] - theta[0])
    idx: list[int] = []
    if which in ("both", "smallest"):
        idx += list(range(k))
    if which in ("both", "largest"):
        idx += list(range(n - k, n))
    return all(float(bounds[i]) <= tol * max(abs(float(theta[i])), spread) for i in idx)
