"""EllipsoidalTR: the radius rule on exact quadratics, convergence, the ellipsoids' advantage where curvature
is diagonal, a small network, state, accounting and bad input."""

import io
import math

import pytest
import torch
from tolerances import FLOAT64_EXACT, TR_CONVERGED, TR_CONVERGED_FLOAT32, TR_RHO_ROUNDING

from geomprobe.errors import ConfigurationError, NonFiniteLossError, OptimizerStateError
from geomprobe.optim import EllipsoidalTR, make, track_backprops

F64 = torch.float64
ELLIPSOIDS = ["sphere", "adagrad", "rmsprop"]


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def minimize(f, w, opt, max_steps, target, tol):
    for step in range(1, max_steps + 1):
        opt.step(lambda: f(w))
        if float((w.detach() - target).abs().max()) < tol:
            return step
    return None


def spd(n, lo, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return Q @ torch.diag(torch.linspace(lo, hi, n, dtype=F64)) @ Q.T, gen


# ------------------------------------------------------------------------------------ exact quadratics


@pytest.mark.parametrize("ellipsoid", ["sphere", "rmsprop"])
def test_convex_quadratic_rho_is_one_and_radius_grows_to_max(ellipsoid):
    H, gen = spd(10, 1.0, 10.0, seed=1)
    x0 = torch.randn(10, generator=gen, dtype=F64)
    w = torch.nn.Parameter(100 * x0 / x0.norm())
    opt = EllipsoidalTR([w], ellipsoid=ellipsoid)
    radius = opt.radius
    reached_max = False
    for _ in range(300):
        opt.step(lambda: 0.5 * w @ (H @ w))
        tr = opt.trust_region_state
        # The model is the function: ρ = 1 up to the cancellation in L(w) − L(w + s).
        gap = abs(tr["actual_decrease"] - tr["predicted_decrease"])
        assert gap <= TR_RHO_ROUNDING * tr["loss"] or tr["rho"] == 1.0
        assert opt.accepted
        assert opt.radius == min(1.1 * radius, 10.0)
        radius = opt.radius
        reached_max |= radius == 10.0
        if float(w.detach().norm()) < 1e-10:
            break
    assert reached_max
    assert float(w.detach().norm()) < 1e-10


def test_float32_quadratic_converges_in_float32():
    H, gen = spd(8, 1.0, 20.0, seed=2)
    H = H.float()
    w = torch.nn.Parameter(torch.randn(8, generator=gen).float())
    opt = EllipsoidalTR([w], ellipsoid="rmsprop")
    steps = minimize(lambda x: 0.5 * x @ (H @ x), w, opt, 400, torch.zeros(8), TR_CONVERGED_FLOAT32)
    assert steps is not None
    assert w.dtype == torch.float32 and opt.state[w]["G"].dtype == torch.float32


# ----------------------------------------------------------------------------------------- Rosenbrock

ROSENBROCK_STEPS = {2: 300, 100: 1500}


@pytest.mark.parametrize("d", [2, 100])
@pytest.mark.parametrize("ellipsoid", ELLIPSOIDS)
def test_rosenbrock_converges(d, ellipsoid):
    w = torch.nn.Parameter(torch.tensor([-1.2, 1.0] * (d // 2), dtype=F64))
    opt = EllipsoidalTR([w], ellipsoid=ellipsoid)
    steps = minimize(rosenbrock, w, opt, ROSENBROCK_STEPS[d], torch.ones(d, dtype=F64), TR_CONVERGED)
    assert steps is not None, f"not converged: {w.detach()[:4]}, radius {opt.radius}"
    assert float(rosenbrock(w.detach())) < 1e-10


# ---------------------------------------------------------------- where the ellipsoid earns its keep


def solve_quadratic(H, x0, ellipsoid):
    w = torch.nn.Parameter(x0.clone())
    opt = EllipsoidalTR([w], ellipsoid=ellipsoid)
    cg = []
    for _ in range(2000):
        opt.step(lambda: 0.5 * w @ (H @ w))
        cg.append(opt.cg_iterations)
        if float(w.detach().norm()) < TR_CONVERGED * 1e-2:
            return opt.backprops, sum(cg) / len(cg)
    raise AssertionError(f"{ellipsoid} did not converge")


def test_diagonal_ellipsoids_need_fewer_backprops_on_axis_aligned_ill_conditioning():
    # Curvatures 1e-2 .. 1e2 along the coordinate axes, equal start coordinates: the gradient g_i = h_i x_i
    # is proportional to h_i, so a = sqrt(G) ∝ h and the ellipsoid is (a multiple of) the Hessian itself.
    # Preconditioned CG then finishes in one HVP per step, while the sphere's CG must resolve the spread.
    n = 100
    h = torch.logspace(-2, 2, n, dtype=F64)
    x0 = torch.ones(n, dtype=F64)
    cost = {e: solve_quadratic(torch.diag(h), x0, e) for e in ELLIPSOIDS}
    sphere_bp, sphere_cg = cost["sphere"]
    for e in ("adagrad", "rmsprop"):
        bp, cg = cost[e]
        assert bp < sphere_bp / 3, cost
        assert cg <= 1.2 < sphere_cg, cost


def test_diagonal_ellipsoids_lose_their_advantage_when_curvature_is_rotated():
    # The same spectrum in a random basis: a diagonal ellipsoid no longer matches H, and the advantage above
    # disappears, so it came from the alignment and not from, say, a different radius schedule.
    n = 30
    h = torch.logspace(-2, 2, n, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=F64))
    x0 = Q @ torch.ones(n, dtype=F64)
    cost = {e: solve_quadratic(Q @ torch.diag(h) @ Q.T, x0, e)[0] for e in ELLIPSOIDS}
    assert cost["adagrad"] > cost["sphere"] and cost["rmsprop"] > cost["sphere"], cost


# ------------------------------------------------------------------------------------ a small network


def test_mlp_on_digits_reaches_95_percent_training_accuracy():
    sklearn = pytest.importorskip("sklearn.datasets")
    X, y = sklearn.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    opt = make("tr-rmsprop", model.parameters())
    accuracy = 0.0
    for _ in range(60):
        perm = torch.randperm(len(y), generator=gen)
        for idx in perm.split(512):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(X[idx]), y[idx]))
        with torch.no_grad():
            accuracy = float((model(X).argmax(1) == y).float().mean())
        if accuracy >= 0.95:
            break
    assert accuracy >= 0.95, f"training accuracy {accuracy:.3f} after {opt.backprops} backprops"


# ---------------------------------------------------------------------------- rejection and the state


def test_rejected_step_restores_parameters_exactly_and_shrinks_radius():
    # sin has zero curvature at 0: CG runs to the boundary s = −10, where the model predicts a decrease of
    # 10 and sin rises instead (sin(−10) = 0.54 > sin(0)), so ρ < 0.
    w = torch.nn.Parameter(torch.tensor([0.0], dtype=F64))
    before = w.detach().clone()
    opt = EllipsoidalTR([w], ellipsoid="adagrad", radius=10.0, gamma2=2.0)
    opt.step(lambda: torch.sin(w).sum())
    assert not opt.accepted and opt.rho < 0.01
    assert torch.equal(w.detach(), before)
    assert opt.radius == 5.0
    # The ellipsoid still learned from this gradient.
    torch.testing.assert_close(opt.state[w]["G"], 1e-10 + torch.cos(before) ** 2)


def test_non_finite_trial_loss_is_a_rejection_not_an_error():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=F64))
    opt = EllipsoidalTR([w], ellipsoid="sphere", radius=5.0)
    # f = w + log w has g = 2 and H = −1 at w = 1: CG goes to the boundary w = −4, where log is NaN.
    opt.step(lambda: (w + torch.log(w)).sum())
    assert not opt.accepted and opt.rho == -math.inf
    assert float(w.detach()) == 1.0


