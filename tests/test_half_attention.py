"""Half-precision graphs for the double backward: math attention in the inputs' precision, and Hugging Face's
elementwise tanh-GELUs as one ``F.gelu`` (geomprobe.engine.autodiff.fastdouble)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import geomprobe as gp
from geomprobe.engine.autodiff.fastdouble import fast_double_backward, half_reduction_attention, tanh_gelu_modules
from geomprobe.engine.state import math_attention


class _Dtypes(TorchDispatchMode):
    """Records the operand dtypes of every batched product and softmax."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "bmm" in name or "softmax" in name:
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def _attention_dtypes(q: torch.Tensor, **ctx) -> set[torch.dtype]:
    with math_attention(), _Dtypes() as rec:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return {dt for _, dt in rec.seen}


def test_math_attention_keeps_half_operands_inside_and_restores_the_setting():
    q = torch.randn(2, 2, 8, 4, dtype=torch.bfloat16)
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    assert _attention_dtypes(q) == {torch.float32}  # torch's default: every operand converted to float32
    with fast_double_backward():
        assert _attention_dtypes(q) == {torch.bfloat16}
        assert _attention_dtypes(q.float()) == {torch.float32}  # float32 attention unaffected
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == before
    with pytest.raises(RuntimeError, match="boom"), half_reduction_attention():
        raise RuntimeError("boom")
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == before
    with fast_double_backward(enabled=False):
        assert _attention_dtypes(q) == {torch.float32}


class NewGELUActivation(nn.Module):
    """The elementwise form Hugging Face's GPT-2 uses (matched by class name, as in transformers)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Block(nn.Module):
    """Pre-norm self-attention and a GELU MLP, as in GPT-2."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down, self.act = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), NewGELUActivation()
        self.head = nn.Linear(width, 5)

    def forward(self, x):  # (B, T, width)
        B, T, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(W, dim=-1)
        shape = lambda t: t.view(B, T, self.heads, W // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(shape(q), shape(k), shape(v), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, W))
        x = x + self.down(self.act(self.up(self.ln2(x))))
        return self.head(x).mean(1)


def _block(seed):
    torch.manual_seed(seed)
    model = Block()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 12, 8, generator=g)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 5, (6,), generator=g)


def test_tanh_gelu_modules_compute_the_same_function_in_one_call_and_are_restored():
    model, _, x, _ = _block(0)
    model.double()
    h = model.up(model.ln2(x.double()))
    composite = model.act(h)
    with tanh_gelu_modules(model):
        assert model.act.forward is not NewGELUActivation.forward
        fused = model.act(h)
        names = set()
        fn = fused.grad_fn
        while fn is not None and fn.name() not in names:  # the activation's own nodes
            names.add(fn.name())
            fn = fn.next_functions[0][0] if fn.next_functions else None
    assert "GeluBackward0" in names and "PowBackward0" not in names
    assert torch.allclose(fused, composite, rtol=1e-14, atol=1e-15)
    assert "forward" not in model.act.__dict__  # the class's forward again
    own = lambda t: t * 2
    model.act.forward = own
    with tanh_gelu_modules(model):
        pass
    assert model.act.forward is own  # an instance's own forward is put back, not dropped


def test_half_block_hvp_is_as_close_to_float64_as_torchs_half_path():
    """bf16 attention products (float32 accumulation) and the fused GELU: the HVP's error against the float64
    HVP of the same rounded weights and data stays at torch's own bf16 level."""
    worst = {True: 0.0, False: 0.0}
    for seed in range(3):
        model, loss_fn, x, y = _block(seed)
        half, xh = model.bfloat16(), x.bfloat16()
        exact = gp.Landscape(copy.deepcopy(half).double(), loss_fn, (xh.double(), y))
        V = torch.randn(4, exact.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        V = V.bfloat16().double()
        ref = exact.hvp(V)
        for fast in (True, False):
            land = gp.Landscape(half, loss_fn, (xh, y), fast_double_backward=fast)
            out = land.hvp(V.bfloat16()).double()
            worst[fast] = max(worst[fast], max(float((o - r).norm() / r.norm()) for o, r in zip(out, ref)))
    assert worst[True] <= 1.25 * worst[False] + 2e-3
    assert worst[True] < 0.05
    # and the setting is back to torch's default after every build and HVP
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
