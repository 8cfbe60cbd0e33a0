"""The context in which a Landscape builds its graph: layers whose torch double backward is slow get their own.

Inside :func:`fast_double_backward`, calls of ``conv1d/2d/3d`` (:mod:`geomprobe.engine.autodiff.convdouble`), on CUDA of
``layer_norm`` and ``gelu`` (:mod:`geomprobe.engine.autodiff.normdouble`), and of ``scaled_dot_product_attention``
(:mod:`geomprobe.engine.autodiff.attndouble`) build autograd functions with the same values and first derivatives as
torch's, and a double backward that costs what the first one does (attention: without keeping its (T x T)
probabilities). Every other call, and any call those functions cannot take (string padding, dropout in
attention, tensor subclasses, autocast), keeps torch's path. Half-precision norms and GELUs take it, their
double backward evaluated in float32.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attndouble import sdpa_call, sdpa_takes
from .convdouble import conv_call
from .normdouble import gelu_call, layer_norm_call

__all__ = ["AttentionCalls", "fast_double_backward", "FAST_OPS", "TANH_GELU_MODULES", "half_reduction_attention", "tanh_gelu_modules"]

_HANDLERS = {
    torch.conv1d: functools.partial(conv_call, 1),
    torch.conv2d: functools.partial(conv_call, 2),
    torch.conv3d: functools.partial(conv_call, 3),
    F.layer_norm: layer_norm_call,
    F.gelu: gelu_call,
    F.scaled_dot_product_attention: sdpa_call,
}
FAST_OPS = ("conv1d", "conv2d", "conv3d", "layer_norm", "gelu", "scaled_dot_product_attention")


@dataclass
class AttentionCalls:
    """``F.scaled_dot_product_attention`` calls seen inside :func:`fast_double_backward` (``seen``), and how many
    of them geomprobe's recomputing double backward takes (``takeable``: taken with ``attention=True``, would be
    taken with ``attention=False``). The memory plan reads them from its measuring forward."""

    seen: int = 0
    takeable: int = 0


class _FastDoubleBackward(TorchFunctionMode):
    def __init__(self, attention: bool = True) -> None:
        super().__init__()
        self.attention = attention
        self.calls = AttentionCalls()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        sdpa = func is F.scaled_dot_product_attention
        if sdpa:
            self.calls.seen += 1
        if _autocast():
            return func(*args, **kwargs)
        if sdpa and not self.attention:
            # torch's path, but counted: whether recomputing attention could shrink this graph
            self.calls.takeable += sdpa_takes(args, kwargs)
            return func(*args, **kwargs)
        call = handler(args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        if sdpa:
            self.calls.takeable += 1
        return call()


def _autocast() -> bool:
    """Whether autocast is on for CPU or CUDA: casts happen below this mode, so saved tensors would not match."""
    try:
        return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


@contextlib.contextmanager
def fast_double_backward(enabled: bool = True, attention: bool = True,
                         model: torch.nn.Module | None = None) -> Iterator[AttentionCalls]:
    """Build graphs whose double backward is fast for the operations in :data:`FAST_OPS` (see the module);
    ``attention=False`` leaves scaled-dot-product attention on torch's path. Yields the
    :class:`AttentionCalls` counted inside (none counted when ``enabled`` is False).

    Two more things hold inside, both for half-precision models (bf16, fp16), neither changing the function:

    * torch's math attention (the kernel with a double backward) runs its products in the inputs' half
      precision with float32 accumulation, as the fused kernels a model trains with do, instead of
      converting every operand to float32: on an H200 the float32 products of GPT-2 124M's attention were a
      third of a bf16 HVP's kernel time (benchmarks/RESULTS.md §6).
    * ``model``'s tanh-GELU modules written as a chain of elementwise operations (Hugging Face's
      ``NewGELUActivation`` and ``FastGELUActivation``, GPT-2's activation) evaluate ``F.gelu(x,
      approximate="tanh")``, the same function in one kernel, so they take the closed-form double backward
      instead of differentiating seven operations twice.
    """
    if not enabled:
        yield AttentionCalls()
        return
    mode = _FastDoubleBackward(attention)
    with mode, half_reduction_attention(), tanh_gelu_modules(model):
        yield mode.calls


# Hugging Face's tanh-approximation GELUs written out elementwise: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
TANH_GELU_MODULES = ("NewGELUActivation", "FastGELUActivation")


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@contextlib.contextmanager
def tanh_gelu_modules(model: torch.nn.Module | None) -> Iterator[None]:
    """Inside, every module of ``model`` whose class is one of :data:`TANH_GELU_MODULES` computes
    ``F.gelu(x, approximate="tanh")``; afterwards each is exactly as found."""
    patched: list[tuple[torch.nn.Module, object]] = []
    if model is not None:
        for m in model.modules():
            if type(m).__name__ in TANH_GELU_MODULES:
                patched.append((m, m.__dict__.get("forward", _ABSENT)))
                m.forward = _tanh_gelu
    try:
        yield
    finally:
        for m, before in patched:
            if before is _ABSENT:
                del m.forward
            else:
                m.forward = before


_ABSENT = object()


@contextlib.contextmanager
def half_reduction_attention() -> Iterator[None]:
    """Inside, torch's math scaled-dot-product attention keeps half-precision operands in half precision
    (``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp``); the setting is restored on exit. float32
    and float64 attention are unaffected. No-op on a torch without the setting."""
    allowed = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    if allowed is None:  # pragma: no cover - torch < 2.5
        yield
        return
    before = allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)
