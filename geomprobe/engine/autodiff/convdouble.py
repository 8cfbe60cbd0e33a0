"""A convolution whose double backward runs on the same kernels as its first backward.

torch's double backward of a convolution (``_convolution_double_backward``) computes the weight term as a
forward convolution over tensors with batch and channels swapped. On CUDA that shape sends cuDNN to a slow
implicit-GEMM kernel: on ResNet-18 it took half of every Hessian-vector product's time (benchmarks/RESULTS.md).
The same terms are the adjoints of the three maps the first backward already uses. For ``y = conv(x, W) + b``
with ``gx = Dx(gy; W)`` (backward-input) and ``gW = DW(x; gy)`` (backward-weight), the backward of
``(gy, x, W) -> (gx, gW, gb)`` against upstream ``(ggx, ggW, ggb)`` is

    d gy = conv(ggx, W) + conv(x, ggW) + ggb      d x = Dx(gy; ggW)      d W = DW(ggx; gy)

four calls of torch's own forward, backward-input and backward-weight convolutions.
:func:`geomprobe.engine.autodiff.fastdouble.fast_double_backward` routes ``conv1d/2d/3d`` calls made inside it through this
pair of functions; values and first derivatives are torch's own, second derivatives agree with torch's to
rounding (tests compare both against float64 dense Hessians), third derivatives raise.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...errors import refuse_third_order

__all__ = ["conv_call"]

_aten = torch.ops.aten


def _tuple(v: int | Sequence[int], n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(x) for x in v]


class _Config:
    __slots__ = ("stride", "padding", "dilation", "groups", "bias_sizes", "n")

    def __init__(self, n: int, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups):
        self.n = n
        self.stride = _tuple(stride, n)
        self.padding = _tuple(padding, n)
        self.dilation = _tuple(dilation, n)
        self.groups = int(groups)
        self.bias_sizes = [weight.shape[0]] if bias is not None else None

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return _aten.convolution(x, w, b, self.stride, self.padding, self.dilation, False, [0] * self.n, self.groups)

    def backward(self, gy, x, w, mask) -> tuple:
        return _aten.convolution_backward(
            gy, x, w, self.bias_sizes, self.stride, self.padding, self.dilation, False, [0] * self.n,
            self.groups, mask,
        )


class _ConvGrads(torch.autograd.Function):
    """``(gy, x, W) -> (gx, gW, gb)``, the first backward of a convolution, with the fast backward above."""

    @staticmethod
    def forward(ctx, gy, x, w, cfg: _Config, mask: list[bool]):
        ctx.cfg = cfg
        ctx.save_for_backward(gy, x, w)
        return tuple(cfg.backward(gy, x, w, mask))

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, w = ctx.saved_tensors
        refuse_third_order(gy, x, w, ggx, ggw, ggb)
        cfg: _Config = ctx.cfg
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        dgy = dx = dw = None
        if need_gy:
            if ggx is not None:
                dgy = cfg.conv(ggx, w)
            if ggw is not None:
                t = cfg.conv(x, ggw)
                dgy = t if dgy is None else dgy + t
            if ggb is not None:
                t = ggb.reshape((1, -1) + (1,) * cfg.n).expand_as(gy)
                dgy = t if dgy is None else dgy + t
        if need_x and ggw is not None:
            dx = cfg.backward(gy, x, ggw, [True, False, False])[0]
        if need_w and ggx is not None:
            dw = cfg.backward(gy, ggx, w, [False, True, False])[1]
        return dgy, dx, dw, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, cfg: _Config):
        ctx.cfg = cfg
        ctx.save_for_backward(x, w)
        return cfg.conv(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = _ConvGrads.apply(gy, x, w, ctx.cfg, [need_x, need_w, need_b])
        return (gx if need_x else None), (gw if need_w else None), (gb if need_b else None), None


def conv_call(n: int, args: tuple, kwargs: dict) -> Any:
    """A closure running ``torch.conv{n}d(*args, **kwargs)`` through :class:`_Conv`, or None where it cannot
    (string padding, unbatched input, tensor subclasses): those calls keep torch's own path."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    x, w, b = bound.get("input"), bound.get("weight"), bound["bias"]
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or isinstance(bound["padding"], str):
        return None
    if torch.overrides.has_torch_function(tuple(t for t in (x, w, b) if t is not None)):
        return None  # a tensor subclass with its own dispatch keeps torch's path
    if x.dim() != n + 2 or w.dim() != n + 2:
        return None
    cfg = _Config(n, w, b, bound["stride"], bound["padding"], bound["dilation"], bound["groups"])
    return lambda: _Conv.apply(x, w, b, cfg)
