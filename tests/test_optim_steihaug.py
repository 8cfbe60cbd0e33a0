"""Preconditioned Steihaug–Toint CG against dense float64 references."""

import math

import pytest
import torch
from tolerances import FLOAT64_EXACT, TR_MODEL_SLACK

from geomprobe.errors import ConfigurationError, NonFiniteLossError
from geomprobe.optim import cauchy_point, steihaug_cg

F64 = torch.float64


def model(g, H, s):
    return float(g @ s + 0.5 * s @ (H @ s))


def norm_a(s, a):
    return math.sqrt(float(s @ (a * s)))


def random_problem(gen, indefinite):
    """A random symmetric H (log-normal spectrum, a third of it negated when indefinite), gradient,
    log-normal ellipsoid diagonal and log-uniform radius."""
    n = int(torch.randint(2, 41, (1,), generator=gen))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    lam = torch.randn(n, generator=gen, dtype=F64).mul(1.5).exp()
    if indefinite:
        lam[: max(1, n // 3)] *= -1
    H = Q @ torch.diag(lam) @ Q.T
    H = 0.5 * (H + H.T)
    g = torch.randn(n, generator=gen, dtype=F64)
    a = torch.randn(n, generator=gen, dtype=F64).mul(1.5).exp()
    radius = math.exp(float(torch.empty(1, dtype=F64).uniform_(-4.0, 4.0, generator=gen)))
    return H, g, a, radius


def test_random_problems_are_feasible_and_never_worse_than_cauchy():
    gen = torch.Generator().manual_seed(1234)
    exits = {}
    for i in range(300):
        H, g, a, radius = random_problem(gen, indefinite=i % 2 == 1)
        res = steihaug_cg(lambda v: H @ v, g, radius, a)
        s = res.s
        assert norm_a(s, a) <= radius * (1 + FLOAT64_EXACT)
        _, m_cauchy = cauchy_point(g, H @ (-g / a), radius, a)
        m_cg = model(g, H, s)
        assert m_cg <= m_cauchy + TR_MODEL_SLACK * max(1.0, abs(m_cauchy))
        # The solver's own model value (from its residual recurrence) is the dense one.
        assert res.model_value == pytest.approx(m_cg, rel=1e-8, abs=1e-12)
        if res.exit in ("negative_curvature", "boundary"):
            assert abs(norm_a(s, a) / radius - 1) <= FLOAT64_EXACT
        assert res.hvps == res.iterations <= 50
        exits[res.exit] = exits.get(res.exit, 0) + 1
    # The problem set exercises every way out of the loop.
    assert {"negative_curvature", "boundary", "converged"} <= set(exits), exits
    assert exits["negative_curvature"] >= 30


def test_negative_curvature_exit_lands_on_boundary():
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        n = 12
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
        H = Q @ torch.diag(-torch.rand(n, generator=gen, dtype=F64) - 0.1) @ Q.T
        g = torch.randn(n, generator=gen, dtype=F64)
        a = torch.randn(n, generator=gen, dtype=F64).exp()
        res = steihaug_cg(lambda v: H @ v, g, 0.7, a)
        assert res.exit == "negative_curvature"
        assert abs(norm_a(res.s, a) - 0.7) <= FLOAT64_EXACT * 0.7
        assert model(g, H, res.s) < 0


def test_interior_solution_meets_the_stopping_rule():
    gen = torch.Generator().manual_seed(3)
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    H = Q @ torch.diag(torch.linspace(1.0, 50.0, n, dtype=F64)) @ Q.T
    g = torch.randn(n, generator=gen, dtype=F64)
    res = steihaug_cg(lambda v: H @ v, g, 1e6)
    assert res.exit == "converged"
    g_norm = float(g.norm())
    assert float((g + H @ res.s).norm()) <= g_norm * min(0.1, math.sqrt(g_norm))
    # A tighter forcing constant approaches the Newton step.
    tight = steihaug_cg(lambda v: H @ v, g, 1e6, kappa=1e-12, max_iter=200)
    torch.testing.assert_close(tight.s, -torch.linalg.solve(H, g), rtol=1e-8, atol=1e-10)


def test_exact_diagonal_preconditioner_converges_in_one_iteration():
    h = torch.logspace(-3, 3, 50, dtype=F64)
    g = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = steihaug_cg(lambda v: h * v, g, 1e6, a=h)
    plain = steihaug_cg(lambda v: h * v, g, 1e6)
    assert res.iterations == 1 and res.exit == "converged"
    torch.testing.assert_close(res.s, -g / h)
    assert plain.iterations > 10


def test_zero_gradient_returns_zero_step_without_products():
    calls = []
    res = steihaug_cg(lambda v: calls.append(v) or v, torch.zeros(4, dtype=F64), 1.0)
    assert res.exit == "zero_gradient" and res.hvps == 0 and not calls
    assert float(res.s.abs().max()) == 0.0


def test_max_iter_caps_the_products():
    h = torch.logspace(-4, 4, 200, dtype=F64)
    g = torch.ones(200, dtype=F64)
    res = steihaug_cg(lambda v: h * v, g, 1e8, max_iter=5)
    assert res.exit == "max_iter" and res.hvps == 5


def test_cauchy_point_replaces_a_worse_cg_step():
    # A matvec that answers truthfully once (so CG's first iterate is the interior Cauchy point s_c) and
    # then reports tiny curvature along p plus a large component along u ⟂ p: CG runs to the boundary and
    # its own accounting m = ½(g + r)ᵀs rises by ½ τ C ‖u‖². The guard must hand back the Cauchy point.
    H = torch.eye(3, dtype=F64)
    g = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    a = torch.tensor([1.0, 4.0, 1.0], dtype=F64)
    s_c, m_c = cauchy_point(g, H @ (-g / a), 10.0, a)
    assert norm_a(s_c, a) < 10.0
    calls = {"n": 0}

    def lying(p):
        calls["n"] += 1
        if calls["n"] == 1:
            return H @ p
        u = s_c - (s_c @ p) / (p @ p) * p
        return 1e-9 * p + 1e3 * u

    res = steihaug_cg(lying, g, 10.0, a)
    assert calls["n"] == 2 and res.cauchy
    torch.testing.assert_close(res.s, s_c)
    assert res.model_value == m_c


def test_float32_stays_float32_and_feasible():
    gen = torch.Generator().manual_seed(5)
    H, g, a, _ = random_problem(gen, indefinite=True)
    H, g, a = H.float(), g.float(), a.float()
    res = steihaug_cg(lambda v: H @ v, g, 0.5, a)
    assert res.s.dtype == torch.float32
    assert norm_a(res.s.double(), a.double()) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(g=torch.zeros(2, 2)), "1-D floating tensor"),
        (dict(g=torch.zeros(3, dtype=torch.long)), "1-D floating tensor"),
        (dict(radius=0.0), "radius must be positive"),
        (dict(radius=math.inf), "radius must be positive"),
        (dict(a=torch.ones(2, dtype=F64)), "shape"),
        (dict(a=torch.tensor([1.0, 0.0, 1.0], dtype=F64)), "positive and finite"),
        (dict(kappa=0.0), "kappa"),
        (dict(max_iter=0), "max_iter"),
    ],
)
def test_bad_input_is_a_configuration_error(kwargs, match):
    args = dict(g=torch.ones(3, dtype=F64), radius=1.0, a=None)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("kappa", "max_iter") if k in args}
    with pytest.raises(ConfigurationError, match=match):
        steihaug_cg(lambda v: v, args["g"], args["radius"], args["a"], **extra)


def test_non_finite_gradient_or_product_is_reported():
    with pytest.raises(NonFiniteLossError, match="gradient passed to steihaug_cg"):
        steihaug_cg(lambda v: v, torch.tensor([1.0, math.nan], dtype=F64), 1.0)
    with pytest.raises(NonFiniteLossError, match="Hessian-vector product"):
        steihaug_cg(lambda v: v * math.nan, torch.ones(2, dtype=F64), 1.0)
