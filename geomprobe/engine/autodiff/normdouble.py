"""LayerNorm and GELU with a double backward written out in closed form, fused by inductor on CUDA.

torch's double backward of ``layer_norm`` is a composite of about thirty memory-bound kernels: on the H100 it
took 20 of a transformer HVP's 132 ms, ten times the forward's cost. Written as one function of the saved
tensors, the same terms fuse into a few kernels. For a row of width ``D`` with ``x̂ = (x - μ) r``,
``r = (var + eps)^-1/2``, ``g = gy ⊙ w`` and the projection ``P(u) = u - mean(u) - x̂ mean(u ⊙ x̂)`` (symmetric),
the first backward is ``gx = r P(g)``, ``gw = Σ gy ⊙ x̂``, ``gb = Σ gy``; against upstream ``(ggx, ggw, ggb)``:

    q     = r P(ggx)
    d gy  = q ⊙ w + ggw ⊙ x̂ + ggb                    d w = Σ_rows q ⊙ gy
    D̂     = -r (mean(g ⊙ x̂) ggx + mean(ggx ⊙ x̂) g) + gy ⊙ ggw      (explicit derivative in x̂)
    Dr    = ⟨ggx, P(g)⟩ per row                      (explicit derivative in r)
    d x   = r (D̂ - mean(D̂) - x̂ mean(D̂ ⊙ x̂)) - (r² / D) Dr x̂

For ``gelu`` (``y = x Φ(x)``, or its tanh form) ``gx = gy y'(x)``, so ``d gy = ggx y'(x)`` and
``d x = ggx gy y''(x)``. Tests check both against torch's double backward and dense float64 Hessians. Only
tensors on the devices in :data:`DEVICES` (CUDA) take this path: unfused, it is no faster than torch's.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable

import torch

from ...errors import refuse_third_order

__all__ = ["compile_seconds", "gelu_call", "layer_norm_call"]

_aten = torch.ops.aten
# Where these functions replace torch's: the closed form only pays when fused. On the CPU, eager, it measured
# 6 % slower than torch's own double backward on the transformer (benchmarks/RESULTS.md), so the CPU keeps
# torch's path. Tests add "cpu" to check the formulas in float64.
DEVICES = {"cuda"}
_compiled: dict[Callable, Callable | None] = {}
# The first call of a compiled formula for given input shapes compiles it (inductor, static shapes): 13 s of a
# GPT-2 124M bf16 probe's first HVP on an H200 (benchmarks/RESULTS.md section 6, sixth round), once per process
# and shape. Those host seconds are summed here so that a time budget can tell them from what probes cost.
_first_calls: set[tuple] = set()
_compile_seconds = [0.0]


def compile_seconds() -> float:
    """Host seconds spent so far in this process in first calls of compiled double-backward formulas (each
    formula and input signature once): one-time costs, not a probe's recurring ones."""
    return _compile_seconds[0]


