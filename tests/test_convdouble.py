"""The fast convolution double backward (geomprobe.engine.autodiff.convdouble) against float64 dense Hessians and torch's own path."""

import pytest
import torch
from reference import dense_hessian
from torch import nn

import geomprobe as gp
from geomprobe.engine.autodiff.fastdouble import fast_double_backward
from geomprobe.errors import UnsupportedOperationError


class ConvNet(nn.Module):
    """Every convolution option the fast path handles: stride, padding, dilation, groups, bias on and off."""

    def __init__(self, dims: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.c1 = conv(2, 4, 3, stride=2, padding=1, bias=True)
        self.c2 = conv(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c3 = conv(4, 2, 1, bias=True, padding_mode="circular")
        self.fc = nn.Linear(2 * 3**dims, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(torch.tanh(self.c3(h)).flatten(1))


def _node_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def fast_and_torch(model, loss_fn, x, y) -> tuple[gp.Landscape, gp.Landscape]:
    """Landscapes of the same model and batch with geomprobe's double backward and with torch's."""
    return gp.Landscape(model, loss_fn, (x, y)), gp.Landscape(model, loss_fn, (x, y), fast_double_backward=False)


def _case(dims: int, seed: int = 0):
    torch.manual_seed(seed)
    model = ConvNet(dims).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 2, *([5] * dims), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_hvp_matches_the_dense_float64_hessian(dims):
    model, loss_fn, x, y = _case(dims)
    H = dense_hessian(model, loss_fn, [(x, y)])
    land = gp.Landscape(model, loss_fn, (x, y))
    V = torch.randn(4, land.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # one vector at a time and as a batched block (is_grads_batched), both to float64 rounding
    for got in (torch.stack([land.hvp(v) for v in V]), land.hvp(V)):
        assert torch.allclose(got, V @ H, rtol=1e-10, atol=1e-12 * float(H.abs().max()))


def test_fast_path_is_used_and_agrees_with_torchs_double_backward():
    model, loss_fn, x, y = _case(2)
    with fast_double_backward():
        out = model(x)
    assert _node_names(out) >= {"_ConvBackward"}  # the fast path was taken
    assert "ConvolutionBackward0" not in _node_names(out)
    fast, slow = fast_and_torch(model, loss_fn, x, y)
    assert torch.equal(fast.grad, slow.grad)  # first derivatives are torch's own kernels
    v = torch.randn(fast.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(fast.hvp(v), slow.hvp(v), rtol=1e-11, atol=1e-14)


def test_third_derivatives_are_refused_not_silently_wrong():
    model, loss_fn, x, y = _case(1)
    params = list(model.parameters())
    with fast_double_backward():
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    with pytest.raises(UnsupportedOperationError, match="third derivatives.*fast_double_backward=False"):
        torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params], create_graph=True)


def test_calls_it_cannot_take_keep_torchs_path():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    same = nn.Conv2d(3, 2, 3, padding="same").double()
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    with fast_double_backward():
        assert type(conv(x).grad_fn).__name__ == "_ConvBackward"
        assert type(same(x).grad_fn).__name__ == "ConvolutionBackward0"  # string padding
        assert type(conv(x[0]).grad_fn).__name__ != "_ConvBackward"  # unbatched input
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert type(conv.float()(x.float()).grad_fn).__name__ != "_ConvBackward"
    with fast_double_backward(enabled=False):
        assert type(nn.Conv2d(3, 2, 3).double()(x).grad_fn).__name__ == "ConvolutionBackward0"


def test_probe_results_unchanged_by_the_fast_path():
    """The spectrum a probe reports is the same to rounding with and without the fast path."""
    model, loss_fn, x, y = _case(2, seed=5)
    fast, slow = fast_and_torch(model, loss_fn, x, y)
    a = gp.linalg.lanczos(fast.hvp, fast.dim, tol=1e-10, dtype=fast.dtype, generator=gp.linalg.default_generator(0))
    b = gp.linalg.lanczos(slow.hvp, slow.dim, tol=1e-10, dtype=slow.dtype, generator=gp.linalg.default_generator(0))
    assert float(a.ritz_values[-1]) == pytest.approx(float(b.ritz_values[-1]), rel=1e-10)
    assert float(a.ritz_values[0]) == pytest.approx(float(b.ritz_values[0]), rel=1e-8, abs=1e-10)


@pytest.mark.gpu
def test_cuda_float32_matches_torchs_path():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, loss_fn, x, y = _case(2)
    fast, slow = fast_and_torch(model.float().cuda(), loss_fn, x.float().cuda(), y.cuda())
    v = torch.randn(fast.dim, device="cuda")
    a, b = fast.hvp(v), slow.hvp(v)
    assert float((a - b).norm() / b.norm()) < 1e-4
