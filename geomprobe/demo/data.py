"""The embedded demo data: scikit-learn's bundled digits (8x8 images, 10 classes), no download."""

from __future__ import annotations

import torch

__all__ = ["load_digits_tensors"]


def load_digits_tensors(*, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(X_train, y_train, X_test, y_test)``: 1797 digits, pixels standardized with training statistics.

    The split is seeded by ``seed`` through a local generator (the global RNG is untouched).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mu, sd = X[train].mean(0), X[train].std(0).clamp_min(1e-3)
    X = ((X - mu) / sd).to(dtype)
    return X[train], y[train], X[test], y[test]
