"""Landscape against dense float64 Hessians, and the rules it keeps (state untouched, clear errors)."""

import copy

import pytest
import torch
from reference import CASES, OnceDifferentiableCube, dense_hessian, make_case
from tolerances import FLOAT32_REL, FLOAT64_EXACT, FLOAT64_REL
from torch import nn

import geomprobe as gp
from geomprobe.metrics import spectrum

_DENSE: dict = {}


@pytest.fixture(params=CASES)
def case(request):
    model, loss, batches, mode = make_case(request.param)
    if request.param not in _DENSE:  # the dense references are the slow part: compute each once
        _DENSE[request.param] = dense_hessian(model, loss, batches, mode=mode)
    return model, loss, batches, mode, _DENSE[request.param]


def test_hvp_equals_dense_hessian(case):
    model, loss, batches, mode, H = case
    land = gp.Landscape(model, loss, batches, mode=mode)
    cols = land.hvp(torch.eye(land.dim, dtype=torch.float64))
    assert torch.allclose(cols, H, rtol=0, atol=FLOAT64_EXACT * max(1.0, H.abs().max().item()))
    assert land.hvps == land.dim


def test_extreme_and_top3_eigenvalues_match_dense(case):
    model, loss, batches, mode, H = case
    eig = torch.linalg.eigvalsh(H)
    scale = eig.abs().max().item()
    land = gp.Landscape(model, loss, batches, mode=mode)
    out = spectrum(land, k=3, tol=1e-10)
    assert out["converged"]
    assert abs(out["lambda_max"] - eig[-1].item()) <= FLOAT64_REL * scale
    assert abs(out["lambda_min"] - eig[0].item()) <= FLOAT64_REL * scale
    for got, want in zip(out["top"], eig.flip(0)[:3].tolist()):
        assert abs(got - want) <= FLOAT64_REL * scale
    for got, want in zip(out["bottom"], eig[:3].tolist()):
        assert abs(got - want) <= FLOAT64_REL * scale
    # each reported bound covers the distance to the true eigenvalue
    assert abs(out["lambda_max"] - eig[-1].item()) <= out["lambda_max_err"] + 1e-12 * scale
    assert out["hvps"] == out["steps"] and out["hvps"] < land.dim


