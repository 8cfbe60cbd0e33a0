"""Trace estimators with a standard error: Hutchinson, Hutch++ (Meyer et al. 2021) and the Krylov-deflated
Hutchinson estimator with a control variate. Pure functions of a symmetric matvec; the deflated estimator
runs :func:`~geomprobe.linalg.lanczos.lanczos` for its subspace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigurationError
from .lanczos import lanczos
from .vectors import Matvec, accumulation_dtype, apply_rows, check_dim, default_generator, rademacher

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace", "deflated_trace"]


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error and the matvecs it cost."""

    trace: float
    trace_err: float
    matvecs: int
    samples: int
    converged: bool = True
    segments: list[tuple[float, float]] | None = None


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    se = float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
    return float(x.mean()), se


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    *,
    samples: int = 64,
    batch: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr H ~ (1/s) sum z^T H z`` with Rademacher ``z``.

    Unbiased; single-probe variance ``2 (||H||_F^2 - sum_i H_ii^2)``. ``trace_err`` is the sample standard
    error over the ``s`` probes. Cost: ``samples`` matvecs in blocks of ``batch``.

    >>> H = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> hutchinson_trace(lambda v: v @ H, 10, samples=8).trace   # exact for a diagonal matrix
    55.0
    """
    check_dim(dim)
    if samples < 2:
        raise ConfigurationError(f"a standard error needs samples >= 2, got {samples}")
    generator = generator or default_generator()
    Z = rademacher((samples, dim), generator, dtype, device)
    q = (Z * apply_rows(matvec, Z, batch)).sum(1, dtype=accumulation_dtype(dtype)).cpu().double()
    t, se = _mean_se(q)
    return TraceEstimate(t, se, samples, samples)


def hutchpp_trace(
    matvec: Matvec,
    dim: int,
    *,
    matvecs: int = 96,
    batch: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace on a sketched range plus Hutchinson on the rest.

    With ``s = matvecs // 3``: ``S`` Rademacher ``(d, s)``, ``Q = orth(H S)``, then
    ``tr H ~ tr(Q^T H Q) + (1/r) sum_j g_j^T (I - QQ^T) H (I - QQ^T) g_j`` with ``r = matvecs - 2s``
    Rademacher ``g_j``. Unbiased; ``trace_err`` is the standard error of the second term (the first is exact
    given Q). Variance O(1/matvecs^2) for spectra with decay, against O(1/matvecs) for Hutchinson.
    """
    check_dim(dim)
    if matvecs < 6:
        raise ConfigurationError(f"hutch++ needs matvecs >= 6, got {matvecs}")
    generator = generator or default_generator()
    s = min(matvecs // 3, dim)
    r = matvecs - 2 * s
    S = rademacher((s, dim), generator, dtype, device)
    Y = apply_rows(matvec, S, batch)
    Q = torch.linalg.qr(Y.T.to(accumulation_dtype(dtype)))[0].to(dtype)  # (d, s); no float64 copy of the sketch
    HQ = apply_rows(matvec, Q.T.contiguous(), batch)   # (s, d)
    t_top = float((Q.T * HQ).sum().double())
    G = rademacher((r, dim), generator, dtype, device)
    G = G - (G @ Q) @ Q.T
    q = (G * apply_rows(matvec, G, batch)).sum(1, dtype=accumulation_dtype(dtype)).cpu().double()
    t_rest, se = _mean_se(q)
    return TraceEstimate(t_top + t_rest, se, 2 * s + r, r)


def _crossfit_control(b: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """``b_j + c diff_j`` with ``c`` fitted on the *other* half of the samples (two-fold cross-fitting).

    ``E[diff] = 0``, so any ``c`` independent of sample ``j`` keeps ``b_j + c diff_j`` unbiased; the ``c`` that
    minimizes its variance is ``-Cov(b, diff) / Var(diff)``. Fitting ``c`` on the samples it is applied to would
    bias the mean by O(1/r); fitting on the other half does not.
    """
    r = b.numel()
    if r < 4:
        return b
    halves = (torch.arange(r) % 2 == 0, torch.arange(r) % 2 == 1)
    out = b.clone()
    for apply, fit in (halves, halves[::-1]):
        bf, df = b[fit], diff[fit]
        var = float(((df - df.mean()) ** 2).sum())
        c = -float(((bf - bf.mean()) * (df - df.mean())).sum()) / var if var > 0 else 0.0
        out[apply] = b[apply] + c * diff[apply]
    return out


def deflated_trace(
    matvec: Matvec,
    dim: int,
    *,
    matvecs: int = 96,
    krylov_steps: int | None = None,
    rel_tol: float = 0.0,
    segments: Sequence[tuple[int, int]] | None = None,
    batch: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Trace by Hutchinson on the part of H left after deflating a Krylov subspace, with a control variate.

    ``k`` Lanczos steps from a random start give an orthonormal basis ``V`` of a Krylov space, which holds
    the extreme eigenvectors (both ends) far better than one randomized sketch, and ``T = V^T H V`` for free.
    With ``P = V V^T``, ``tr H = tr T + tr((I-P) H (I-P))``; the second term is estimated from ``r``
    Rademacher ``z`` as ``b_z = tr T + z^T H z - 2 (V^T z)^T (V^T H z) + (V^T z)^T T (V^T z)``, which needs
    only ``H z`` (no second pass over the sketch, unlike Hutch++). The plain Hutchinson sample
    ``a_z = z^T H z`` comes from the same product, and the estimate averages ``b_z + c (a_z - b_z)`` with
    ``c`` cross-fitted (``E[a_z - b_z] = 0``), so it is never much worse than Hutchinson on the same ``z``:
    exact on a diagonal H, like Hutchinson, and far better where a few eigenvalues carry the Frobenius mass
    (trained networks).

    Unbiased. Single-sample variance at ``c = 0``: ``2 (||R||_F^2 - sum_i R_ii^2)`` with ``R = (I-P) H (I-P)``.
    ``trace_err`` is the sample standard error of the ``r`` combined samples. ``rel_tol > 0`` stops drawing
    ``z`` once ``trace_err <= rel_tol |trace|`` (after at least 8 samples), reporting ``converged``; the
    sequential stop makes the error estimate slightly optimistic, as for any adaptive Monte Carlo stop.

    ``segments``: index ranges ``[start, stop)``; each gets the trace of its diagonal block ``H[s, s]`` by
    plain Hutchinson on the same products (``E[z_s^T (Hz)_s] = tr H[s, s]``), with its standard error, at
    no extra matvec.

    Cost: ``matvecs`` matvecs at most, ``k = krylov_steps`` (default ``matvecs // 3``) of them sequential,
    the rest in blocks of ``batch``; memory ``k d`` for the basis.

    >>> H = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    >>> round(deflated_trace(lambda v: v @ H, 50, matvecs=24).trace, 9)   # exact on a diagonal matrix
    1275.0
    """
    check_dim(dim)
    k = max(1, matvecs // 3) if krylov_steps is None else krylov_steps
    if k < 1 or matvecs - min(k, dim) < 2 or rel_tol < 0:
        raise ConfigurationError(
            f"deflated_trace needs krylov_steps >= 1, matvecs >= krylov_steps + 2 and rel_tol >= 0; "
            f"got matvecs={matvecs}, krylov_steps={k}, rel_tol={rel_tol}"
        )
    generator = generator or default_generator()
    lz = lanczos(matvec, dim, tol=0.0, max_iter=min(k, dim), generator=generator, dtype=dtype, device=device,
                 keep_basis=True, reorth="full")
    V = lz.basis  # (m, d), orthonormal rows: the projection below needs them to rounding, not semi-orthogonal
    m = V.shape[0]
    T = torch.diag(lz.alpha)
    if m > 1:
        T += torch.diag(lz.beta[: m - 1], 1) + torch.diag(lz.beta[: m - 1], -1)
    t_top = float(lz.alpha.sum())
    r_max = matvecs - lz.matvecs
    a_parts: list[torch.Tensor] = []
    b_parts: list[torch.Tensor] = []
    seg_parts: list[torch.Tensor] = []
    for a0, b0 in segments or ():
        if not 0 <= a0 < b0 <= dim:
            raise ConfigurationError(f"segment [{a0}, {b0}) is empty or outside [0, {dim})")
    est = se = float("nan")
    converged = rel_tol == 0
    drawn = 0
    while drawn < r_max:
        n = min(batch, r_max - drawn)
        Z = rademacher((n, dim), generator, dtype, device)
        HZ = matvec(Z).reshape(n, dim)
        drawn += n
        a = (Z * HZ).sum(1, dtype=accumulation_dtype(dtype)).double()
        c = (Z @ V.T).double()
        e = (HZ @ V.T).double()
        a_parts.append(a.cpu())
        if segments:
            seg_parts.append(torch.stack([(Z[:, a0:b0] * HZ[:, a0:b0]).sum(1).double().cpu() for a0, b0 in segments], 1))
        b_parts.append((t_top + a - 2 * (c * e).sum(1) + ((c @ T.to(c.device)) * c).sum(1)).cpu())
        a_all, b_all = torch.cat(a_parts), torch.cat(b_parts)
        est, se = _mean_se(_crossfit_control(b_all, a_all - b_all))
        if rel_tol > 0 and drawn >= 8 and se <= rel_tol * abs(est):
            converged = True
            break
    seg = None
    if segments:
        S = torch.cat(seg_parts)
        seg = [_mean_se(S[:, i]) for i in range(S.shape[1])]
    return TraceEstimate(est, se, lz.matvecs + drawn, drawn, converged, seg)
