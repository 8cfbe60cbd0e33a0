"""Noise isotropy, raw and preconditioned, on noise of known covariance; the unbiased moment estimators."""

import itertools
import json

import pytest
import torch
from tolerances import FLOAT64_EXACT, FLOAT64_REL, SIGMAS
from torch import nn

import geomprobe as gp
from geomprobe.engine.persample import PerExampleGradients
from geomprobe.metrics import isotropy
from geomprobe.stats.covariance import isotropy_index, jackknife_se, trace_moments

D = 12


class _Identity(nn.Module):
    """``x ↦ wᵀx``: under ``out.mean()`` each example's gradient is ``x`` itself, so ξ has the law of x."""

    def __init__(self, d=D):
        super().__init__()
        self.w = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return self.w(x)


def _mean_output(out, target):
    return out.mean()


def _known_noise(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, D, dtype=torch.float64)
    C = A @ A.T / D
    X = 3.0 + torch.randn(P, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(C).T
    torch.manual_seed(seed)
    model = _Identity().double()
    return model, (X, torch.zeros(P, dtype=torch.float64)), C


def _adam_with_p(model, p_diag):
    """An Adam whose one step leaves ``P = 1/(sqrt(v_hat) + eps) = p_diag`` exactly (eps = 0, g = 1/p)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=0.0)
    model.w.weight.grad = (1.0 / p_diag)[None].clone()
    opt.step()
    model.w.weight.grad = None
    return opt


def _cv(v):
    return float(v.std(correction=0) / v.mean())


def test_isotropy_of_known_covariance_raw_and_preconditioned():
    model, batch, C = _known_noise(800)
    p = C.diagonal().rsqrt()                            # P whitens the per-coordinate variances
    opt = _adam_with_p(model, p)
    u = torch.randn(D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u = u / u.norm()
    land = gp.Landscape(model, _mean_output, batch)
    out = isotropy(land, optimizer=opt, u_min=u, max_samples=None)
    CP = p[:, None] * C * p[None, :]
    truth = {
        "isotropy_index": isotropy_index(C),
        "isotropy_index_preconditioned": isotropy_index(CP),
        "trace_cov": float(C.trace()),
        "trace_cov_preconditioned": float(CP.trace()),
        "escape": float(u @ C @ u) * D / float(C.trace()),
        "escape_preconditioned": float(u @ CP @ u) * D / float(CP.trace()),
        "cv": _cv(C.diagonal()),
    }
    for key, value in truth.items():
        assert abs(out[key] - value) <= SIGMAS * out[f"{key}_err"], key
    # Whitened coordinates: what spread is left is the sampling noise of 800 variances.
    assert out["cv_preconditioned"] < 0.15 < out["cv"]
    assert out["optimizer"] == "Adam" and "exp_avg_sq" in out["source"]
    assert out["isotropy_min"] == pytest.approx(1 / D)
    assert out["lambda_min"] is None and out["hvps"] == 0
    json.dumps(out, allow_nan=False)


def test_duck_typed_preconditioner_and_blocks():
    model, batch, C = _known_noise(300, seed=2)

    class Whitening:
        """Anything with param_groups and preconditioner() (the trust-region optimizer's interface)."""

        def __init__(self):
            self.param_groups = [{"params": list(model.parameters())}]

        def preconditioner(self):
            return [C.diagonal().rsqrt()[None]]

    out = isotropy(gp.Landscape(model, _mean_output, batch), optimizer=Whitening(), u_min=None,
                   max_samples=None)
    assert "preconditioner()" in out["source"]
    assert out["escape"] is None and out["escape_preconditioned"] is None
    block = out["blocks"]["w.weight"]
    assert block["cv"] == pytest.approx(out["cv"]) and block["cv_preconditioned"] < out["cv"]
    assert block["trace_cov_preconditioned"] == pytest.approx(out["trace_cov_preconditioned"])


def test_escape_direction_from_lanczos_on_a_regression():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    Y = torch.randn(200, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    land = gp.Landscape(model, nn.MSELoss(), (X, Y))
    out = isotropy(land, lanczos_tol=1e-10)
    H = 2 * X.T @ X / 200
    evals, evecs = torch.linalg.eigh(H)
    assert out["lambda_min"] == pytest.approx(float(evals[0]), rel=FLOAT64_REL)
    assert out["lanczos_converged"] and out["hvps"] > 0
    G = PerExampleGradients(land).matrix()
    u = evecs[:, 0]
    expected = float((G @ u).var()) / (float(G.var(0).sum()) / 4)
    assert out["escape"] == pytest.approx(expected, rel=FLOAT64_REL)
    assert out["optimizer"] is None and out["isotropy_index_preconditioned"] is None


def test_chunked_pass_agrees_with_held_samples():
    model, batch, C = _known_noise(400, seed=5)
    land = gp.Landscape(model, _mean_output, batch)
    held = isotropy(land, u_min=None, max_samples=None)
    chunked = isotropy(land, u_min=None, max_samples=None, max_elements=D * 50)       # groups of 50 rows, two passes
    assert held["exact"] and not chunked["exact"] and chunked["passes"] == 2
    assert chunked["cv"] == pytest.approx(held["cv"], rel=FLOAT64_EXACT)
    assert chunked["trace_cov"] == pytest.approx(held["trace_cov"], rel=FLOAT64_EXACT)
    # Pooled per-group moments: unbiased too, noisier.
    gap = abs(chunked["isotropy_index"] - held["isotropy_index"])
    assert gap <= SIGMAS * (chunked["isotropy_index_err"] ** 2 + held["isotropy_index_err"] ** 2) ** 0.5
    assert abs(chunked["isotropy_index"] - isotropy_index(C)) <= SIGMAS * chunked["isotropy_index_err"]


def test_moment_estimators_equal_the_quadruple_u_statistics():
    X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2.0
    t1, t1sq, t2 = trace_moments(X @ X.T)
    quads = list(itertools.permutations(range(8), 4))
    u2 = sum(float((X[p] - X[q]) @ (X[r] - X[s])) ** 2 for p, q, r, s in quads) / (4 * len(quads))
    u1 = sum(float(((X[p] - X[q]) ** 2).sum() * ((X[r] - X[s]) ** 2).sum()) for p, q, r, s in quads) / (4 * len(quads))
    assert t2 == pytest.approx(u2, rel=FLOAT64_EXACT) and t1sq == pytest.approx(u1, rel=FLOAT64_EXACT)
    assert t1 == pytest.approx(float(torch.cov(X.T).trace()), rel=FLOAT64_EXACT)


def test_isotropy_estimate_is_unbiased_where_the_naive_pair_formula_is_not():
    """Isotropic noise, d = 1000 from P = 50 samples: centering by the sample mean biases the pair formula
    Σ_{p≠q}(ξ_pᵀξ_q)²/(P(P−1)) for tr C² by (1 − 2/P + 2/P²) + d/P² − 1 ≈ +36 % (Gaussian)."""
    g = torch.Generator().manual_seed(1)
    ours, naive = [], []
    for _ in range(30):
        X = torch.randn(50, 1000, generator=g, dtype=torch.float64)
        t2 = trace_moments(X @ X.T)[2]
        ours.append(t2 / 1000)                        # tr C² / d = 1 for C = I
        xi = X - X.mean(0)
        K = xi @ xi.T
        naive.append(float((K**2).sum() - (K.diagonal() ** 2).sum()) / (50 * 49) / 1000)
    assert abs(sum(ours) / 30 - 1.0) < 0.05
    assert abs(sum(naive) / 30 - 1.36) < 0.05


def test_isotropy_index_and_jackknife_helpers():
    assert isotropy_index(torch.eye(5)) == pytest.approx(1.0)
    assert isotropy_index(torch.diag(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(1 / 3)
    assert jackknife_se([1.0, None, 2.0]) is None
    with pytest.raises(gp.ConfigurationError, match="square covariance matrix"):
        isotropy_index(torch.ones(2, 3))
    with pytest.raises(gp.ConfigurationError, match="at least 4 samples"):
        trace_moments(torch.eye(3))


def test_bad_inputs_raise_clear_errors():
    model, batch, _ = _known_noise(20)
    land = gp.Landscape(model, _mean_output, batch)
    with pytest.raises(gp.ConfigurationError, match="at least 32 samples, got 20"):
        isotropy(land, u_min=None)
    model, batch, _ = _known_noise(40)
    land = gp.Landscape(model, _mean_output, batch)
    with pytest.raises(gp.ConfigurationError, match=f"u_min must have d = {D} entries, got 3"):
        isotropy(land, u_min=torch.ones(3))
    with pytest.raises(gp.ConfigurationError, match="u_min must be a vector, 'lanczos' or None"):
        isotropy(land, u_min="smallest")
    with pytest.raises(gp.ConfigurationError, match="nonzero, finite"):
        isotropy(land, u_min=torch.zeros(D))
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(gp.OptimizerStateError, match="optimizer.step"):
        isotropy(land, optimizer=fresh, u_min=None)


def test_escape_direction_with_the_basis_where_the_memory_plan_puts_it():
    # the plan may put Lanczos' basis in host memory or bound it; the escape direction must not change
    g = torch.Generator().manual_seed(5)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 12, dtype=torch.float64)
    Y = torch.randn(200, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(12, 1, bias=False).double()
    land = gp.Landscape(model, nn.MSELoss(), (X, Y))
    lam = float(torch.linalg.eigvalsh(2 * X.T @ X / 200)[0])
    plain = isotropy(land, lanczos_tol=1e-10)
    for kw in ({"basis_device": "cpu"}, {"max_basis": 6}):
        out = isotropy(land, lanczos_tol=1e-10, **kw)
        assert out["lambda_min"] == pytest.approx(lam, rel=FLOAT64_REL), kw
        assert out["escape"] == pytest.approx(plain["escape"], rel=1e-6), kw
