"""saddle: the flag of docs/metrics.md#saddle on quadratics whose gradient and spectrum are known."""

import json

import pytest
import torch
from quadratic_models import Quadratic, indefinite, landscape, spd, with_spectrum, within
from tolerances import FLOAT64_REL

from geomprobe import ConfigurationError, NonFiniteLossError
from geomprobe.metrics import get, saddle
from geomprobe.metrics.saddle import curvature_verdict

F64 = torch.float64


def _at(A: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Quadratic:
    return Quadratic(A, [len(w) // 2, len(w) - len(w) // 2], b=b, w=w)


def _stationary(A: torch.Tensor, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(A.shape[0], generator=g, dtype=F64)
    return _at(A, torch.linalg.solve(A, b), b)


def test_stationary_point_with_negative_curvature_is_a_saddle():
    A = indefinite(30, neg=5, seed=1)
    model = _stationary(A)
    out = saddle(landscape(model), grad_norm0=1.0)
    ev = torch.linalg.eigvalsh(A)
    assert out["saddle"] == "yes" and out["flag"] and out["grad_small"]
    assert out["negative_curvature"] == "yes" and out["converged"]
    assert within(out["lambda_min"], float(ev[0]), out["lambda_min_err"], rel=FLOAT64_REL, scale=float(ev.abs().max()))
    assert out["eps_h"] == pytest.approx(1e-3 * out["lambda_max"]) and out["eps_g"] == 1e-3
    assert out["grad_norm"] == pytest.approx(float(model.gradient().norm()), abs=1e-10)
    json.dumps(out, allow_nan=False)


def test_large_gradient_is_not_a_saddle():
    A = indefinite(30, neg=5, seed=1)
    w = torch.ones(30, dtype=F64)
    model = _at(A, w, torch.zeros(30, dtype=F64))
    g0 = float(model.gradient().norm())
    out = saddle(landscape(model), grad_norm0=g0)
    assert out["saddle"] == "no" and not out["flag"] and not out["grad_small"]
    assert out["negative_curvature"] == "yes" and out["eps_g"] == pytest.approx(1e-3 * g0)
    assert out["grad_norm0_source"] == "given"


def test_minimum_is_not_a_saddle():
    out = saddle(landscape(_stationary(spd(30, seed=2))), grad_norm0=1.0)
    assert out["saddle"] == "no" and out["negative_curvature"] == "no" and out["lambda_min"] > 0


def test_unresolved_curvature_is_uncertain():
    # lambda_min = -2 eps_H hides below a bulk; three Lanczos steps cannot certify it either way.
    e = torch.cat([torch.tensor([-0.02], dtype=F64), torch.linspace(0.01, 1.0, 58, dtype=F64),
                   torch.tensor([10.0], dtype=F64)])
    model = _stationary(with_spectrum(e, seed=3))
    out = saddle(landscape(model), grad_norm0=1.0, max_iter=3)
    assert not out["converged"]
    assert out["negative_curvature"] == "uncertain" and out["saddle"] == "uncertain" and not out["flag"]
    # given enough steps the same point is certified
    assert saddle(landscape(model), grad_norm0=1.0)["saddle"] == "yes"


def test_without_a_reference_the_current_gradient_is_used():
    A = indefinite(20, neg=3, seed=4)
    model = _at(A, torch.ones(20, dtype=F64), torch.zeros(20, dtype=F64))
    out = saddle(landscape(model))
    assert out["grad_norm0_source"] == "current" and out["grad_norm0"] == out["grad_norm"]
    assert out["eps_g"] == pytest.approx(1e-3 * out["grad_norm"]) and out["saddle"] == "no"


def test_explicit_thresholds_override_the_defaults():
    A = indefinite(20, neg=3, seed=4)
    model = _at(A, torch.full((20,), 1e-3, dtype=F64), torch.zeros(20, dtype=F64))
    out = saddle(landscape(model), eps_g=1.0, eps_h=0.1)
    assert out["eps_g"] == 1.0 and out["eps_h"] == 0.1 and out["saddle"] == "yes"


def test_curvature_verdict_takes_the_bound_into_account():
    assert curvature_verdict(-1.0, 0.5, 0.5, True) == "yes"        # -1 + 0.5 <= -0.5
    assert curvature_verdict(-1.0, 0.6, 0.5, True) == "uncertain"
    assert curvature_verdict(-0.4, 0.05, 0.5, True) == "no"
    assert curvature_verdict(-0.4, 0.05, 0.5, False) == "uncertain"


def test_bad_reference_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="grad_norm0 must be a finite number >= 0, got -1.0"):
        saddle(landscape(_stationary(spd(6))), grad_norm0=-1.0)


def test_non_finite_loss_is_a_clear_error():
    with pytest.raises(NonFiniteLossError, match="loss on probe batch 0 is nan"):
        saddle(landscape(Quadratic(spd(4), [4], w=torch.full((4,), float("nan")))))


def test_registered_with_its_cost():
    m = get("saddle")
    assert m.fn is saddle and "HVP" in m.cost
