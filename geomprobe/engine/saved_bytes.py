"""The bytes of a first-order graph: what autograd saves for backward, counted while a graph is built, so the
memory plan knows a probe batch's graph per sample (engine/memory_plan.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["SavedBytes"]


class SavedBytes:
    """Counts bytes of tensors autograd saves (the graph's memory), each storage once, parameters not."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.exclude = {t.data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.seen and t.data_ptr() not in self.exclude:
                self.seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functional wrappers)
            pass
        # Never the tensor itself: a saved output packed as itself refers back to its own grad_fn, a
        # reference cycle through C++ that the garbage collector cannot see, so every graph would leak.
        # Autograd restores the autograd metadata on unpacking; only the data must match.
        return t.detach()

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
