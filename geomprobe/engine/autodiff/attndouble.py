"""Scaled-dot-product attention whose double backward recomputes its probabilities tile by tile.

torch's fused attention kernels (flash, memory-efficient, cuDNN, the CPU flash kernel) have no double
backward, so a Landscape used to force the math kernel, whose graph keeps the (T x T) probabilities of every
head: with it the first-order graph of GPT-2 124M at 512 tokens in bf16 measured 1.28 GB per sample, and that of
an 8 x 512 probe batch (10.2 GB) 1.8x the whole training step's peak (benchmarks/RESULTS.md §6). Inside
:func:`~.fastdouble.fast_double_backward`, ``F.scaled_dot_product_attention`` goes through two autograd
Functions instead:

* :class:`_Attention` runs torch's own fused kernel, whichever torch picks under the user's backend settings
  (the Landscape's math-kernel forcing does not reach it), and its first backward is that kernel's backward.
  It keeps ``q, k, v`` (the model's own tensors) and the kernel's output and log-sum-exp.
* :class:`_AttentionGrads`, the first backward made a Function, keeps ``dO`` besides, and its backward, the part
  a Hessian-vector product runs, recomputes ``P`` in tiles of (samples, heads, query rows) whose temporaries
  stay within :data:`~.attnkernels.CHUNK_BYTES` (256 MiB per vector of a batched HVP) and applies the closed
  form of :mod:`.attnkernels`: twelve tile products, float32 for half inputs.

Memory, per layer and sample, ``H`` query heads of dimension ``D`` over ``T`` tokens: the handler keeps
``q, k, v, O, dO`` and the log-sum-exp, ``5 T H D`` elements and ``T H`` floats; the math kernel's graph keeps the
probabilities and, built for double backward, more ``(T x T)`` tensors (three in all measured on the CPU in
float64, ``3 T² H``), besides ``q, k, v``. At GPT-2 124M (``T = 512, D = 64``): 320 elements per token and
head instead of at least 1536 + 192, and the recomputation's transient is bounded whatever ``T``. The cost: an
HVP computes ``P`` again (one more tile product and the softmax) in every attention layer.

Where torch itself would pick its math kernel (float64 on CUDA, head dims no fused kernel takes), the forward
and first backward run blockwise in :mod:`.attnkernels` too, keeping only ``q, k, v`` and ``dO``. Values and first
derivatives are torch's fused kernel's; second derivatives agree with the math kernel's to rounding (tests
against float64 dense Hessians); third derivatives raise. Calls the closed form cannot reproduce exactly keep
torch's path (and the math kernel): dropout, a mask that requires grad, tensor subclasses, torch.func
transforms, autocast, mismatched dtypes or batch shapes, inputs of fewer than three dimensions.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import refuse_third_order
from .attnkernels import Layout, attention_backward, attention_double_backward, attention_forward

__all__ = ["sdpa_call", "sdpa_takes", "user_backends_kept"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_kept = threading.local()


# ---------------------------------------------------------------------------------------------- backends
def _current_backends() -> list | None:
    try:
        from torch.nn.attention import _cur_sdpa_kernel_backends
    except ImportError:  # pragma: no cover - older torch
        return None
    return list(_cur_sdpa_kernel_backends())


@contextlib.contextmanager
def user_backends_kept() -> Iterator[None]:
    """Remember the attention backends enabled now, before a context forces the math kernel: the handler's own
    forward runs under these (see :func:`geomprobe.engine.state.math_attention`)."""
    stack = _kept.__dict__.setdefault("stack", [])
    stack.append(_current_backends())
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def _user_backends() -> Iterator[None]:
    stack = getattr(_kept, "stack", None)
    backends = stack[-1] if stack else None
    if not backends:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends):
        yield


def _fused_choice(q, k, v, mask, causal: bool, scale: float | None, gqa: bool) -> bool:
    """Whether torch would run a fused kernel (not the math one) on these tensors under the user's backends."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:  # pragma: no cover - older torch: the blockwise forward is exact too
        return False
    try:
        with _user_backends():
            choice = int(choose(q, k, v, mask, 0.0, causal, scale=scale, enable_gqa=gqa))
    except (RuntimeError, TypeError):
        return False
    return choice > 0  # -1: no kernel at all, 0: math


