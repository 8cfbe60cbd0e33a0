"""Helpers of the bookkeeping tests (tests/test_metric_bookkeeping.py, tests/test_bookkeeping_shares_noise.py):
blocks of given sizes, gradient rows in blocks, a counter of the ways tensor values reach the host, and a NaN-aware deep equality."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from geomprobe.engine.paramspace import Block


def _Block(name: str, start: int, stop: int) -> Block:
    return Block(name, start, stop, (name,))


class _Rows:
    """Rows of ``X`` in blocks of ``step`` (the last one shorter), the same on every pass: gradient samples as
    ``collect_noise`` reads them."""

    def __init__(self, X, step=16):
        self.X, self.step = X, step

    def __len__(self):
        return self.X.shape[0]

    def __iter__(self):
        for a in range(0, len(self), self.step):
            yield self.X[a : a + self.step]


def _blocks(sizes) -> list[Block]:
    out, at = [], 0
    for j, n in enumerate(sizes):
        out.append(_Block(f"b{j}", at, at + n))
        at += n
    return out


@contextlib.contextmanager
def _spy_tensor_methods(names, record):
    """While open, every call of the ``torch.Tensor`` methods ``names`` first calls ``record(tensor)``."""
    saved = {k: getattr(torch.Tensor, k) for k in names}

    def wrap(f):
        def g(self, *a, **k):
            record(self)
            return f(self, *a, **k)
        return g

    try:
        for k in names:
            setattr(torch.Tensor, k, wrap(saved[k]))
        yield
    finally:
        for k, f in saved.items():
            setattr(torch.Tensor, k, f)


@contextlib.contextmanager
def _count_reads():
    """Counts every way a tensor's values reach the host: ``cpu``, ``item``, ``tolist``, ``float``, ``int``,
    ``bool`` (on a GPU each waits for the device)."""
    calls = {"n": 0}
    with _spy_tensor_methods(("cpu", "item", "tolist", "__float__", "__int__", "__bool__"),
                             lambda t: calls.__setitem__("n", calls["n"] + 1)):
        yield calls


@contextlib.contextmanager
def _count_elements():
    """Every device->host crossing (``cpu``, ``numpy``, ``tolist``, ``item``) with the number of elements it
    carried."""
    sizes: list[int] = []
    with _spy_tensor_methods(("cpu", "numpy", "tolist", "item"), lambda t: sizes.append(t.numel())):
        yield sizes


def _same(a, b) -> bool:
    """Equal, bit for bit, through dicts, lists and arrays (NaN equals NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)
