"""The diagonal of a matvec estimated from random probes (Bekas et al. 2007), with per-entry standard errors."""

from __future__ import annotations

import torch

from ..errors import ConfigurationError
from .vectors import Matvec, check_dim, default_generator, rademacher

__all__ = ["bekas_diagonal"]


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
