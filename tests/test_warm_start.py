"""Warm starts: Lanczos from the previous probe's Ritz vectors certifies what a cold start does, in fewer HVPs."""

import pytest
import torch
from reference import TanhMLP, dense_hessian
from tolerances import FLOAT64_EXACT
from torch import nn

import geomprobe as gp
from geomprobe.metrics import spectrum
from geomprobe.metrics.spectrum import run_lanczos
from geomprobe.probe.warm_start import WarmStart


def regression_data(n=64, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=g)


def trajectory(steps, every, seed=0):
    """(model, probe batch) after each block of ``every`` SGD steps of a float64 tanh MLP: a real trajectory."""
    torch.manual_seed(seed)
    model = TanhMLP().double()
    X, y = regression_data(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps + 1):
        if step % every == 0:
            yield model, loss_fn, (X, y)
        idx = torch.randint(0, len(y), (16,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()


def covers(value, err, truth):
    # the residual bound says some eigenvalue lies within err of value; rounding of float64 HVPs aside
    return abs(value - truth) <= err + FLOAT64_EXACT * max(1.0, abs(truth))


@pytest.mark.parametrize("k", [1, 2])
def test_warm_and_cold_intervals_both_cover_the_dense_spectrum_along_a_trajectory(k):
    warm = WarmStart()
    started = []
    for model, loss_fn, batch in trajectory(steps=30, every=5):
        evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, [batch]))
        top_true, bottom_true = evals.flip(0)[:k].tolist(), evals[:k].tolist()
        cold = spectrum(gp.Landscape(model, loss_fn, batch), k=k, tol=1e-4)
        for out in (cold, spectrum(gp.Landscape(model, loss_fn, batch), k=k, tol=1e-4, warm=warm)):
            assert out["converged"]
            assert all(covers(v, e, t) for v, e, t in zip(out["top"], out["top_err"], top_true)), out
            assert all(covers(v, e, t) for v, e, t in zip(out["bottom"], out["bottom_err"], bottom_true)), out
        started.append(out["warm"])
    assert started == [False] + [True] * (len(started) - 1)


def test_a_new_outlier_orthogonal_to_the_kept_vectors_is_still_found():
    # H = 2 X^T X / n with a known spectrum; the kept vectors are the 2nd largest and 2nd smallest
    # eigenvectors, orthogonal to the true extremes: only the random component of the start can find them.
    d = 40
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    lam = torch.cat([torch.tensor([0.01]), torch.linspace(1.0, 2.0, d - 2, dtype=torch.float64), torch.tensor([50.0])])
    X = (Q * lam.sqrt()) @ Q.T * (d / 2) ** 0.5  # 2 X^T X / d = Q diag(lam) Q^T
    model = nn.Linear(d, 1, bias=False).double()
    land = gp.Landscape(model, nn.MSELoss(), (X, torch.zeros(d, 1, dtype=torch.float64)))
    warm = WarmStart()
    warm.keep(land, Q[:, -2:-1].T.clone(), Q[:, 1:2].T.clone())
    out = spectrum(land, tol=1e-8, warm=warm)
    assert out["warm"] and out["converged"]
    assert covers(out["lambda_max"], out["lambda_max_err"], 50.0)
    assert covers(out["lambda_min"], out["lambda_min_err"], 0.01)


def test_warm_starts_cost_about_what_cold_starts_cost_once_the_extremes_are_certified():
    # On the residual rule alone warm starts saved a fifth of the HVPs here (0.8x); they converge the known
    # Ritz values sooner, but certifying that nothing lies beyond them needs the Krylov space to resolve the
    # spectrum's edges whatever the start, and only the start's random part (weight mix) counts towards it.
    # Measured: 590 HVPs warm against 551 cold over 20 probes (both ends, tol 1e-3).
    warm = WarmStart()
    cold_hvps, warm_hvps, resid_cold, resid_warm = [], [], [], []
    resid_start = WarmStart()
    for model, loss_fn, batch in trajectory(steps=40, every=2):
        cold_hvps.append(spectrum(gp.Landscape(model, loss_fn, batch))["hvps"])
        warm_hvps.append(spectrum(gp.Landscape(model, loss_fn, batch), warm=warm)["hvps"])
        resid_cold.append(spectrum(gp.Landscape(model, loss_fn, batch), risk=None)["hvps"])
        resid_warm.append(spectrum(gp.Landscape(model, loss_fn, batch), warm=resid_start, risk=None)["hvps"])
    # the first start is cold either way
    assert warm_hvps[0] == cold_hvps[0]
    assert sum(warm_hvps[1:]) < 1.1 * sum(cold_hvps[1:]), (cold_hvps, warm_hvps)
    assert sum(resid_warm[1:]) < 0.8 * sum(resid_cold[1:]), (resid_cold, resid_warm)


