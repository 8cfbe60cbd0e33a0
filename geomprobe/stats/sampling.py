"""Uniform samples without replacement from ``range(n)`` at a cost of ``O(k)``, not ``O(n)``.

``torch.randperm(n)[:k]`` is the obvious way and costs the whole permutation: 3.5 s on one CPU thread for
GPT-2's token embedding (n = 38.6M) to pick 6 coordinates, and rmed, diagshare and the gradient-noise
coordinates each did it for every block, some twice: about 11 s per pass over GPT-2 124M's 124M coordinates,
the bulk of rmed's 14 s outside its HVPs on an H200 (benchmarks/RESULTS.md section 6, sixth round).

:func:`random_prefix` returns, in distribution, exactly the first ``k`` entries of a uniformly random
permutation: every ordered ``k``-tuple of distinct indices has probability ``(n - k)! / n!``. For ``k`` small
against ``n`` it draws uniform integers, keeps the first occurrence of each in draw order (sequential draws
rejecting repeats), and draws again for what is missing; by symmetry the kept tuple is a uniformly random
ordered sample. Otherwise it takes the permutation, which is then cheap relative to ``k``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigurationError

__all__ = ["random_prefix"]

# Above this share of n the permutation is cheaper than rejection (expected repeats grow like k^2 / 2n).
PERMUTATION_SHARE = 0.25


def random_prefix(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """The first ``k`` of a uniformly random permutation of ``range(n)`` (int64, CPU), drawn from ``generator``.

    Cost: ``O(k)`` expected for ``k <= n / 4`` (a few draws of ``k`` integers and a sort of them), else one
    ``randperm(n)``. Exact in distribution (module docstring); no error to state. The stream of draws differs
    from ``randperm``'s, so the same seed gives a different (equally random) sample than ``randperm(n)[:k]``.
    """
    if not isinstance(n, int) or n < 0 or not isinstance(k, int) or not 0 <= k <= n:
        raise ConfigurationError(f"random_prefix needs integers 0 <= k <= n, got n={n!r}, k={k!r}")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if k > PERMUTATION_SHARE * n:
        return torch.randperm(n, generator=generator)[:k]
    kept = torch.empty(0, dtype=torch.long)
    while kept.numel() < k:
        need = k - kept.numel()
        draws = torch.cat([kept, torch.randint(0, n, (need + need // 4 + 8,), generator=generator)])
        # first occurrence of each value, in draw order: sort stably, mark where a value starts, map back
        values, order = torch.sort(draws, stable=True)
        first = torch.ones_like(values, dtype=torch.bool)
        first[1:] = values[1:] != values[:-1]
        keep_at = torch.sort(order[first]).values
        kept = draws[keep_at]
    return kept[:k]
