"""precond: P^{1/2} H P^{1/2} from real optimizer state, against the dense float64 computation."""

import copy
import json

import pytest
import torch
from quadratic_models import Quadratic, exact_rmed, indefinite, landscape, spd, within
from tolerances import FLOAT64_EXACT, FLOAT64_REL

from geomprobe import ConfigurationError, OptimizerStateError
from geomprobe.metrics import get, precond
from geomprobe.metrics.precond import optimizer_preconditioner

F64 = torch.float64
SIZES = [25, 15]


def _model(A: torch.Tensor | None = None, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    A = spd(40, seed=seed) if A is None else A
    return Quadratic(A, SIZES, b=torch.randn(40, generator=g, dtype=F64), w=torch.randn(40, generator=g, dtype=F64))


def _train(model: Quadratic, opt: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    """Plain training steps; returns the flat gradient of each step (what the state was built from)."""
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        model().backward()
        grads.append(torch.cat([model.w0.grad, model.w1.grad]).clone())
        opt.step()
    return grads


def _check_against_dense(out: dict, A: torch.Tensor, p: torch.Tensor) -> None:
    s = p.sqrt()
    M = s[:, None] * A * s[None, :]
    ev, raw_ev = torch.linalg.eigvalsh(M), torch.linalg.eigvalsh(A)
    for key, ref, e in (("", ev, ev), ("raw_", raw_ev, raw_ev)):
        scale = float(e.abs().max())
        for end, i in (("max", -1), ("min", 0)):
            est, err = out[f"{key}lambda_{end}"], out[f"{key}lambda_{end}_err"]
            assert within(est, float(ref[i]), err, rel=FLOAT64_REL, scale=scale)
    assert out["rmed"] == pytest.approx(exact_rmed(torch.diagonal(M))[0], rel=FLOAT64_REL)
    assert out["raw_rmed"] == pytest.approx(exact_rmed(torch.diagonal(A))[0], rel=FLOAT64_REL)
    assert out["blocks"]["w1"]["rmed"] == pytest.approx(exact_rmed(torch.diagonal(M)[25:])[0], rel=FLOAT64_REL)
    assert out["converged"] and out["rmed_exact"]


def test_adam_state_equals_the_dense_computation():
    model = _model(indefinite(40, neg=6, seed=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    grads = _train(model, opt, 3)
    # v_t = b2 v_{t-1} + (1 - b2) g_t^2, bias-corrected by 1 - b2^t: the state rebuilt from the gradients
    v = torch.zeros(40, dtype=F64)
    for g in grads:
        v = 0.99 * v + 0.01 * g**2
    p = 1 / ((v / (1 - 0.99**3)).sqrt() + 1e-6)
    out = precond(landscape(model), optimizer=opt, tol=1e-8)
    _check_against_dense(out, model.dense_hessian(), p)
    assert out["optimizer"] == "Adam" and "bias-corrected" in out["source"]
    assert out["p_max"] == pytest.approx(float(p.max()), rel=FLOAT64_REL)
    json.dumps(out, allow_nan=False)


def test_state_is_matched_by_identity_not_order():
    model = _model()
    opt = torch.optim.AdamW([model.w1, model.w0], lr=1e-2, amsgrad=True)   # reversed order, amsgrad
    _train(model, opt, 2)
    p_list, _ = optimizer_preconditioner(opt, [model.w0, model.w1])
    for w, p in zip((model.w0, model.w1), p_list):
        st = opt.state[w]
        expected = 1 / ((st["max_exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))).sqrt() + 1e-8)
        torch.testing.assert_close(p, expected, rtol=FLOAT64_EXACT, atol=0)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_state(centered):
    model = _model()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, centered=centered)
    grads = _train(model, opt, 3)
    sq, mean = torch.zeros(40, dtype=F64), torch.zeros(40, dtype=F64)
    for g in grads:
        sq = 0.99 * sq + 0.01 * g**2
        mean = 0.99 * mean + 0.01 * g
    avg = sq - mean**2 if centered else sq
    p = 1 / (avg.sqrt() + 1e-8)
    out = precond(landscape(model), optimizer=opt, tol=1e-8)
    _check_against_dense(out, model.dense_hessian(), p)


def test_adagrad_state():
    model = _model()
    opt = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    grads = _train(model, opt, 2)
    p = 1 / (sum(g**2 for g in grads).sqrt() + 1e-10)
    _check_against_dense(precond(landscape(model), optimizer=opt, tol=1e-8), model.dense_hessian(), p)


def test_sgd_is_the_identity_even_before_a_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = precond(landscape(model), optimizer=opt, tol=1e-8)
    _check_against_dense(out, model.dense_hessian(), torch.ones(40, dtype=F64))
    assert out["p_min"] == out["p_max"] == 1.0 and out["source"] == "SGD: identity"


def test_a_preconditioner_method_is_used():
    class Diagonal(torch.optim.SGD):
        """Any optimizer exposing preconditioner(): here a dict keyed by parameter."""

        def preconditioner(self):
            return {p: torch.full_like(p, 0.5 if i else 2.0) for i, p in enumerate(self.param_groups[0]["params"])}

    model = _model()
    out = precond(landscape(model), optimizer=Diagonal(model.parameters(), lr=0.1), tol=1e-8)
    p = torch.cat([torch.full((25,), 2.0, dtype=F64), torch.full((15,), 0.5, dtype=F64)])
    _check_against_dense(out, model.dense_hessian(), p)
    assert out["source"] == "Diagonal.preconditioner()"


def test_trust_region_ellipsoid():
    optim = pytest.importorskip("geomprobe.optim")
    model = _model()
    opt = optim.EllipsoidalTR(model.parameters(), ellipsoid="rmsprop")
    with pytest.raises(OptimizerStateError, match="no step yet"):
        precond(landscape(model), optimizer=opt)
    opt.step(model)
    p = torch.cat([t.reshape(-1) for t in opt.preconditioner()]).double()
    _check_against_dense(precond(landscape(model), optimizer=opt, tol=1e-8), model.dense_hessian(), p)


def test_subset_of_parameters():
    model = _model()
    opt = torch.optim.Adagrad(model.parameters())
    grads = _train(model, opt, 1)
    out = precond(landscape(model, params="w1"), optimizer=opt, tol=1e-8)
    p = 1 / (grads[0][25:].abs() + 1e-10)
    A = model.dense_hessian()[25:, 25:]
    M = p.sqrt()[:, None] * A * p.sqrt()[None, :]
    assert out["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(M)[-1]), rel=FLOAT64_REL)
    assert list(out["blocks"]) == ["w1"]


def test_reading_the_state_changes_nothing():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    precond(landscape(model), optimizer=opt, rmed=False)
    after = opt.state_dict()
    assert before["param_groups"] == after["param_groups"] and before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        for key, t in before["state"][k].items():
            assert torch.equal(t, after["state"][k][key])


# ------------------------------------------------------------------------------------------- errors
def test_adam_without_state_is_a_clear_error():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(OptimizerStateError, match="Adam has no 'exp_avg_sq' state for parameter 'w0' yet.*first "
                                                  "optimizer.step"):
        precond(landscape(model), optimizer=opt)
    assert len(opt.state) == 0          # asking created no state entry


def test_adagrad_before_a_step_is_a_clear_error():
    model = _model()
    with pytest.raises(OptimizerStateError, match="Adagrad has no step taken for parameter 'w0'"):
        precond(landscape(model), optimizer=torch.optim.Adagrad(model.parameters()))


def test_parameter_outside_the_optimizer_is_a_clear_error():
    model = _model()
    opt = torch.optim.SGD([model.w0], lr=0.1)
    with pytest.raises(OptimizerStateError, match="parameter 'w1' is not in SGD's param_groups.*params="):
        precond(landscape(model), optimizer=opt)


def test_unknown_optimizer_is_a_clear_error():
    model = _model()
    with pytest.raises(OptimizerStateError, match="no preconditioner is known for LBFGS; supported: Adam"):
        precond(landscape(model), optimizer=torch.optim.LBFGS(model.parameters()))


def test_missing_optimizer_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="precond needs the optimizer.*optimizer=opt"):
        precond(landscape(_model()))


def test_non_positive_preconditioner_is_a_clear_error():
    class Broken(torch.optim.SGD):
        def preconditioner(self):
            return [torch.zeros_like(p) for p in self.param_groups[0]["params"]]

    model = _model()
    with pytest.raises(OptimizerStateError, match="not positive and finite for 'w0'"):
        precond(landscape(model), optimizer=Broken(model.parameters(), lr=0.1))


def test_no_selected_block_is_a_clear_error():
    model = _model()
    with pytest.raises(ConfigurationError, match="no parameter block matches blocks=\\['enc\\*'\\]"):
        precond(landscape(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), blocks="enc*")


def test_registered_as_needing_the_optimizer():
    m = get("precond")
    assert m.fn is precond and m.needs == frozenset({"optimizer"}) and "HVP" in m.cost


def test_raw_spectrum_is_shared_with_the_spectrum_metric_on_one_landscape():
    # a probe measuring spectrum and precond runs the raw Lanczos once; the values are the same either way
    from geomprobe.metrics import spectrum

    model = _model(indefinite(40, neg=6, seed=3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    land = landscape(model)
    first = spectrum(land, tol=1e-8)
    before = land.hvps
    out = precond(land, optimizer=opt, tol=1e-8, rmed=False)
    assert out["raw_lambda_max"] == first["lambda_max"] and out["raw_lambda_min"] == first["lambda_min"]
    assert out["hvps"] == land.hvps - before < 2 * first["hvps"]  # only the preconditioned run was paid for
    again = spectrum(land, tol=1e-8)
    assert again["hvps"] == 0 and again["lambda_max"] == first["lambda_max"]
    alone = precond(landscape(model), optimizer=opt, tol=1e-8, rmed=False)  # a fresh Landscape pays for both
    assert alone["raw_lambda_max"] == first["lambda_max"] and alone["hvps"] > out["hvps"]
