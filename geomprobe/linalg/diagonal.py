"""The diagonal of a matvec estimated from random probes (Bekas et al. 2007), with per-entry standard errors."""

from __future__ import annotations

import torch

from ..errors import ConfigurationError
from .vectors import Matvec, check_dim, default_generator, rademacher

__all__ = ["bekas_diagonal", "packed_diagonal"]


# ---------------------------------------------------------------------------------------------- diagonal
def bekas_diagonal(
    matvec: Matvec,
    dim: int,
    *,
    samples: int = 32,
    batch: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bekas et al. (2007) diagonal estimator ``diag H ~ sum z (.) Hz / sum z (.) z`` with Rademacher ``z``.

    With Rademacher probes ``z (.) z = 1``, so entry i is the mean of ``z_i (Hz)_i``, unbiased with per-probe
    variance ``sum_{j != i} H_ij^2``. Returns ``(diag, diag_err)``, the error being the per-entry standard
    error over the probes. Cost: ``samples`` matvecs. A screening tool: the ratio of two noisy entries is
    biased, so geomprobe recomputes the entries it reports exactly.
    """
    check_dim(dim)
    if samples < 2:
        raise ConfigurationError(f"a standard error needs samples >= 2, got {samples}")
    generator = generator or default_generator()
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    total_sq = torch.zeros(dim, dtype=torch.float64, device=device)
    for s in range(0, samples, batch):
        Z = rademacher((min(batch, samples - s), dim), generator, dtype, device)
        P = (Z * matvec(Z).reshape(Z.shape)).double()
        total += P.sum(0)
        total_sq += (P**2).sum(0)
    mean = total / samples
    var = (total_sq - samples * mean**2).clamp_min(0) / (samples - 1)
    return mean, (var / samples).sqrt()


# ---------------------------------------------------------------------------------------------- packed reads
def packed_diagonal(
    matvec: Matvec,
    dim: int,
    rows: torch.Tensor,
    *,
    signs: int = 2,
    batch: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Many diagonal entries per matvec: ``+-1`` at the coordinates of one row of ``rows``, zero elsewhere.

    ``rows`` is an ``(R, m)`` integer tensor of distinct coordinates per row (``-1`` pads a short row). For a
    row ``S`` and a sign vector ``z`` supported on ``S``, entry ``i in S`` of ``z (.) Hz`` reads

        ``r_i = H_ii + sum_{j in S, j != i} H_ij z_i z_j``

    so each read is contaminated only by the Hessian entries *between the chosen coordinates*, zero in mean
    over the signs, with variance ``sum_{j in S, j != i} H_ij^2``. Every row is read under ``signs``
    independent sign patterns; the returned estimate is the mean of the reads and the error the standard
    error of that mean over the patterns (for ``signs = 2``: ``|r - r'| / 2``, whose law given ``S`` is exactly
    that of the estimate's contamination, since the two contaminations are i.i.d. and symmetric).

    Returns ``(estimate, error)``, both ``(R, m)`` float64 on the CPU (0 at padding). Cost: ``signs * R``
    matvecs, whatever ``m``: one coordinate per parameter block per row reads every block at once.
    """
    check_dim(dim)
    if signs < 2:
        raise ConfigurationError(f"the contamination's spread needs signs >= 2 patterns per row, got {signs}")
    rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.dim() != 2:
        raise ConfigurationError(f"rows must be an (R, m) index tensor, got shape {tuple(rows.shape)}")
    valid = rows >= 0
    if rows.numel() and int(rows.max()) >= dim:
        raise ConfigurationError(f"coordinates must lie in [0, {dim}), got up to {int(rows.max())}")
    generator = generator or default_generator()
    R, m = rows.shape
    reads = torch.zeros(signs, R, m, dtype=torch.float64)
    safe = rows.clamp_min(0)
    per = max(1, batch // signs)  # rows per matvec call, all their sign patterns together
    for s in range(0, R, per):
        idx, ok = safe[s : s + per], valid[s : s + per]
        n = idx.shape[0]
        Z = rademacher((signs, n, m), generator, torch.float64, "cpu") * ok
        V = torch.zeros(signs * n, dim, dtype=dtype, device=device)
        at = (torch.arange(signs * n).repeat_interleave(m).to(V.device), idx.repeat(signs, 1).reshape(-1).to(V.device))
        # accumulate: a padding slot points at coordinate 0 with sign 0 and must not overwrite a real entry there
        V.index_put_(at, Z.reshape(-1).to(dtype=dtype, device=V.device), accumulate=True)
        HV = matvec(V).reshape(signs * n, dim)
        got = HV[at].double().cpu().reshape(signs, n, m)
        reads[:, s : s + n] = got * Z
    est = reads.mean(0)
    err = (reads.var(0, unbiased=True) / signs).sqrt()
    return est * valid, err * valid
