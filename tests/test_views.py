"""geomprobe.views against closed forms: a quadratic loss with a known Hessian (float64), filter norms, exact
interpolation ends, the PCA plane against numpy's SVD; the model left exactly as found; bad input refused."""

import copy

import numpy as np
import pytest
import torch
from quadratic_models import Quadratic, indefinite, landscape, spd
from reference import make_case
from torch import nn
from torch.func import functional_call

from geomprobe import Landscape, views
from geomprobe.errors import ConfigurationError, OptimizerStateError

F64 = torch.float64
TOL = 1e-10


def quadratic(d=12, seed=0, A=None):
    g = torch.Generator().manual_seed(seed)
    A = spd(d, seed=seed) if A is None else A
    d = A.shape[0]
    model = Quadratic(A, [5, d - 5], b=torch.randn(d, generator=g, dtype=F64), w=torch.randn(d, generator=g, dtype=F64))
    return model, landscape(model)


def closed_loss(model, w):
    return float(0.5 * w @ model.A @ w - model.b @ w)


def direct_loss(land, flat):
    """The Landscape's loss at flat parameters computed independently (functional_call on the model)."""
    params = dict(zip(land.param_names, land.space.split(flat)))
    total = 0.0
    for b, (x, y) in enumerate(land.batches):
        with land.frozen(b):
            total += float(land.loss_fn(functional_call(land.model, params, (x,)), y)) * land.weights[b]
    return total


@pytest.mark.parametrize("A", [None, indefinite(12, neg=3, seed=2)], ids=["spd", "indefinite"])
def test_line_along_the_top_eigenvector_is_the_closed_form(A):
    model, land = quadratic(A=A)
    H = model.dense_hessian()
    evals, evecs = torch.linalg.eigh(H)
    w, g = model.flat().detach(), model.gradient()
    out = views.line(land, "top", span=(-2.0, 2.0), points=21, tol=1e-12)
    top = evecs[:, -1]
    slope = float(g @ top)
    assert abs(abs(out["slope"]) - abs(slope)) <= TOL * max(1.0, abs(slope))
    s = np.sign(out["slope"]) * np.sign(slope)  # the eigenvector's sign is arbitrary
    t = np.asarray(out["t"])
    expected = closed_loss(model, w) + slope * s * t + 0.5 * float(evals[-1]) * t**2
    scale = max(1.0, np.abs(expected).max())
    assert np.max(np.abs(np.asarray(out["loss"]) - expected)) <= TOL * scale
    assert np.max(np.abs(np.asarray(out["quadratic"]) - expected)) <= TOL * scale
    assert abs(out["curvature"] - float(evals[-1])) <= TOL * abs(float(evals[-1]))
    assert out["norm"] == pytest.approx(1.0, abs=1e-14) and out["forwards"] == 21
    assert t[10] == 0.0 and out["loss"][10] == pytest.approx(land.loss, abs=1e-12)


def test_line_along_the_gradient_has_the_gradient_curvature():
    model, land = quadratic(seed=3)
    H, g = model.dense_hessian(), model.gradient()
    out = views.line(land, "gradient", span=(-0.5, 0.5), points=11)
    assert out["curvature"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-12)
    assert out["slope"] == pytest.approx(float(g.norm()), rel=1e-12)
    u = g / g.norm()
    w = model.flat().detach()
    expected = [closed_loss(model, w + t * u) for t in out["t"]]
    assert np.allclose(out["loss"], expected, rtol=0, atol=TOL * max(1.0, max(map(abs, expected))))
    assert out["hvps"] == 1  # the quadratic model's one HVP, no Lanczos


def test_bottom_eigenvector_and_second_top():
    model, land = quadratic(A=indefinite(10, neg=2, seed=4))
    evals = torch.linalg.eigvalsh(model.dense_hessian())
    assert views.line(land, "bottom", points=3, tol=1e-12)["curvature"] == pytest.approx(float(evals[0]), rel=1e-9)
    assert views.line(land, "top2", points=3, tol=1e-12)["curvature"] == pytest.approx(float(evals[-2]), rel=1e-8)