def test_param_groups_and_preconditioner():
    gen = torch.Generator().manual_seed(0)
    u = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=F64))
    v = torch.nn.Parameter(torch.randn(2, 2, generator=gen, dtype=F64))
    frozen = torch.nn.Parameter(torch.ones(2, dtype=F64), requires_grad=False)
    opt = EllipsoidalTR([{"params": [u], "ellipsoid": "sphere"}, {"params": [v, frozen]}],
                        ellipsoid="rmsprop", radius=1e-3)

    def loss():
        return (u ** 4).sum() + (v ** 2).sum() * (u ** 2).sum()

    with pytest.raises(OptimizerStateError, match="no step yet"):
        opt.preconditioner()
    g_u, g_v = torch.autograd.grad(loss(), [u, v])
    opt.step(loss)
    P_u, P_v = opt.preconditioner()
    torch.testing.assert_close(P_u, torch.ones_like(u))
    torch.testing.assert_close(P_v, (0.8 * 1e-10 + 0.2 * g_v ** 2).rsqrt())
    a_u, a_v = opt.ellipsoid_diagonal()
    torch.testing.assert_close(a_v * P_v, torch.ones_like(v))
    assert torch.equal(frozen.detach(), torch.ones(2, dtype=F64))


def test_state_dict_round_trip_continues_identically():
    def run(opt, w, steps):
        for _ in range(steps):
            opt.step(lambda: rosenbrock(w))

    w1 = torch.nn.Parameter(torch.tensor([-1.2, 1.0, -1.2, 1.0], dtype=F64))
    opt1 = EllipsoidalTR([w1], ellipsoid="adagrad")
    run(opt1, w1, 5)
    w2 = torch.nn.Parameter(w1.detach().clone())
    opt2 = EllipsoidalTR([w2], ellipsoid="adagrad")
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.radius == opt1.radius and opt2.backprops == opt1.backprops
    run(opt1, w1, 5)
    run(opt2, w2, 5)
    assert torch.equal(w1.detach(), w2.detach())
    assert opt2.trust_region_state == opt1.trust_region_state