# ---------------------------------------------------------------------------------------------- the call
class _Call:
    """One attention call, normalized to 4-d ``(N, H, T, ·)`` tensors and the blockwise :class:`Layout`."""

    __slots__ = ("fused", "gqa", "inner", "layout", "mask4", "mask5", "scale", "shape")

    def __init__(self, q, k, v, mask, causal: bool, scale: float | None, gqa: bool):
        lead, (Hq, Tq, D), (Hk, Tk, Dv) = q.shape[:-3], q.shape[-3:], v.shape[-3:]
        ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        self.layout = Layout(N=math.prod(lead), Hk=Hk, g=Hq // Hk, Tq=Tq, Tk=Tk, D=D, Dv=Dv,
                             scale=1.0 / math.sqrt(D) if scale is None else float(scale), causal=causal,
                             compute_dtype=ct)
        self.shape = q.shape[:-1] + (Dv,)
        self.scale, self.gqa = scale, gqa
        self.mask4 = self.mask5 = None
        if mask is not None:
            m = mask.reshape((1,) * (q.dim() - mask.dim()) + tuple(mask.shape))
            if all(s == 1 for s in m.shape[:-3]):
                m = m.reshape((1,) + tuple(m.shape[-3:]))
            elif len(lead) > 1:  # several batch dimensions, partly broadcast: rare, and a copy at worst
                m = m.expand(*lead, *m.shape[-3:]).reshape((-1,) + tuple(m.shape[-3:]))
            self.mask4 = m
            L = self.layout
            self.mask5 = m.unflatten(1, (L.Hk, L.g)) if m.shape[1] > 1 else m.unsqueeze(1)
        self.fused = False
        self.inner: tuple | None = None

    # Reshapes that leave a shape as it is return the tensor itself: legacy vmap (batched HVPs) has no rule
    # for the alias a no-op reshape makes.
    def four(self, t: torch.Tensor) -> torch.Tensor:
        return _shaped(t, (self.layout.N,) + tuple(t.shape[-3:]))

    def queries5(self, t: torch.Tensor) -> torch.Tensor:
        L = self.layout
        return _shaped(t, (L.N, L.Hk, L.g, L.Tq, t.shape[-1]))


def _shaped(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    return t if tuple(t.shape) == tuple(shape) else t.reshape(shape)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, call: _Call):
        L = call.layout
        if call.fused:
            with torch.enable_grad(), _user_backends():
                inputs = tuple(call.four(t).detach().requires_grad_() for t in (q, k, v))
                out = F.scaled_dot_product_attention(*inputs, attn_mask=call.mask4, dropout_p=0.0,
                                                     is_causal=L.causal, scale=call.scale, enable_gqa=call.gqa)
            # The fused kernel's own graph (it keeps q, k, v, its output and log-sum-exp): the first backward
            call.inner = (out, inputs)
            result = out.detach().reshape(call.shape)
        else:
            o = attention_forward(L, call.queries5(q), call.four(k), call.four(v), call.mask5)
            result = o.to(q.dtype).reshape(call.shape)
        ctx.call = call
        ctx.save_for_backward(q, k, v, mask)
        return result

    @staticmethod
    def backward(ctx, dO):
        q, k, v, mask = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        dq, dk, dv = _AttentionGrads.apply(dO, q, k, v, mask, ctx.call, need)
        return dq, dk, dv, None, None


class _AttentionGrads(torch.autograd.Function):
    """``(dO, q, k, v) -> (dq, dk, dv)``, the first backward, with the blockwise double backward."""

    @staticmethod
    def forward(ctx, dO, q, k, v, mask, call: _Call, need: tuple):
        ctx.call = call
        ctx.save_for_backward(dO, q, k, v, mask)
        if call.inner is not None:
            out, inputs = call.inner
            wanted = [t for t, n in zip(inputs, need) if n]
            with torch.enable_grad():
                got = iter(torch.autograd.grad(out, wanted, dO.reshape(out.shape), retain_graph=True))
            grads = [next(got) if n else None for n in need]
        else:
            L = call.layout
            dq, dk, dv = attention_backward(L, call.queries5(q), call.four(k), call.four(v), call.mask5,
                                            call.queries5(dO))
            grads = [dq, dk, dv]
        return tuple(g.to(t.dtype).reshape(t.shape) if g is not None and n else None
                     for g, t, n in zip(grads, (q, k, v), need))

    @staticmethod
    def backward(ctx, gq, gk, gv):
        dO, q, k, v, _ = ctx.saved_tensors  # the mask is saved for the graph's byte count; call.mask5 views it
        refuse_third_order(dO, q, k, v, gq, gk, gv)
        call: _Call = ctx.call
        L = call.layout
        # Cotangents of outputs that were not computed (None) are zeros; autograd materializes the others.
        gq = torch.zeros_like(q) if gq is None else gq
        gk = torch.zeros_like(k) if gk is None else gk
        gv = torch.zeros_like(v) if gv is None else gv
        d_dO, d_q, d_k, d_v = attention_double_backward(
            L, call.queries5(q), call.four(k), call.four(v), call.mask5, call.queries5(dO),
            call.queries5(gq), call.four(gk), call.four(gv),
        )
        need = ctx.needs_input_grad
        out = [_shaped(d.to(t.dtype), t.shape) if n else None
               for d, t, n in zip((d_dO, d_q, d_k, d_v), (dO, q, k, v), need[:4])]
        return (*out, None, None, None)


