"""LayerNorm and GELU with the closed-form double backward (geomprobe.engine.autodiff.normdouble) against float64 references."""

import pytest
import torch
from reference import dense_hessian
from test_convdouble import _node_names, fast_and_torch
from torch import nn

import geomprobe as gp
from geomprobe.engine.autodiff import normdouble
from geomprobe.engine.autodiff.fastdouble import fast_double_backward
from geomprobe.errors import UnsupportedOperationError


@pytest.fixture(autouse=True)
def _on_cpu_too(monkeypatch):
    """The closed forms are used on CUDA only; here they are checked on the CPU in float64."""
    monkeypatch.setattr(normdouble, "DEVICES", {"cpu", "cuda"})


class NormNet(nn.Module):
    """Affine and plain layer norms over one and two trailing dimensions, exact and tanh GELU."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.ln1 = nn.LayerNorm(6)
        self.ln2 = nn.LayerNorm([2, 6], elementwise_affine=False)
        self.ln3 = nn.LayerNorm(6, bias=False)
        self.act1, self.act2 = nn.GELU(), nn.GELU(approximate="tanh")
        self.out = nn.Linear(12, 3)

    def forward(self, x):  # x: (B, 2, 3)
        h = self.act1(self.ln1(self.inp(x)))
        h = self.act2(self.ln2(h) * 1.5 + 0.3)
        return self.out(self.ln3(h).flatten(1))


def _case(seed=0):
    torch.manual_seed(seed)
    model = NormNet().double()
    with torch.no_grad():  # affine parameters away from their (1, 0) initial values
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    x = 2 * torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (7,), generator=g)


def test_hvp_matches_the_dense_float64_hessian():
    model, loss_fn, x, y = _case()
    H = dense_hessian(model, loss_fn, [(x, y)])
    land = gp.Landscape(model, loss_fn, (x, y))
    V = torch.randn(5, land.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tol = 1e-10 * float(H.abs().max())
    assert torch.allclose(land.hvp(V), V @ H, rtol=1e-9, atol=tol)
    assert torch.allclose(torch.stack([land.hvp(v) for v in V]), V @ H, rtol=1e-9, atol=tol)


def test_fast_path_is_taken_and_first_derivatives_are_torchs():
    model, loss_fn, x, y = _case(1)
    with fast_double_backward():
        names = _node_names(model(x))
    assert {"_LayerNormBackward", "_GeluBackward"} <= names
    assert not names & {"NativeLayerNormBackward0", "GeluBackward0"}
    fast, slow = fast_and_torch(model, loss_fn, x, y)
    assert torch.equal(fast.grad, slow.grad)
    v = torch.randn(fast.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(fast.hvp(v), slow.hvp(v), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_second_derivative_in_closed_form(approximate):
    x = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    with fast_double_backward():
        y = nn.functional.gelu(x, approximate=approximate)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    ref = torch.func.vmap(torch.func.grad(torch.func.grad(lambda t: nn.functional.gelu(t, approximate=approximate))))(x.detach())
    assert torch.allclose(d2, ref, rtol=1e-12, atol=1e-13)  # |d2| <= 0.8: rounding of the tanh form


def test_third_derivatives_are_refused():
    model, loss_fn, x, y = _case(2)
    params = list(model.parameters())
    with fast_double_backward():
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    with pytest.raises(UnsupportedOperationError, match="third derivatives"):
        torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params], create_graph=True)


def test_cpu_keeps_torchs_path_by_default(monkeypatch):
    monkeypatch.setattr(normdouble, "DEVICES", {"cuda"})
    x = torch.randn(4, 6)
    with fast_double_backward():
        assert "NativeLayerNormBackward0" in _node_names(nn.LayerNorm(6)(x))
        assert "GeluBackward0" in _node_names(nn.functional.gelu(x.requires_grad_()))


def test_calls_it_cannot_take_keep_torchs_path():
    x = torch.randn(4, 6)
    ln = nn.LayerNorm(6)
    with fast_double_backward():
        assert "NativeLayerNormBackward0" in _node_names(ln(x.bfloat16()))  # mixed: bf16 input, fp32 weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "_LayerNormBackward" not in _node_names(nn.LayerNorm(6)(x))
        assert "_LayerNormBackward" in _node_names(nn.LayerNorm(6)(x))


@pytest.mark.gpu
def test_cuda_fused_kernels_match_torchs_path():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, loss_fn, x, y = _case(3)
    fast, slow = fast_and_torch(model.float().cuda(), loss_fn, x.float().cuda(), y.cuda())
    V = torch.randn(3, fast.dim, device="cuda")
    for v in V:  # the first call compiles; later ones reuse the kernels
        assert float((fast.hvp(v) - slow.hvp(v)).norm() / slow.hvp(v).norm()) < 1e-5


def test_fused_kernels_take_detached_inputs_and_leave_batched_hvps_to_the_eager_formula(monkeypatch):
    """The CUDA route without CUDA: a stand-in for the compiled kernel records what reaches it."""
    seen = []

    def stand_in(fn):
        def compiled(*args):
            seen.append(all(not (isinstance(a, torch.Tensor) and a.requires_grad) for a in args))
            return fn(*args)
        return compiled

    monkeypatch.setattr(normdouble, "_kernel", lambda fn, *t: normdouble._fused(fn))
    monkeypatch.setattr(normdouble, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: stand_in(fn))
    model, loss_fn, x, y = _case(4)
    fast, slow = fast_and_torch(model, loss_fn, x, y)
    V = torch.randn(3, fast.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(fast.hvp(V[0]), slow.hvp(V[0]), rtol=1e-11, atol=1e-13)
    assert seen and all(seen)  # single vectors: through the compiled kernel, detached
    n = len(seen)
    assert torch.allclose(fast.hvp(V), slow.hvp(V), rtol=1e-11, atol=1e-13)
    assert fast.batched_hvp and len(seen) == n  # batched vectors: eager formula, batching kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_takes_the_closed_form_evaluated_in_float32(dtype):
    """bf16/fp16 norms and GELUs take the closed form, evaluated in float32 and rounded once per output: its
    HVP is as close to the float64 HVP of the same rounded weights and inputs as torch's own half path."""
    import copy

    worst = {True: 0.0, False: 0.0}
    for seed in range(3):
        model, loss_fn, x, y = _case(seed)
        half, xh = model.to(dtype), x.to(dtype)
        with fast_double_backward():
            names = _node_names(half(xh))
        assert {"_LayerNormBackward", "_GeluBackward"} <= names
        exact = gp.Landscape(copy.deepcopy(half).double(), loss_fn, (xh.double(), y))
        V = torch.randn(6, exact.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        V = V.to(dtype).double()
        ref = exact.hvp(V)
        for fast in (True, False):
            land = gp.Landscape(half, loss_fn, (xh, y), fast_double_backward=fast)
            assert land.dtype == dtype
            out = land.hvp(V.to(dtype)).double()
            assert out.dtype == torch.float64 and torch.isfinite(out).all()
            err = max(float((o - r).norm() / r.norm()) for o, r in zip(out, ref))
            worst[fast] = max(worst[fast], err)
    # both are limited by the half-precision forward and first backward (measured 1.3-3.1e-2 in bf16)
    assert worst[True] <= 1.1 * worst[False] + 1e-3
    assert worst[True] < (0.06 if dtype == torch.bfloat16 else 0.01)


def test_float32_form_rounds_each_output_to_its_inputs_dtype():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    gy, ggx = torch.randn_like(x), torch.randn_like(x)
    dgy, dx = normdouble._in_float32(normdouble._gelu_double_backward_tanh)(gy, x, ggx)
    assert dgy.dtype == dx.dtype == torch.bfloat16
    ref_gy, ref_x = normdouble._gelu_double_backward_tanh(gy.double(), x.double(), ggx.double())
    assert torch.allclose(dx.double(), ref_x, rtol=1e-2, atol=1e-2)  # one bf16 rounding: 2^-8 relative
    assert torch.allclose(dgy.double(), ref_gy, rtol=1e-2, atol=1e-2)
    assert normdouble._in_float32(normdouble._gelu_double_backward_tanh) is \
        normdouble._in_float32(normdouble._gelu_double_backward_tanh)  # one form per kernel: compiled once