def test_backprops_are_counted_per_step():
    w = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=F64))
    opt = EllipsoidalTR([w], ellipsoid="rmsprop")
    counter = track_backprops(opt)
    hvps = 0
    for _ in range(10):
        opt.step(lambda: rosenbrock(w))
        hvps += opt.cg_iterations
        assert opt.last_step_work.backprops == 1 + opt.cg_iterations + 0.5
    assert opt.hvps == hvps == counter.hvps
    assert opt.backprops == counter.backprops == 10 * 1.5 + hvps
    counter.remove()


def test_parameter_outside_the_graph_and_linear_loss():
    used = torch.nn.Parameter(torch.tensor([2.0], dtype=F64))
    unused = torch.nn.Parameter(torch.tensor([5.0], dtype=F64))
    opt = EllipsoidalTR([used, unused], ellipsoid="sphere", radius=1.0)
    opt.step(lambda: 3.0 * used.sum())  # linear: the gradient has no graph, H = 0
    assert opt.accepted and opt.trust_region_state["cg_exit"] == "negative_curvature"
    torch.testing.assert_close(used.detach(), torch.tensor([1.0], dtype=F64), atol=FLOAT64_EXACT, rtol=0)
    assert float(unused.detach()) == 5.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_runs_on_gpu(dtype):
    H, gen = spd(16, 1.0, 50.0, seed=4)
    H = H.to("cuda", dtype)
    w = torch.nn.Parameter(torch.randn(16, generator=gen, dtype=F64).to("cuda", dtype))
    opt = EllipsoidalTR([w], ellipsoid="rmsprop")
    tol = TR_CONVERGED if dtype == F64 else TR_CONVERGED_FLOAT32
    steps = minimize(lambda x: 0.5 * x @ (H @ x), w, opt, 400, torch.zeros_like(w), tol)
    assert steps is not None
    assert opt.state[w]["G"].device == w.device and opt.preconditioner()[0].device == w.device


# -------------------------------------------------------------------------------------------- bad input


def quadratic_setup():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    return w, EllipsoidalTR([w], ellipsoid="rmsprop")


def test_missing_closure():
    w, opt = quadratic_setup()
    with pytest.raises(ConfigurationError, match="needs a closure that returns the minibatch loss"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=F64))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_leaves_parameters_and_state_unchanged(bad):
    w, opt = quadratic_setup()
    opt.step(lambda: (w ** 2).sum())
    w_before, G_before = w.detach().clone(), opt.state[w]["G"].clone()
    tr_before = dict(opt.trust_region_state)
    with pytest.raises(NonFiniteLossError, match="parameters were left unchanged"):
        opt.step(lambda: (w ** 2).sum() * bad)
    assert torch.equal(w.detach(), w_before) and torch.equal(opt.state[w]["G"], G_before)
    assert opt.trust_region_state == tr_before