def test_batched_hvp_equals_single_hvps():
    model, loss, batches, mode = make_case("transformer")
    land = gp.Landscape(model, loss, batches, mode=mode, chunk_size=5)
    V = torch.randn(12, land.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batched = land.hvp(V)
    single = torch.stack([land.hvp(v) for v in V])
    assert torch.allclose(batched, single, rtol=0, atol=FLOAT64_EXACT)
    assert land.batched_hvp


def test_unequal_batches_equal_one_concatenated_batch():
    model, loss, batches, mode = make_case("tanh_mlp")
    joined = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    split = gp.Landscape(model, loss, batches)
    whole = gp.Landscape(model, loss, joined)
    V = torch.randn(4, split.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert split.n_samples == whole.n_samples == 23
    assert abs(split.loss - whole.loss) <= FLOAT64_EXACT
    assert torch.allclose(split.grad, whole.grad, rtol=0, atol=FLOAT64_EXACT)
    assert torch.allclose(split.hvp(V), whole.hvp(V), rtol=0, atol=FLOAT64_EXACT)


def test_equal_weighting_of_batches_would_be_wrong():
    # the sample weighting matters: equal weights give a different Hessian on these 16 + 7 batches
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches)
    halves = [gp.Landscape(model, loss, b) for b in batches]
    v = torch.ones(land.dim, dtype=torch.float64)
    equal = sum(h.hvp(v) for h in halves) / 2
    assert (equal - land.hvp(v)).norm() > 1e-3 * land.hvp(v).norm()


def _state(model):
    return (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        torch.get_rng_state(),
    )


def _assert_same_state(a, b):
    sd_a, flags_a, grads_a, rng_a = a
    sd_b, flags_b, grads_b, rng_b = b
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert flags_a == flags_b
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("vector_device", [None, "cpu"], ids=["device-vectors", "host-vectors"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["cnn_bn", "dropout_train"])
def test_model_state_bit_identical_after_use(name, mode, vector_device):
    model, loss, batches, _ = make_case(name)
    model.train()
    # a .grad present before probing must survive untouched
    out = model(batches[0][0])
    (out.float().pow(2).mean()).backward()
    before = _state(model)
    buffers_before = [b for b in model.buffers()]
    with gp.Landscape(model, loss, batches, mode=mode, vector_device=vector_device) as land:
        land.hvp(torch.ones(3, land.dim, dtype=torch.float64))
        spectrum(land, tol=1e-4)
    _assert_same_state(before, _state(model))
    # the very same buffer objects (identity), so references held by the user stay valid
    assert all(a is b for a, b in zip(buffers_before, model.buffers()))


def test_train_mode_uses_batch_statistics_and_fixed_dropout_masks():
    model, loss, batches, _ = make_case("dropout_train")
    a = gp.Landscape(model, loss, batches, mode="train", seed=3)
    b = gp.Landscape(model, loss, batches, mode="train", seed=3)
    c = gp.Landscape(model, loss, batches, mode="eval")
    v = torch.ones(a.dim, dtype=torch.float64)
    assert torch.equal(a.hvp(v), b.hvp(v))      # masks frozen by the seed
    assert a.loss != c.loss                      # dropout is on in train mode, off in eval mode
    # the same mask is used by every HVP of the Landscape: H v twice is identical
    assert torch.equal(a.hvp(v), a.hvp(v))


def test_graph_budget_rebuilds_graphs_with_the_same_answer():
    model, loss, batches, mode = make_case("dropout_train")
    kept = gp.Landscape(model, loss, batches, mode=mode)
    tight = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=1)
    V = torch.randn(3, kept.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(kept.hvp(V), tight.hvp(V), rtol=0, atol=FLOAT64_EXACT)
    # a budget below one graph keeps none, the first included: every batch's graph is rebuilt per product
    assert tight.info()["graphs_kept"] == 0 and tight.graph_rebuilds >= len(tight.batches)
    assert kept.graph_rebuilds == 0 and kept.graph_bytes > 0


def test_float32_on_cpu():
    model, loss, batches, mode = make_case("tanh_mlp", dtype=torch.float32)
    land = gp.Landscape(model, loss, batches)
    assert land.dtype == torch.float32 and land.grad.dtype == torch.float32
    H = dense_hessian(model.double(), loss, [(x.double(), y) for x, y in batches])
    model.float()
    land = gp.Landscape(model, loss, batches)
    eig = torch.linalg.eigvalsh(H)
    out = spectrum(land, tol=1e-4)
    assert abs(out["lambda_max"] - eig[-1].item()) <= FLOAT32_REL * eig.abs().max().item()
    assert abs(out["lambda_min"] - eig[0].item()) <= FLOAT32_REL * eig.abs().max().item()


def test_param_filter_and_module_blocks():
    model, loss, batches, _ = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, params="net.4.*", group_by="module")
    assert [b.name for b in land.blocks] == ["net.4"]
    assert land.dim == 10 * 3 + 3
    H = dense_hessian(model, loss, batches)
    full = gp.Landscape(model, loss, batches)
    start = full.space.block("net.4.weight").start
    sub = H[start:, start:]
    assert torch.allclose(land.hvp(torch.eye(land.dim, dtype=torch.float64)), sub, atol=FLOAT64_EXACT)


def test_loss_fn_taking_model_and_batch():
    model, loss, batches, _ = make_case("tanh_mlp")

    def loss_fn(model, batch):
        x, y = batch
        return loss(model(x), y)

    a = gp.Landscape(model, loss_fn, batches)
    b = gp.Landscape(model, loss, batches)
    assert a.loss_form == "model" and b.loss_form == "outputs"
    v = torch.ones(a.dim, dtype=torch.float64)
    assert torch.allclose(a.hvp(v), b.hvp(v), atol=FLOAT64_EXACT)


def test_dataloader_with_max_batches():
    model, loss, batches, _ = make_case("tanh_mlp")
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5)
    land = gp.Landscape(model, loss, dl, max_batches=3)
    assert land.batch_sizes == [5, 5, 5]


