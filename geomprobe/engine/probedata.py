"""Probe data: fixed batches drawn once (seeded), so every probe of a run measures the same function."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigurationError
from .batches import resolve_batches

__all__ = ["draw_probe_batches"]


def draw_probe_batches(
    data: Any, *, samples: int | None = None, max_batches: int | None = None, seed: int = 0
) -> tuple[list[Any], dict]:
    """Fix the probe batches once and describe how they were chosen (for the run's metadata).

    * A DataLoader over a map-style dataset: ``samples`` indices (default: one loader batch, at most 512)
      are drawn without replacement from a generator seeded with ``seed`` and collated with the loader's own
      ``collate_fn`` into batches of its batch size. The indices go into the metadata, so the same data can
      be probed again from a checkpoint.
    * Batches given directly (a pair, a list) are used as they are.
    * Any other iterable: the first ``max_batches`` batches (default 1), read once.

    The user's RNG is never touched: a DataLoader is not iterated (its sampler would draw from the global RNG).
    """
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = len(dataset)
        bs = data.batch_size or 1
        k = samples if samples is not None else min(bs, n, 512)
        if not 1 <= k <= n:
            raise ConfigurationError(f"probe samples must be between 1 and the dataset size {n}, got {k}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:k].sort().values.tolist()
        collate = data.collate_fn
        batches = [collate([dataset[i] for i in idx[s : s + bs]]) for s in range(0, k, bs)]
        return batches, {"source": "dataset", "seed": seed, "indices": idx, "batch_size": bs}
    if samples is not None:
        raise ConfigurationError(
            "probe samples= needs a DataLoader over a map-style dataset to draw from; "
            "pass the batches themselves instead"
        )
    direct = isinstance(data, (tuple, list, dict))
    batches = resolve_batches(data, max_batches if (direct or max_batches) else 1)
    return batches, {"source": "given" if direct else "first_batches", "batches": len(batches)}