# ---------------------------------------------------------------------------------------------- the handler
def _under_transform(t: torch.Tensor) -> bool:
    ft = torch._C._functorch
    checks = (getattr(ft, "is_legacy_batchedtensor", None), getattr(ft, "is_functorch_wrapped_tensor", None))
    return any(check is not None and bool(check(t)) for check in checks)


def _bind(args: tuple, kwargs: dict) -> tuple | None:
    """``(q, k, v, mask, causal, scale, gqa)`` of an ``F.scaled_dot_product_attention`` call the closed form
    reproduces exactly, or None for a call it cannot take (see the module). Builds nothing, calls no kernel."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                             "enable_gqa": False}
    bound.update(zip(names, args))
    bound.update(kwargs)
    if set(bound) - set(names):
        return None
    q, k, v, mask = bound.get("query"), bound.get("key"), bound.get("value"), bound["attn_mask"]
    tensors = [t for t in (q, k, v, mask) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or torch.overrides.has_torch_function(tuple(tensors)):
        return None
    if (not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v))
            or any(_under_transform(t) for t in tensors)):
        return None  # nothing to differentiate, or a torch.func transform that a Function cannot join
    if float(bound["dropout_p"]) != 0.0 or not isinstance(bound["is_causal"], bool):
        return None
    causal, gqa, scale = bound["is_causal"], bool(bound["enable_gqa"]), bound["scale"]
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype or len({t.device for t in tensors}) > 1:
        return None
    if q.dim() < 3 or not q.dim() == k.dim() == v.dim() or not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        return None
    (Hq, _, D), (Hk, Tk, Dk), (Hv, Tv, _) = q.shape[-3:], k.shape[-3:], v.shape[-3:]
    if Dk != D or (Hv, Tv) != (Hk, Tk) or q.numel() == 0 or k.numel() == 0 or v.shape[-1] == 0:
        return None
    if Hq != Hk and not (gqa and Hq % Hk == 0):
        return None
    if mask is not None:
        if causal or mask.requires_grad or mask.dim() > q.dim() or (mask.dtype != torch.bool and mask.dtype != q.dtype):
            return None
        try:
            if torch.broadcast_shapes(mask.shape, q.shape[:-1] + (Tk,)) != q.shape[:-1] + (Tk,):
                return None
        except RuntimeError:
            return None
    return q, k, v, mask, causal, scale, gqa


def sdpa_takes(args: tuple, kwargs: dict) -> bool:
    """Whether :func:`sdpa_call` would take this call (no closure built, no kernel asked): the memory plan
    counts such calls in its measuring forward to know whether recomputing attention can shrink the graph."""
    return _bind(args, kwargs) is not None


def sdpa_call(args: tuple, kwargs: dict) -> Callable[[], torch.Tensor] | None:
    """A closure running ``F.scaled_dot_product_attention(*args, **kwargs)`` through :class:`_Attention`, or
    None where the closed form cannot reproduce the call exactly (see the module): torch's path then."""
    bound = _bind(args, kwargs)
    if bound is None:
        return None
    q, k, v, mask, causal, scale, gqa = bound
    call = _Call(q, k, v, mask, causal, scale, gqa)
    probe = [call.four(t).detach().requires_grad_() for t in (q, k, v)]
    call.fused = _fused_choice(*probe, call.mask4, causal, scale, gqa)
    return lambda: _Attention.apply(q, k, v, mask, call)
