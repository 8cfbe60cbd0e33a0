"""A custom autograd Function whose backward leaves autograd is refused by name (issue 18, item 9); models whose
second derivatives are genuinely zero somewhere (piecewise-linear layers, a linear last layer, a hand-written
ReLU) are accepted and give the exact Hessian of the dense float64 reference."""

import numpy as np
import pytest
import torch
from reference import dense_hessian
from tolerances import FLOAT32_REL, FLOAT64_EXACT
from torch import nn

import geomprobe as gp
from geomprobe.engine.doublecheck import cut_discrepancy
from geomprobe.engine.landscape import Landscape


class DetachedSquare(torch.autograd.Function):
    """x**2 whose backward uses x.detach(): first derivatives right, second-order term through x lost."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x.detach()


class NumpySquare(torch.autograd.Function):
    """x**2 whose backward runs in numpy: the returned gradient carries no graph at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(np.asarray(g.detach().numpy() * 2 * x.detach().numpy()))


class NoGradTanh(torch.autograd.Function):
    """tanh whose backward runs under torch.no_grad."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.no_grad():
            return g * (1 - y * y)


class HonestTanh(NoGradTanh):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class HandReLU(torch.autograd.Function):
    """A hand-written ReLU: its backward multiplies by a mask with no graph, rightly (second derivative 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0)


class Net(nn.Module):
    """Three linear layers with ``act`` (a Function or a module) between them; the last layer is linear."""

    def __init__(self, act, dtype=torch.float64):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        self.to(dtype)
        self.act = act

    def forward(self, x):
        f = self.act.apply if isinstance(self.act, type) else self.act
        return self.c(f(self.b(f(self.a(x)))))


def _data(dtype=torch.float64, n=48):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, generator=g, dtype=dtype) * 2, torch.randn(n, 2, generator=g, dtype=dtype)


def _twin(model: Net, act) -> Net:
    """The same weights with a built-in activation (the reference's honest double backward)."""
    twin = Net(act, dtype=torch.float64)
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return twin


def _hessian(land: Landscape) -> torch.Tensor:
    return land.hvp(torch.eye(land.dim, dtype=land.dtype)).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_backward_on_detached_saved_tensors_is_refused_naming_the_function_and_blocks(dtype):
    torch.manual_seed(0)
    model = Net(DetachedSquare, dtype)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gp.UnsupportedOperationError,
                       match=r"block\(s\) a\.weight.*DetachedSquare.*outside autograd.*finite-difference"):
        Landscape(model, nn.MSELoss(), _data(dtype))
    # the check perturbs the parameters for its differences and puts them back bit for bit
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("fn", [NumpySquare, NoGradTanh])
def test_a_backward_returning_a_gradient_without_graph_is_refused_without_differences(fn):
    torch.manual_seed(0)
    with pytest.raises(gp.UnsupportedOperationError, match=rf"Function .*{fn.__name__} \({fn.__name__}Backward\)"):
        Landscape(Net(fn), nn.MSELoss(), _data())


def test_a_relu_network_with_a_linear_last_layer_is_accepted_and_exact():
    """Built-in ReLU and a mean-of-outputs loss: the last layer's bias gradient is a constant (no graph),
    its Hessian row is exactly zero, and nothing is refused."""
    torch.manual_seed(1)
    model = Net(nn.ReLU())
    loss_fn = lambda out, y: (out * y).mean()
    land = Landscape(model, loss_fn, _data())
    H = _hessian(land)
    H_ref = dense_hessian(model, loss_fn, [_data()])
    assert torch.allclose(H, H_ref, atol=FLOAT64_EXACT, rtol=0)
    assert H[-2:].abs().max() == 0 and H_ref[-2:].abs().max() == 0  # c.bias: linear, constant gradient
    assert H.abs().max() > 1e-2  # but the Hessian is not trivially zero
    assert land.custom_functions == []


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), lambda out, y: (out * y).mean()], ids=["mse", "linear"])
def test_a_hand_written_relu_is_accepted_and_gives_the_reference_hessian(loss_fn):
    torch.manual_seed(2)
    model = Net(HandReLU)
    land = Landscape(model, loss_fn, _data())
    assert land.custom_functions and land.custom_functions[0].endswith("HandReLU")
    assert land.hvps == 0  # the check's own product is not billed to the metrics
    H_ref = dense_hessian(_twin(model, nn.ReLU()), loss_fn, [_data()])
    assert torch.allclose(_hessian(land), H_ref, atol=FLOAT64_EXACT, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_honest_custom_functions_are_never_refused_in_float32(seed):
    """Large inputs put many ReLU kinks within the difference step: the step-dependent discrepancy they
    cause must not be taken for a cut."""
    torch.manual_seed(seed)
    for fn in (HandReLU, HonestTanh):
        model = Net(fn, torch.float32)
        X, Y = _data(torch.float32, n=256)
        land = Landscape(model, nn.MSELoss(), (X * 4, Y))
        if fn is HonestTanh:
            H_ref = dense_hessian(_twin(model, nn.Tanh()), nn.MSELoss(), [(X.double() * 4, Y.double())])
            assert torch.allclose(_hessian(land), H_ref, atol=FLOAT32_REL * H_ref.abs().max(), rtol=0)


def test_the_probe_records_the_refusal_instead_of_a_converged_spectrum(tmp_path):
    torch.manual_seed(0)
    model = Net(DetachedSquare)
    probe = gp.GeometryProbe(model, nn.MSELoss(), _data(), metrics={"spectrum": {"tol": 1e-6}},
                             run_dir=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="landscape failed at step 0.*DetachedSquare"):
        record = probe.probe(0)
    probe.close()
    assert "spectrum" not in record or not record.get("spectrum")
    assert any("DetachedSquare" in str(m) for m in record["errors"].values())


def test_cut_discrepancy_separates_a_constant_gap_from_a_step_dependent_one():
    hv = torch.tensor([1.0, 0.0], dtype=torch.float64)
    blocks = [("x", slice(0, 1)), ("y", slice(1, 2))]
    cut = cut_discrepancy(hv, lambda e: hv + torch.tensor([0.0, 0.5], dtype=torch.float64), 1e-3, 1e-6, blocks)
    assert cut.consistent and cut.blocks == ["y"] and cut.relative == pytest.approx(0.5 / 1.25 ** 0.5)
    kink = cut_discrepancy(hv, lambda e: hv + torch.tensor([1e-4 / e, 0.0], dtype=torch.float64), 1e-3, 1e-6, blocks)
    assert not kink.consistent and kink.relative > 1e-6
    clean = cut_discrepancy(hv, lambda e: hv + 1e-9, 1e-3, 1e-6, blocks)
    assert not clean.consistent and clean.blocks == []


def test_a_custom_function_in_half_precision_is_flagged_as_unchecked():
    """Differences of bfloat16 gradients cannot tell a cut from rounding: say so instead of passing silently."""
    torch.manual_seed(0)
    model = Net(DetachedSquare, torch.bfloat16)
    X, Y = _data(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"DetachedSquare cannot be checked .* in torch\.bfloat16"):
        land = Landscape(model, nn.MSELoss(), (X, Y))
    assert land.hvps == 0