def test_plane_matches_the_closed_form_on_a_grid():
    model, land = quadratic(seed=5)
    H, g, w = model.dense_hessian(), model.gradient(), model.flat().detach()
    out = views.plane(land, "top", "gradient", span=((-1.0, 2.0), (-0.5, 0.5)), points=(7, 5), tol=1e-12)
    assert out["loss"].shape == (5, 7) and out["quadratic"].shape == (5, 7)
    top = torch.linalg.eigh(H)[1][:, -1]
    top = top * np.sign(float(g @ top)) * np.sign(out["slope"][0])
    v = g / g.norm()
    for j, b in enumerate(out["y"]):
        for i, a in enumerate(out["x"]):
            exact = closed_loss(model, w + a * top + b * v)
            assert abs(out["loss"][j, i] - exact) <= TOL * max(1.0, abs(exact))
    assert np.max(np.abs(out["loss"] - out["quadratic"])) <= TOL * np.abs(out["loss"]).max()
    C = np.asarray(out["curvature"])
    assert C[0, 1] == pytest.approx(float(top @ H @ v), abs=1e-10) and C[1, 1] == pytest.approx(float(v @ H @ v))
    assert out["forwards"] == 35 and out["hvps"] >= 2


def test_views_of_a_network_measure_the_loss_at_the_shifted_parameters():
    model, loss_fn, batches, mode = make_case("cnn_bn")
    land = Landscape(model, loss_fn, batches, mode=mode)
    out = views.plane(land, "gradient", "random", points=(3, 3), seed=1)
    theta = views.parameter_vector(land, model)
    du = land.grad / land.grad.norm()
    dv = views.resolve_direction(land, "random", seed=2)[0]  # plane draws v from seed + 1
    for j, b in enumerate(out["y"]):
        for i, a in enumerate(out["x"]):
            assert out["loss"][j, i] == pytest.approx(direct_loss(land, theta + a * du + b * dv), rel=1e-12)
    assert out["loss"][1, 1] == pytest.approx(land.loss, rel=1e-13)
    # the quadratic model is only a model on a network: near zero it agrees to second order
    near = views.line(land, "gradient", span=(-1e-3, 1e-3), points=3)
    assert np.allclose(near["loss"], near["quadratic"], rtol=0, atol=1e-8)


def test_filter_normalization_gives_each_filter_the_norm_of_its_weights():
    model, loss_fn, batches, mode = make_case("cnn_bn")
    land = Landscape(model, loss_fn, batches, mode=mode)
    d, info = views.resolve_direction(land, "random", seed=3)
    assert info["normalize"] == "filter"
    for (name, p), piece in zip(model.named_parameters(), land.space.split(d)):
        if p.dim() > 1:
            got = piece.reshape(p.shape[0], -1).norm(dim=1)
            want = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(got, want, rtol=1e-12, atol=0), name
        else:
            assert torch.equal(piece, p.detach()), name  # 1-D parameters take the weights (Li et al.'s default)
    zero_bias = views.filter_normalize(land, torch.ones(land.dim, dtype=F64), filter_1d="zero")
    for p, piece in zip(model.parameters(), land.space.split(zero_bias)):
        if p.dim() == 1:
            assert not piece.any()
    # a zero filter stays zero instead of dividing by zero
    z = torch.ones(land.dim, dtype=F64)
    land.space.split(z)[0][0].zero_()
    out = views.filter_normalize(land, z)
    assert not land.space.split(out)[0][0].any() and torch.isfinite(out).all()


