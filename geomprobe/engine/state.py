"""The state guard: run a model under a mode policy and hand it back exactly as found.

A probe must change nothing: training with a probe attached is bit-identical to training without it. Every
forward pass geomprobe makes goes through :func:`frozen`, which sets the mode policy, runs attention with
a kernel that has a double backward, isolates the global RNG (seeding it so dropout masks are the same for
every recomputation) and restores training flags and buffers (BatchNorm running statistics) on exit.
geomprobe never writes ``.grad`` (it uses ``torch.autograd.grad``), so gradients need no guarding.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigurationError
from .autodiff.attndouble import user_backends_kept

__all__ = ["MODES", "frozen", "ModelSnapshot", "math_attention", "rng_preserved"]

MODES = ("eval", "train")


class ModelSnapshot:
    """Training flags of a module tree, with every buffer swapped for a private copy until restore.

    The user's buffer tensors are never written: a forward pass inside the guard updates the copies
    (BatchNorm running statistics in train mode), and graphs built inside save the copies. Restoring puts
    the original tensor objects back, untouched, so their values, identity and version counters are as
    found, and no later write can invalidate a graph geomprobe still holds.
    """

    def __init__(self, model: nn.Module):
        self.flags = [(m, m.training) for m in model.modules()]
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        for m in model.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    self.buffers.append((m, name, b))
                    m._buffers[name] = b.detach().clone()

    def restore(self) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, name, b in self.buffers:
            m._buffers[name] = b


def _devices_of(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run scaled-dot-product attention with the math kernel, the one that has a double backward.

    The backends enabled before are remembered: attention that geomprobe's own double backward takes
    (engine/autodiff/attndouble.py) runs torch's fused kernel under them, keeping no (T x T) probabilities."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with user_backends_kept(), sdpa_kernel([SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def frozen(model: nn.Module, mode: str = "eval", *, seed: int | None = 0) -> Iterator[nn.Module]:
    """Context in which ``model`` runs under the mode policy and after which it is exactly as found.

    ``mode="eval"``: dropout off, BatchNorm uses running statistics. ``mode="train"``: BatchNorm uses batch
    statistics, dropout is on with masks fixed by ``seed`` (the same seed gives the same masks, so a graph
    rebuilt later measures the same function). The global RNG (CPU and the model's CUDA devices) is
    restored on exit, as are training flags and buffers.
    """
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    snap = ModelSnapshot(model)
    devices = _devices_of(model)
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            # Seed only the generators fork_rng restores (torch.manual_seed would touch every GPU).
            torch.default_generator.manual_seed(seed)
            for i in devices:
                torch.cuda.default_generators[i].manual_seed(seed)
        model.train(mode == "train")
        try:
            with math_attention():
                yield model
        finally:
            snap.restore()


@contextlib.contextmanager
def rng_preserved(model: nn.Module) -> Iterator[None]:
    """Context after which every global random state is as found: torch's (CPU and the model's CUDA devices),
    Python's ``random`` and numpy's. Data drawing runs inside it: iterating a DataLoader draws its seed from
    torch's global RNG even without shuffling, and a dataset may augment with any of the three."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_devices_of(model)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
