"""The direction metric against dense float64 computations, its reuse of spectrum's Ritz vectors, and views and
the direction metric inside a GeometryProbe: the last step it sees is the optimizer's, training is bit-identical,
plane grids go to sidecars and ``report --png`` draws them."""

import pytest
import torch
from click.testing import CliRunner
from quadratic_models import Quadratic, landscape, spd
from reference import dense_hessian, make_case
from test_probe import BNDropNet, data
from torch.func import functional_call

import geomprobe as gp
from geomprobe import Landscape
from geomprobe.cli.main import cli
from geomprobe.errors import ConfigurationError
from geomprobe.metrics import direction, registry, spectrum
from geomprobe.probe.warm_start import WarmStart
from geomprobe.report import view_entries

F64 = torch.float64


def loss_at(land, flat):
    params = dict(zip(land.param_names, land.space.split(flat)))
    total = 0.0
    for b, (x, y) in enumerate(land.batches):
        with land.frozen(b):
            total += float(land.loss_fn(functional_call(land.model, params, (x,)), y)) * land.weights[b]
    return total


def test_direction_matches_dense_float64():
    model, loss_fn, batches, mode = make_case("tanh_mlp")
    land = Landscape(model, loss_fn, batches, mode=mode)
    H = dense_hessian(model, loss_fn, batches, mode=mode)
    evals, evecs = torch.linalg.eigh(H)
    g = land.grad
    u = 0.05 * torch.randn(land.dim, dtype=F64, generator=torch.Generator().manual_seed(3))
    out = direction(land, k=3, tol=1e-10, last_update=u)
    assert out["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-9)
    assert out["grad_curvature"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10)
    assert out["grad_curvature_ratio"] == pytest.approx(float(g @ H @ g / (g @ g)) / float(evals[-1]), rel=1e-9)
    share = float(((evecs[:, -3:].T @ g) ** 2).sum() / (g @ g))
    assert out["grad_top_share"] == pytest.approx(share, rel=1e-7)
    uHu = float(u @ H @ u)
    assert out["update_curvature"] == pytest.approx(uHu / float(u @ u), rel=1e-10)
    assert out["update_grad_cosine"] == pytest.approx(float(g @ u / (g.norm() * u.norm())), rel=1e-10)
    assert out["predicted_change"] == pytest.approx(float(g @ u) - 0.5 * uHu, rel=1e-10)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    actual = land.loss - loss_at(land, theta - u)
    assert out["actual_change"] == pytest.approx(actual, rel=1e-12)
    # a network is not quadratic: the remainder is third order in the step (half the step, ~1/8 the error)
    half = direction(land, k=3, tol=1e-10, last_update=u / 2)
    assert 5 < out["quadratic_error"] / half["quadratic_error"] < 11
    assert out["forwards"] == 2 and out["update"] == "measured"


def test_on_a_quadratic_the_predicted_change_is_the_actual_one():
    d = 10
    g = torch.Generator().manual_seed(1)
    model = Quadratic(spd(d, seed=1), [4, 6], b=torch.randn(d, generator=g, dtype=F64),
                      w=torch.randn(d, generator=g, dtype=F64))
    land = landscape(model)
    out = direction(land, last_update=torch.randn(d, generator=g, dtype=F64), tol=1e-10)
    assert abs(out["quadratic_error"]) <= 1e-10 * max(1.0, abs(out["actual_change"]))


def test_direction_reuses_spectrums_ritz_vectors_and_reports_a_missing_update():
    model, loss_fn, batches, mode = make_case("tanh_mlp")
    land = Landscape(model, loss_fn, batches, mode=mode)
    spec = spectrum(land, k=2, tol=1e-8, warm=WarmStart())
    before = land.hvps
    out = direction(land, k=2)
    assert out["hvps"] == land.hvps - before == 1  # the gradient's HVP only: no Lanczos, no update given
    assert out["top"] == spec["top"]
    assert out["update"].startswith("no last update") and out["update_curvature"] is None
    plan = registry.get("direction").plan({}, registry.PlanContext(land.dim, land.blocks))
    assert plan.hvps >= 2 and not plan.exact
    with pytest.raises(ConfigurationError, match="last_update has shape"):
        direction(land, last_update=torch.ones(3, dtype=F64))


def _loop(probe_kwargs=None, steps=12):
    """A training loop with the probe attached; returns the model, the optimizer, the probe and the steps taken."""
    torch.manual_seed(0)
    model = BNDropNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = data()
    probe = None
    if probe_kwargs is not None:
        probe = gp.GeometryProbe(model, torch.nn.CrossEntropyLoss(), (X[:32], y[:32]), **probe_kwargs)
        probe.attach(opt)
    steps_taken = []
    for _ in range(steps):
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        idx = torch.randint(0, 96, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        steps_taken.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before)
    if probe is not None:
        probe.close()
    return model, opt, probe, steps_taken


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_training_is_bit_identical_with_views_and_direction_attached(tmp_path, mode):
    metrics = {"spectrum": {"k": 2, "max_iter": 30}, "direction": {"k": 2, "max_iter": 30},
               "view_line": {"direction": "update", "points": 5},
               "view_plane": {"u": "top", "v": "random", "points": [9, 9], "max_iter": 30}}
    ref_model, ref_opt, _, ref_steps = _loop()
    model, opt, probe, steps = _loop(dict(metrics=metrics, schedule=gp.every(4), run_dir=tmp_path / "run", mode=mode))
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for (_, sa), (_, sb) in zip(ref_opt.state_dict()["state"].items(), opt.state_dict()["state"].items()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ref_model.parameters(), model.parameters()))
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert all("errors" not in r for r in records), [r.get("errors") for r in records]
    # step 0 comes before any optimizer step: the update view is skipped, the metric says why
    assert "view_line" in records[0]["skipped"] and records[0]["direction"]["update_norm"] is None
    for r in records[1:]:
        step = steps[r["step"] - 1]  # the optimizer step that led to this probe
        assert r["direction"]["update_norm"] == pytest.approx(float(step.norm()), rel=1e-6)
        assert r["view_line"]["norm"] == pytest.approx(float(step.norm()), rel=1e-6)
        assert r["direction"]["hvps"] == 2  # spectrum's Ritz vectors were reused
        assert r["view_plane"]["loss"]["$array"].startswith("arrays/")  # 81 grid points: a sidecar
    views = view_entries(tmp_path / "run")
    assert [(s, k) for s, k, _ in views][:3] == [(0, "view_plane"), (4, "view_line"), (4, "view_plane")]
    assert views[0][2]["loss"].shape == (9, 9)
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run"), "--png", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r-views.png").read_bytes()[:4] == b"\x89PNG"


def test_a_probe_without_direction_or_views_installs_no_step_hook():
    model, opt, probe, _ = _loop(dict(metrics=["spectrum"], schedule=gp.every(100)), steps=1)
    assert probe._updates is None and not opt._optimizer_step_pre_hooks
    model, opt, probe, _ = _loop(dict(metrics=["direction"], schedule=gp.every(100)), steps=1)
    assert not opt._optimizer_step_pre_hooks  # removed at close