def test_the_auto_policy_spends_what_the_cheaper_start_costs_along_a_trajectory():
    # certified: the auto policy's run is the seeded cold run itself (the same HVPs to the one), and forced
    # warm starts cost more; residual bounds only: the auto policy starts warm and saves a fifth or more
    auto, forced = WarmStart(certified=False), WarmStart(certified=True)
    resid_auto = WarmStart(certified=False)
    cold, via_auto, via_forced, resid_cold, resid_warm = [], [], [], [], []
    for model, loss_fn, batch in trajectory(steps=40, every=2):
        cold.append(spectrum(gp.Landscape(model, loss_fn, batch))["hvps"])
        out = spectrum(gp.Landscape(model, loss_fn, batch), warm=auto)
        assert out["warm"] is False and out["converged"] and out["extreme_certified"]
        via_auto.append(out["hvps"])
        via_forced.append(spectrum(gp.Landscape(model, loss_fn, batch), warm=forced)["hvps"])
        resid_cold.append(spectrum(gp.Landscape(model, loss_fn, batch), risk=None)["hvps"])
        out = spectrum(gp.Landscape(model, loss_fn, batch), warm=resid_auto, risk=None)
        resid_warm.append(out["hvps"])
    assert via_auto == cold
    assert sum(via_forced[1:]) > sum(via_auto[1:]), (via_auto, via_forced)
    assert sum(resid_warm[1:]) < 0.8 * sum(resid_cold[1:]), (resid_cold, resid_warm)
    assert auto.top is None and resid_auto.top is not None  # kept only where a start will use them


def test_vectors_live_on_the_host_in_the_model_dtype_and_leave_the_global_rng_alone():
    model, loss_fn, batch = next(trajectory(steps=0, every=1))
    model = model.float()
    land = gp.Landscape(model, loss_fn, (batch[0].float(), batch[1]))
    warm = WarmStart(max_vectors=2)
    rng = torch.get_rng_state()
    spectrum(land, k=3, warm=warm)
    spectrum(land, k=3, warm=warm)
    assert torch.equal(rng, torch.get_rng_state())
    for kept in (warm.top, warm.bottom):
        assert kept.device.type == "cpu" and kept.dtype == torch.float32 and kept.shape == (1, land.dim)
        assert kept.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_another_model_or_other_shapes_fall_back_to_a_cold_start():
    model, loss_fn, batch = next(trajectory(steps=0, every=1))
    warm = WarmStart()
    spectrum(gp.Landscape(model, loss_fn, batch), warm=warm)
    twin = TanhMLP().double()  # same shapes, another model
    out = spectrum(gp.Landscape(twin, loss_fn, batch), warm=warm)
    assert not out["warm"] and "another model" in warm.reason
    # vectors kept for twin now; the same model with only part of its parameters selected is another space
    out = spectrum(gp.Landscape(twin, loss_fn, batch, params="net.0.*"), warm=warm)
    assert not out["warm"] and "shape" in warm.reason
    assert spectrum(gp.Landscape(twin, loss_fn, batch, params="net.0.*"), warm=warm)["warm"]


def test_the_lanczos_cache_never_mixes_warm_and_cold_runs():
    runs = trajectory(steps=5, every=5)
    model, loss_fn, batch = next(runs)
    warm = WarmStart()
    land = gp.Landscape(model, loss_fn, batch)
    first = spectrum(land, warm=warm)  # cold: the seeded run, stored for other metrics
    assert not first["warm"] and len(land.results) == 1
    (kept,) = land.results.values()
    cached = kept.value
    assert kept.source == "spectrum" and kept.hvps == first["hvps"]  # who computed it, for what
    assert cached.basis is None  # Ritz vectors were taken; the basis is not kept
    fresh = run_lanczos(gp.Landscape(model, loss_fn, batch))
    assert torch.equal(cached.ritz_values, fresh.ritz_values)
    model, loss_fn, batch = next(runs)
    land = gp.Landscape(model, loss_fn, batch)
    out = spectrum(land, warm=warm)
    assert out["warm"] and land.results == {}  # a warm run is never stored
    before = land.hvps
    cold = spectrum(land)
    assert land.hvps - before == cold["hvps"] > 0  # the cold request ran its own Lanczos
    assert spectrum(land)["hvps"] == 0  # and a second one reuses that cold run