def _signature(fn: Callable, args: tuple) -> tuple:
    return (fn, *((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else type(a) for a in args))


def _fused(fn: Callable) -> Callable:
    """``fn`` compiled by inductor for CUDA tensors (static shapes), or ``fn`` itself where compiling fails."""
    if fn not in _compiled:
        try:
            _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
        except Exception:  # noqa: BLE001 - no compiler back end here: the eager formula is exact too
            _compiled[fn] = None
    compiled = _compiled[fn]
    if compiled is None:
        return fn

    def run(*args):
        # Batched tensors (is_grads_batched's vmap) cannot run through a compiled graph: the eager formula
        # batches. Others go in detached: third derivatives are refused anyway, and dynamo would inspect
        # the autograd history.
        if any(_under_transform(a) for a in args):
            return fn(*args)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        key = _signature(fn, args)
        try:
            if key in _first_calls:
                return compiled(*args)
            t0 = time.perf_counter()
            out = compiled(*args)
            _compile_seconds[0] += time.perf_counter() - t0
            _first_calls.add(key)
            return out
        except Exception as e:  # noqa: BLE001 - inductor unavailable (no triton...): fall back once, say why
            _compiled[fn] = None
            warnings.warn(f"fused double backward unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "using the eager formula", RuntimeWarning, stacklevel=2)
            return fn(*args)

    return run


def _under_transform(t: Any) -> bool:
    """Whether ``t`` is a batched tensor (``is_grads_batched`` uses torch's legacy vmap) or another torch.func
    wrapper (a vmap, grad or jvp level)."""
    if not isinstance(t, torch.Tensor):
        return False
    ft = torch._C._functorch
    checks = (getattr(ft, "is_legacy_batchedtensor", None), getattr(ft, "is_functorch_wrapped_tensor", None))
    return any(check is not None and bool(check(t)) for check in checks)


def _kernel(fn: Callable, *tensors: torch.Tensor) -> Callable:
    if tensors[0].dtype in _HALF:
        fn = _in_float32(fn)
    return _fused(fn) if tensors[0].is_cuda else fn


_HALF = (torch.float16, torch.bfloat16)
_float32_forms: dict[Callable, Callable] = {}


def _in_float32(fn: Callable) -> Callable:
    """``fn`` evaluated in float32 on half-precision inputs, each output rounded to the dtype of the input it
    stands for (``fn``'s outputs follow its first tensor inputs in order: ``d gy``, ``d x``, ``d w``).

    torch's own half-precision kernels of these functions accumulate in float32 and round once; evaluating the
    closed form in half would round every intermediate instead. One function per ``fn``, so that the fused
    kernel compiled for it is reused."""
    if fn not in _float32_forms:

        def run(*args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lifted = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a for a in args)
            outs = fn(*lifted)
            return tuple(o.to(t.dtype) for o, t in zip(outs, _output_dtypes(fn, tensors)))

        run.__name__ = f"{fn.__name__}_float32"
        _float32_forms[fn] = run
    return _float32_forms[fn]


def _output_dtypes(fn: Callable, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs whose dtypes the outputs of ``fn`` take: layer norm ``(gy, x, w)``, gelu ``(gy, x)``."""
    if fn is _ln_double_backward:
        return [tensors[0], tensors[1], tensors[4]]
    return [tensors[0], tensors[1]]


# ---------------------------------------------------------------------------------------------- layer norm
def _ln_double_backward(gy, x, mean, rstd, w, ggx, ggw, ggb, D: int):
    """``(d gy, d x, d w)`` of the layer-norm backward; rows flattened to ``(R, D)``, ``mean``/``rstd`` ``(R, 1)``.
    Absent inputs are zero tensors of the right shape (so that one compiled graph serves every call)."""
    xh = (x - mean) * rstd
    g = gy * w
    m_g, m_gx = g.mean(1, keepdim=True), (g * xh).mean(1, keepdim=True)
    m_u, m_ux = ggx.mean(1, keepdim=True), (ggx * xh).mean(1, keepdim=True)
    q = rstd * (ggx - m_u - xh * m_ux)
    dgy = q * w + ggw * xh + ggb
    dw = (q * gy).sum(0)
    dxh = gy * ggw - rstd * (m_gx * ggx + m_ux * g)
    dr = (ggx * (g - m_g - xh * m_gx)).sum(1, keepdim=True)
    dx = rstd * (dxh - dxh.mean(1, keepdim=True) - xh * (dxh * xh).mean(1, keepdim=True)) - (rstd * rstd / D) * dr * xh
    return dgy, dx, dw


class _LayerNormGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, w, b, mean, rstd, shape, mask):
        ctx.shape, ctx.has_w, ctx.has_b = shape, w is not None, b is not None
        ctx.save_for_backward(gy, x, w, mean, rstd)
        return tuple(_aten.native_layer_norm_backward(gy, x, shape, mean, rstd, w, b, mask))

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, w, mean, rstd = ctx.saved_tensors
        refuse_third_order(gy, x, w, ggx, ggw, ggb)
        D = math.prod(ctx.shape)
        R = x.numel() // D
        zeros = lambda: torch.zeros(D, dtype=x.dtype, device=x.device)
        flat = lambda t: t.reshape(R, D)
        dgy, dx, dw = _kernel(_ln_double_backward, x)(
            flat(gy), flat(x), mean.reshape(R, 1), rstd.reshape(R, 1),
            w.reshape(D) if w is not None else torch.ones(D, dtype=x.dtype, device=x.device),
            flat(ggx) if ggx is not None else torch.zeros_like(flat(x)),
            ggw.reshape(D) if ggw is not None else zeros(), ggb.reshape(D) if ggb is not None else zeros(), D,
        )
        need = ctx.needs_input_grad
        return (dgy.reshape(x.shape) if need[0] else None, dx.reshape(x.shape) if need[1] else None,
                dw.reshape(w.shape) if need[2] and w is not None else None, None, None, None, None, None)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, shape, eps):
        y, mean, rstd = _aten.native_layer_norm(x, shape, w, b, eps)
        ctx.shape = shape
        ctx.save_for_backward(x, w, b, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, b, mean, rstd = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:3])
        gx, gw, gb = _LayerNormGrads.apply(gy, x, w, b, mean, rstd, ctx.shape, need)
        return (gx if need[0] else None), (gw if need[1] else None), (gb if need[2] else None), None, None


def layer_norm_call(args: tuple, kwargs: dict) -> Callable[[], torch.Tensor] | None:
    """A closure running ``F.layer_norm(*args, **kwargs)`` through :class:`_LayerNorm`, or None (keep torch's)."""
    bound = {"weight": None, "bias": None, "eps": 1e-5}
    bound.update(zip(("input", "normalized_shape", "weight", "bias", "eps"), args))
    bound.update(kwargs)
    x, w, b = bound.get("input"), bound["weight"], bound["bias"]
    if not _plain(x, w, b) or x.device.type not in DEVICES:
        return None
    shape = [int(s) for s in bound["normalized_shape"]] if not isinstance(bound["normalized_shape"], int) \
        else [int(bound["normalized_shape"])]
    if x.dim() < len(shape) or list(x.shape[x.dim() - len(shape):]) != shape or x.numel() == 0:
        return None
    return lambda: _LayerNorm.apply(x, w, b, shape, float(bound["eps"]))


# ---------------------------------------------------------------------------------------------- gelu
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_C = 0.044715


def _gelu_derivatives(x, tanh: bool):
    if tanh:
        u = _SQRT_2_OVER_PI * (x + _C * x * x * x)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1 + 3 * _C * x * x)
        sech2 = 1 - t * t
        d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du
        d2 = sech2 * (du - x * t * du * du + 3 * _SQRT_2_OVER_PI * _C * x * x)
        return d1, d2
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2.0))))
    return cdf + x * pdf, pdf * (2 - x * x)