def test_finite_difference_hvp_is_flagged_and_close_on_smooth_model():
    model, loss, batches, _ = make_case("tanh_mlp")
    exact = gp.Landscape(model, loss, batches)
    v = torch.randn(exact.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = exact.hvp(v)
    fd = gp.Landscape(model, loss, batches, hvp_method="finite-difference")
    before = [p.detach().clone() for p in model.parameters()]
    assert fd.approximate and not exact.approximate
    assert (fd.hvp(v) - want).norm() <= 1e-6 * want.norm()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_wrapped_models_are_unwrapped():
    model, loss, batches, _ = make_case("tanh_mlp")
    wrapped = nn.DataParallel(model)
    assert gp.unwrap_model(wrapped) is model
    land = gp.Landscape(wrapped, loss, batches)
    assert land.model is model


class _Cube(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return OnceDifferentiableCube.apply(self.lin(x))


def test_missing_double_backward_names_the_operation():
    x = torch.randn(4, 3, dtype=torch.float64)
    data = (x, torch.zeros(4, 1, dtype=torch.float64))
    # autograd would silently drop the terms through this Function; the Landscape refuses it up front
    with pytest.raises(gp.UnsupportedOperationError, match="once_differentiable.*finite-difference"):
        gp.Landscape(_Cube(), nn.MSELoss(), data)
    fd = gp.Landscape(_Cube(), nn.MSELoss(), data, hvp_method="finite-difference")
    assert torch.isfinite(fd.hvp(torch.ones(fd.dim, dtype=torch.float64))).all()


def test_bad_inputs_get_clear_errors():
    model, loss, batches, _ = make_case("tanh_mlp")
    with pytest.raises(gp.ConfigurationError, match="no trainable parameter matches"):
        gp.Landscape(model, loss, batches, params="nope.*")
    with pytest.raises(gp.ConfigurationError, match="mode must be one of"):
        gp.Landscape(model, loss, batches, mode="inference")
    with pytest.raises(gp.ConfigurationError, match="single tensor"):
        gp.Landscape(model, loss, batches[0][0])
    with pytest.raises(gp.ConfigurationError, match="empty"):
        gp.Landscape(model, loss, [])
    with pytest.raises(gp.ConfigurationError, match="scalar"):
        gp.Landscape(model, nn.CrossEntropyLoss(reduction="none"), batches)
    land = gp.Landscape(model, loss, batches)
    with pytest.raises(gp.ConfigurationError, match="hvp takes a vector"):
        land.hvp(torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(gp.ConfigurationError, match="parameters changed"):
        land.hvp(torch.ones(land.dim, dtype=torch.float64))
    land.close()
    with pytest.raises(gp.ConfigurationError, match="closed"):
        land.hvp(torch.ones(land.dim, dtype=torch.float64))


def test_non_finite_loss_is_refused():
    model, loss, batches, _ = make_case("tanh_mlp")
    bad = [(batches[0][0] * float("nan"), batches[0][1])]
    with pytest.raises(gp.NonFiniteLossError, match="loss on probe batch 0 is nan"):
        gp.Landscape(model, loss, bad)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    model, loss, batches, mode = make_case("transformer")
    cpu = spectrum(gp.Landscape(model, loss, batches, mode=mode), tol=1e-10)
    gpu_model = copy.deepcopy(model).cuda()
    land = gp.Landscape(gpu_model, loss, batches, mode=mode)
    assert land.device.type == "cuda"
    out = spectrum(land, tol=1e-10)
    assert abs(out["lambda_max"] - cpu["lambda_max"]) <= FLOAT64_REL * abs(cpu["lambda_max"])
    assert abs(out["lambda_min"] - cpu["lambda_min"]) <= FLOAT64_REL * abs(cpu["lambda_max"])


def test_micro_batches_give_the_same_hessian_in_less_memory():
    model, loss, batches, mode = make_case("transformer")
    whole = gp.Landscape(model, loss, batches)
    split = gp.Landscape(model, loss, batches, micro_batch_size=3, graph_budget_bytes=1)
    assert split.batch_sizes == [3, 3, 3, 3, 3, 1, 3, 3, 1] and split.n_samples == 23
    V = torch.randn(3, whole.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert abs(split.loss - whole.loss) <= FLOAT64_EXACT
    assert torch.allclose(split.hvp(V), whole.hvp(V), rtol=0, atol=FLOAT64_EXACT)
    assert split.info()["graphs_kept"] == 0 and split.graph_bytes == 0 < whole.graph_bytes  # none fit: all rebuilt


def test_micro_batches_refused_for_batchnorm_in_train_mode():
    model, loss, batches, _ = make_case("cnn_bn")
    with pytest.raises(gp.ConfigurationError, match="BatchNorm's batch statistics"):
        gp.Landscape(model, loss, batches, mode="train", micro_batch_size=4)
    with pytest.raises(gp.ConfigurationError, match="micro_batch_size must be >= 1"):
        gp.Landscape(model, loss, batches, micro_batch_size=0)