def test_interpolate_reproduces_each_end_exactly():
    model_a, loss_fn, batches, mode = make_case("tanh_mlp", seed=0)
    model_b = make_case("tanh_mlp", seed=1)[0]
    model_c = make_case("tanh_mlp", seed=2)[0]
    land = Landscape(model_a, loss_fn, batches, mode=mode)
    ends = [Landscape(m, loss_fn, batches, mode=mode).loss for m in (model_a, model_b, model_c)]
    two = views.interpolate([model_a, model_b], land, points=5)
    assert two["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert two["loss"][0] == ends[0] and two["loss"][-1] == ends[1] and two["ends"] == ends[:2]
    a, b = views.parameter_vector(land, model_a), views.parameter_vector(land, model_b)
    assert two["loss"][2] == pytest.approx(direct_loss(land, 0.5 * a + 0.5 * b), rel=1e-13)
    assert two["distances"][0] == pytest.approx(float((a - b).norm()), rel=1e-12)
    path = views.interpolate([model_a, model_b.state_dict(), views.parameter_vector(land, model_c)], land, points=4)
    assert len(path["t"]) == 7 and path["t"][3] == 1.0 and path["t"][-1] == 2.0
    assert [path["loss"][0], path["loss"][3], path["loss"][6]] == ends == path["ends"]
    beyond = views.interpolate([model_a, model_b], land, points=5, span=(-0.5, 1.5))
    assert beyond["ends"] == ends[:2] and beyond["loss"][0] == pytest.approx(direct_loss(land, 1.5 * a - 0.5 * b))


def test_trajectory_plane_matches_numpy_svd_of_the_differences():
    model, loss_fn, batches, mode = make_case("tanh_mlp")
    land = Landscape(model, loss_fn, batches, mode=mode)
    g = torch.Generator().manual_seed(0)
    theta = views.parameter_vector(land, model)
    # a curved path: a drift plus a turn plus small noise
    e1, e2 = torch.randn(land.dim, generator=g, dtype=F64), torch.randn(land.dim, generator=g, dtype=F64)
    path = [theta + 0.3 * (4 - k) * e1 + 0.1 * (k - 2) ** 2 * e2 + 0.01 * torch.randn(land.dim, generator=g,
                                                                                      dtype=F64) for k in range(5)]
    out = views.trajectory(path, land, points=(5, 4), margin=0.1)
    D = torch.stack([p - path[-1] for p in path[:-1]]).numpy()
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    dirs = out["directions"].numpy()
    for k in range(2):
        assert abs(abs(dirs[k] @ Vt[k]) - 1) < 1e-10
    signs = np.sign(np.sum(dirs[:2] * Vt[:2], axis=1))
    assert np.allclose(out["path"][:-1], (D @ Vt[:2].T) * signs, atol=1e-10)
    assert np.allclose(out["explained"], S[:2] ** 2 / np.sum(S**2), rtol=1e-10)
    assert np.allclose(out["offplane"][:-1], np.linalg.norm(D - (D @ Vt[:2].T) @ Vt[:2], axis=1), atol=1e-9)
    assert out["loss"].shape == (4, 5)
    x, y = out["x"][1], out["y"][2]
    center = path[-1]
    assert out["loss"][2, 1] == pytest.approx(direct_loss(land, center + x * out["directions"][0]
                                                          + y * out["directions"][1]), rel=1e-12)
    assert out["path_loss"] == pytest.approx([direct_loss(land, p) for p in path], rel=1e-13)
    lo, hi = np.min(out["path"], 0), np.max(out["path"], 0)
    assert out["x"][0] == pytest.approx(lo[0] - 0.1 * (hi[0] - lo[0])) and out["y"][-1] == pytest.approx(
        hi[1] + 0.1 * (hi[1] - lo[1]))


def test_views_leave_the_model_exactly_as_found_and_the_landscape_usable():
    model, loss_fn, batches, mode = make_case("dropout_train")
    land = Landscape(model, loss_fn, batches, mode=mode)
    before = {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    v = torch.randn(land.dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    hv = land.hvp(v)
    views.line(land, "random", points=5)
    views.plane(land, "top", "gradient", points=(3, 3))
    views.interpolate([model, views.parameter_vector(land, model) + 0.1], land, points=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p._version == before[n][1], n
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(land.hvp(v), hv)  # the retained graphs are still valid: same HVP, bit for bit


def test_update_direction_from_the_previous_parameters():
    model, land = quadratic(seed=7)
    w = model.flat().detach()
    prev = w - 0.05 * torch.arange(12, dtype=F64)
    out = views.line(land, "update", previous=prev, span=(-1.0, 1.0), points=3)
    assert out["normalize"] == "none" and out["norm"] == pytest.approx(float((w - prev).norm()))
    assert out["loss"][0] == pytest.approx(closed_loss(model, prev), abs=1e-12)
    same = views.line(land, "update", last_update=w - prev, points=3)
    assert same["loss"] == pytest.approx(out["loss"], abs=1e-13)
    with pytest.raises(OptimizerStateError, match="needs the optimizer's last step"):
        views.line(land, "update")


def test_a_user_direction_as_a_flat_tensor_or_a_dict():
    model, land = quadratic(seed=8)
    u = torch.zeros(12, dtype=F64)
    u[:5] = 1.0
    flat = views.line(land, u, points=3)
    named = views.line(land, {"w0": torch.ones(5, dtype=F64)}, points=3)  # missing parameters move by zero
    assert flat["loss"] == named["loss"] and flat["norm"] == pytest.approx(5**0.5)
    unit = views.line(land, u, points=3, normalize="unit")
    assert unit["norm"] == pytest.approx(1.0) and unit["curvature"] == pytest.approx(flat["curvature"] / 5)


@pytest.mark.parametrize("call, message", [
    (lambda land, m: views.line(land, "sideways"), "unknown direction 'sideways'"),
    (lambda land, m: views.line(land, torch.ones(5, dtype=F64)), r"shape \(12,\), got \(5,\)"),
    (lambda land, m: views.line(land, {"w9": torch.ones(5)}), "unknown parameter"),
    (lambda land, m: views.line(land, {"w0": torch.ones(4)}), "'w0' has shape"),
    (lambda land, m: views.line(land, "gradient", points=1), "points must be an integer >= 2"),
    (lambda land, m: views.line(land, "gradient", span=(1, -1)), "lo < hi"),
    (lambda land, m: views.line(land, "gradient", normalize="max"), "normalize must be one of"),
    (lambda land, m: views.line(land, "gradient", max_forwards=10), "needs 41 forward passes"),
    (lambda land, m: views.line(land, torch.zeros(12, dtype=F64)), "is zero"),
    (lambda land, m: views.plane(land, "gradient", "gradient", points=3), "parallel"),
    (lambda land, m: views.plane(land, "gradient", "random", points=(3, 1)), "points along v"),
    (lambda land, m: views.interpolate([m], land), "at least 2"),
    (lambda land, m: views.interpolate([m, nn.Linear(3, 2)], land), "lacks parameter"),
    (lambda land, m: views.interpolate([m, m, m], land, span=(-1, 1)), "span applies to two"),
    (lambda land, m: views.trajectory([m, m], land), "at least 3"),
    (lambda land, m: views.trajectory([views.parameter_vector(land, m) * s for s in (1.0, 2.0, 3.0)], land),
     "lie on a line"),
])
def test_bad_input_gives_one_clear_message(call, message):
    model, land = quadratic()
    with pytest.raises(ConfigurationError, match=message):
        call(land, copy.deepcopy(model))


@pytest.mark.gpu
def test_views_on_cuda_match_the_cpu():
    out = {}
    for device in ("cpu", "cuda"):
        model, loss_fn, batches, mode = make_case("cnn_bn")
        model = model.to(device)
        land = Landscape(model, loss_fn, [(x.to(device), y.to(device)) for x, y in batches], mode=mode)
        line = views.line(land, "gradient", points=5)
        v = torch.randn(land.dim, dtype=F64, generator=torch.Generator().manual_seed(0))  # "random" differs by device
        plane = views.plane(land, "gradient", v.to(device), points=(3, 3))
        path = views.interpolate([model, views.parameter_vector(land, model) * 0.9], land, points=3)
        out[device] = (line["loss"], plane["loss"], path["loss"])
    for a, b in zip(out["cpu"], out["cuda"]):
        assert np.allclose(a, b, rtol=1e-10, atol=0)