def _gelu_double_backward_erf(gy, x, ggx):
    d1, d2 = _gelu_derivatives(x, False)
    return ggx * d1, ggx * gy * d2


def _gelu_double_backward_tanh(gy, x, ggx):
    d1, d2 = _gelu_derivatives(x, True)
    return ggx * d1, ggx * gy * d2


class _GeluGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, approximate: str):
        ctx.approximate = approximate
        ctx.save_for_backward(gy, x)
        return _aten.gelu_backward(gy, x, approximate=approximate)

    @staticmethod
    def backward(ctx, ggx):
        gy, x = ctx.saved_tensors
        refuse_third_order(gy, x, ggx)
        fn = _gelu_double_backward_tanh if ctx.approximate == "tanh" else _gelu_double_backward_erf
        dgy, dx = _kernel(fn, x)(gy, x, ggx)
        need = ctx.needs_input_grad
        return (dgy if need[0] else None), (dx if need[1] else None), None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate: str):
        ctx.approximate = approximate
        ctx.save_for_backward(x)
        return _aten.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        return _GeluGrad.apply(gy, x, ctx.approximate), None


def gelu_call(args: tuple, kwargs: dict) -> Callable[[], torch.Tensor] | None:
    """A closure running ``F.gelu(*args, **kwargs)`` through :class:`_Gelu`, or None (keep torch's path)."""
    bound: dict[str, Any] = {"approximate": "none"}
    bound.update(zip(("input", "approximate"), args))
    bound.update(kwargs)
    x = bound.get("input")
    if not _plain(x) or x.device.type not in DEVICES or bound["approximate"] not in ("none", "tanh"):
        return None
    return lambda: _Gelu.apply(x, bound["approximate"])


def _plain(x: Any, *others: Any) -> bool:
    """Plain floating tensors of one dtype (parameters included), no subclass with its own dispatch. Half
    precisions (bf16, fp16) are taken: their double backward is evaluated in float32 (:func:`_in_float32`)."""
    tensors = [t for t in (x, *others) if t is not None]
    return (isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64, *_HALF)
            and all(isinstance(t, torch.Tensor) and t.dtype == x.dtype for t in tensors)
            and not torch.overrides.has_torch_function(tuple(tensors)))