def test_bad_warm_start_options_are_refused_with_the_fix():
    with pytest.raises(gp.ConfigurationError, match="mix must lie in"):
        WarmStart(mix=0.0)
    with pytest.raises(gp.ConfigurationError, match="max_vectors must be >= 1"):
        WarmStart(max_vectors=0)
    model, loss_fn, batch = next(trajectory(steps=0, every=1))
    with pytest.raises(gp.ConfigurationError, match="warm must be a geomprobe.probe.WarmStart"):
        spectrum(gp.Landscape(model, loss_fn, batch), warm=True)


def test_the_probe_records_warm_starts_and_can_turn_them_off():
    def probe_run(**kwargs):
        points = trajectory(steps=10, every=5)
        model, loss_fn, batch = next(points)  # the same model object moves along the trajectory
        probe = gp.GeometryProbe(model, loss_fn, batch, **kwargs)
        records = [probe.probe(0)] + [probe.probe(i) for i, _ in enumerate(points, 1)]
        return probe, records

    # the default ("auto"): certified runs start cold, and say why; residual-bound runs start warm
    probe, records = probe_run()
    assert [r["spectrum"]["warm"] for r in records] == [False, False, False]
    assert all("certifies its extremes" in r["spectrum"]["cold_because"] for r in records[1:])
    assert isinstance(probe.warm, WarmStart) and not probe.warm.certified
    probe, records = probe_run(metrics={"spectrum": {"risk": None}})
    assert [r["spectrum"]["warm"] for r in records] == [False, True, True]
    probe, records = probe_run(warm_start=True)
    assert [r["spectrum"]["warm"] for r in records] == [False, True, True] and probe.warm.certified
    with pytest.raises(gp.ConfigurationError, match="warm_start must be 'auto', True or False"):
        probe_run(warm_start="yes")
    probe, records = probe_run(warm_start=False)
    assert probe.warm is None and [r["spectrum"]["warm"] for r in records] == [False, False, False]
    # precond's raw spectrum is spectrum's cold run for free: no warm start for spectrum then
    probe, records = probe_run(metrics=["spectrum", "precond"], optimizer=torch.optim.SGD(TanhMLP().parameters(), lr=0.1))
    assert not any(r["spectrum"]["warm"] for r in records)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_the_vectors_stay_on_the_host_in_the_model_dtype(dtype):
    model, loss_fn, (X, y) = next(trajectory(steps=0, every=1))
    model = model.to("cuda", dtype)
    batch = (X.to("cuda", dtype), y.cuda())
    warm = WarmStart()
    first = spectrum(gp.Landscape(model, loss_fn, batch), tol=1e-2, warm=warm)
    assert warm.top.device.type == "cpu" and warm.top.dtype == dtype
    second = spectrum(gp.Landscape(model, loss_fn, batch), tol=1e-2, warm=warm)
    assert second["warm"] and not first["warm"]
    rounding = 16 * torch.finfo(dtype).eps * abs(first["lambda_max"])
    assert abs(first["lambda_max"] - second["lambda_max"]) <= first["lambda_max_err"] + second["lambda_max_err"] + rounding


def test_the_sharpness_alone_warm_and_cold_along_a_trajectory():
    # which="largest": lambda_max certified at tol in about half the HVPs of both ends, and warm starts
    # keep it covered in slightly fewer
    warm = WarmStart()
    both, cold, warmed = [], [], []
    for model, loss_fn, batch in trajectory(steps=40, every=4):
        top = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, [batch]))[-1])
        both.append(spectrum(gp.Landscape(model, loss_fn, batch), tol=1e-4)["hvps"])
        for out, seen in ((spectrum(gp.Landscape(model, loss_fn, batch), tol=1e-4, which="largest"), cold),
                          (spectrum(gp.Landscape(model, loss_fn, batch), tol=1e-4, which="largest", warm=warm),
                           warmed)):
            assert out["converged"] and out["which"] == "largest"
            assert covers(out["lambda_max"], out["lambda_max_err"], top), out
            seen.append(out["hvps"])
    assert sum(cold) < 0.7 * sum(both), (both, cold)
    # certified (see above), warm starts still save a little at one end: 141 against 149 HVPs
    assert sum(warmed[1:]) < sum(cold[1:]), (cold, warmed)
    print("HVPs per probe, both ends / largest cold / largest warm:", sum(both) / len(both),
          sum(cold) / len(cold), sum(warmed[1:]) / (len(warmed) - 1))
    with pytest.raises(gp.ConfigurationError, match="which must be"):
        spectrum(gp.Landscape(model, loss_fn, batch), which="middle")