def test_non_finite_gradient_with_finite_loss():
    w, opt = quadratic_setup()
    with pytest.raises(NonFiniteLossError, match="gradient of the closure's loss"):
        opt.step(lambda: torch.sqrt(w.abs() * 0).sum())  # sqrt'(0) = inf
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=F64))


def test_non_finite_hessian_product_leaves_parameters_and_ellipsoid_unchanged():
    # |w0|^1.5 has a finite gradient (0) but an infinite second derivative at w0 = 0.
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0], dtype=F64))
    opt = EllipsoidalTR([w], ellipsoid="adagrad")
    with pytest.raises(NonFiniteLossError, match="Hessian-vector product"):
        opt.step(lambda: w[0].abs() ** 1.5 + w[1] ** 2 + (w[0] - 1) ** 2)
    assert torch.equal(w.detach(), torch.tensor([0.0, 1.0], dtype=F64))
    assert "G" not in opt.state[w] and opt.trust_region_state["step"] == 0


def test_error_at_the_trial_point_restores_the_parameters():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = EllipsoidalTR([w], ellipsoid="sphere", radius=1.0)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader broke")
        return (w ** 2).sum()

    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=F64))


def test_closure_that_calls_backward():
    w, opt = quadratic_setup()

    def closure():
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    with pytest.raises(ConfigurationError, match="without calling backward"):
        opt.step(closure)


@pytest.mark.parametrize(
    "closure, match",
    [
        (lambda w: 1.0, "scalar tensor, got float"),
        (lambda w: w ** 2, r"scalar tensor, got Tensor\(2,\)"),
        (lambda w: (w ** 2).sum().detach(), "no grad_fn"),
    ],
)
def test_closure_must_return_a_differentiable_scalar(closure, match):
    w, opt = quadratic_setup()
    with pytest.raises(ConfigurationError, match=match):
        opt.step(lambda: closure(w))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ellipsoid="diagonal"),
         "unknown ellipsoid 'diagonal'; expected one of sphere, adagrad, rmsprop"),
        (dict(radius=-1.0), "initial_radius must be a positive"),
        (dict(radius=20.0), "exceeds radius_max"),
        (dict(eta1=0.5, eta2=0.1), "eta1 <= eta2"),
        (dict(gamma2=1.0), "gamma2 > 1"),
        (dict(gamma1=0.5), "gamma1 >= 1"),
        (dict(kappa=2.0), "kappa must lie in"),
        (dict(max_cg_iters=0), "max_cg_iters must be a positive integer"),
        (dict(beta=1.0), r"beta must lie in \[0, 1\)"),
        (dict(eps=0.0), "eps must be a positive"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigurationError, match=match):
        EllipsoidalTR([w], **kwargs)


def test_param_group_options():
    u, v = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigurationError, match="radius_max is shared"):
        EllipsoidalTR([{"params": [u]}, {"params": [v], "radius_max": 5.0}])
    with pytest.raises(ConfigurationError, match=r"unknown EllipsoidalTR param-group option\(s\) \['lr'\]"):
        EllipsoidalTR([{"params": [u], "lr": 0.1}])
    with pytest.raises(ConfigurationError, match="unknown ellipsoid 'ball'"):
        EllipsoidalTR([{"params": [u], "ellipsoid": "ball"}])


def test_mixed_dtypes_and_no_trainable_parameters():
    u = torch.nn.Parameter(torch.ones(2))
    v = torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = EllipsoidalTR([u, v])
    with pytest.raises(ConfigurationError, match="share one dtype and device; found torch.float32 on cpu, "
                                                 "torch.float64 on cpu"):
        opt.step(lambda: u.sum() + v.sum())
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ConfigurationError, match="no parameters that require grad"):
        EllipsoidalTR([frozen]).step(lambda: frozen.sum())
