"""The context in which a Landscape builds its graph: layers whose torch double backward is slow get their own.

Inside :func:`fast_double_backward`, calls of ``conv1d/2d/3d`` (:mod:`geomprobe.engine.autodiff.convdouble`), on CUDA of
``layer_norm`` and ``gelu`` (:mod:`geomprobe.engine.autodiff.normdouble`), and of ``scaled_dot_product_attention``
(:mod:`geomprobe.engine.autodiff.attndouble`) build autograd functions with the same values and first derivatives as
torch's, and a double backward that costs what the first one does (attention: without keeping its (T x T)
probabilities). Every other call, and any call those functions cannot take (string padding, half-precision
norms, dropout in attention, tensor subclasses, autocast), keeps torch's path.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attndouble import sdpa_call
from .convdouble import conv_call
from .normdouble import gelu_call, layer_norm_call

__all__ = ["fast_double_backward", "FAST_OPS"]

_HANDLERS = {
    torch.conv1d: functools.partial(conv_call, 1),
    torch.conv2d: functools.partial(conv_call, 2),
    torch.conv3d: functools.partial(conv_call, 3),
    F.layer_norm: layer_norm_call,
    F.gelu: gelu_call,
    F.scaled_dot_product_attention: sdpa_call,
}
FAST_OPS = ("conv1d", "conv2d", "conv3d", "layer_norm", "gelu", "scaled_dot_product_attention")


class _FastDoubleBackward(TorchFunctionMode):
    def __init__(self, attention: bool = True) -> None:
        super().__init__()
        self.attention = attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None and not self.attention and func is F.scaled_dot_product_attention:
            handler = None
        if handler is not None and not _autocast():
            call = handler(args, kwargs)
            if call is not None:
                return call()
        return func(*args, **kwargs)


def _autocast() -> bool:
    """Whether autocast is on for CPU or CUDA: casts happen below this mode, so saved tensors would not match."""
    try:
        return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


@contextlib.contextmanager
def fast_double_backward(enabled: bool = True, attention: bool = True) -> Iterator[None]:
    """Build graphs whose double backward is fast for the operations in :data:`FAST_OPS` (see the module);
    ``attention=False`` leaves scaled-dot-product attention on torch's path."""
    if not enabled:
        yield
        return
    with _FastDoubleBackward(attention):
        yield
