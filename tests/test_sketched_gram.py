"""Inner products measured from sign sketches (linalg/sketched_gram.py) and the Lanczos regime built on them
(linalg/measured_reorth.py): estimates and bounds against exact inner products, and a half-precision run with an
asymmetric product against its whole-basis run."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import geomprobe.linalg.measured_reorth as measured_reorth
from geomprobe.linalg.lanczos import lanczos
from geomprobe.linalg.measured_reorth import sketched_gram
from geomprobe.linalg.orthogonality import OrthogonalityEstimate
from geomprobe.linalg.sketched_gram import SKETCH_MAX, SignHashSketch, SketchedGram, sketch_size


def _pair(d: int, c: float, gen: torch.Generator, heavy: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors x, y with x^T y = c; with ``heavy`` > 0 both put most of their mass on the same ``heavy``
    entries (an eigenvector concentrated on a few parameters)."""
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    z = torch.randn(d, generator=gen, dtype=torch.float64)
    if heavy:
        x[:heavy] *= 200.0
        z[:heavy] *= 200.0
    x /= x.norm()
    z -= (z @ x) * x
    z /= z.norm()
    return x, c * x + math.sqrt(1 - c * c) * z


def test_sketch_size_powers_of_two_within_limits():
    assert sketch_size(1000) is None  # too short to sketch
    assert sketch_size(1 << 14) == 1 << 10
    assert sketch_size((1 << 20) + 5) == 1 << 16
    assert sketch_size(10**10) == SKETCH_MAX
    with pytest.raises(ValueError, match="too short"):
        SketchedGram(100)


@pytest.mark.parametrize("heavy", [0, 8])
def test_bounds_cover_exact_inner_products(heavy):
    """Over 300 pairs with known inner products (sketch seeds varied), the bound |estimate| + 4 sigma covers the
    truth in all but ~6e-5 of cases (allowed: 1 %), the estimate is unbiased, and sigma matches the spread of
    the estimates to 25 % (the variance estimate is unbiased)."""
    d, m = 1 << 16, 1 << 11
    gen = torch.Generator().manual_seed(7)
    errors, sigmas, misses = [], [], 0
    for t in range(300):
        c = [0.0, 0.003, -0.02, 0.3][t % 4]
        x, y = _pair(d, c, gen, heavy)
        gram = SketchedGram(d, m, seed=1000 + t)
        gram.push(x.float())
        est, bound = gram.measure(y.float())
        truth = float(x.float().double() @ y.float().double())
        errors.append(est[0] - truth)
        sigmas.append((bound[0] - abs(est[0])) / gram.z)
        misses += abs(truth) > bound[0]
    errors, sigmas = np.array(errors), np.array(sigmas)
    assert misses <= 3
    assert abs(errors.mean()) < 4 * errors.std() / math.sqrt(len(errors))
    assert 0.75 < errors.std() / math.sqrt(np.mean(sigmas**2)) < 1.25
    # spread vectors: sigma ~ 1 / sqrt(2 m); the shared heavy entries add no noise (signs square to one)
    assert np.median(sigmas) < 1.5 / math.sqrt(2 * m)


def test_sketch_is_reproducible_and_scales_linearly():
    d, m = 5000, 1024  # a tail shorter than the buckets
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float()
    sk = SignHashSketch(d, m, seed=3)
    a, b = sk.apply(v), sk.apply(v)
    assert torch.equal(a, b)
    assert torch.allclose(sk.apply(2.5 * v), 2.5 * a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(SignHashSketch(d, m, seed=4).apply(v), a)
    # each sketch preserves the squared norm in mean: ||s(v)||^2 within a few sigma of ||v||^2
    n2 = float(v.double() @ v.double())
    assert abs(float(a[0].double().square().sum()) / n2 - 1) < 6 * math.sqrt(2 / m)
    assert torch.equal(v, v.clone())  # (the input is only read)


def test_each_entry_gets_one_fair_independent_sign_per_sketch():
    # the sketch of a coordinate vector e_i is exactly +-1 in bucket i mod m of each sketch and 0 elsewhere; over
    # 4000 entries the signs are balanced and the two sketches' signs agree half the time (binomial, 4 sigma)
    d, m = 4000, 1024
    sk = SignHashSketch(d, m, seed=11)
    rows = torch.stack([sk.apply(e) for e in torch.eye(d)])  # (d, 2, m)
    idx = torch.arange(d)
    signs_at = rows[idx, :, idx % m]  # (d, 2)
    assert torch.equal(signs_at.abs(), torch.ones(d, 2))
    assert float(rows.abs().sum()) == 2 * d  # nothing outside each entry's own bucket
    half, sd = d / 2, math.sqrt(d) / 2
    for k in range(2):
        assert abs(float((signs_at[:, k] > 0).sum()) - half) < 4 * sd
    assert abs(float((signs_at[:, 0] == signs_at[:, 1]).sum()) - half) < 4 * sd
    # and linear: a vector's sketch is the sum of its entries' signed buckets
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sk.apply(v.float()).double(), torch.einsum("i,ikm->km", v, rows.double()), atol=1e-4)


def test_bad_input_says_what_was_wrong():
    gram = SketchedGram(1 << 14)
    with pytest.raises(ValueError, match="expected a vector of 16384"):
        gram.measure(torch.zeros(10))
    with pytest.raises(ValueError, match="positive finite norm"):
        gram.measure(torch.ones(1 << 14), 0.0)
    with pytest.raises(RuntimeError, match="needs a measure"):
        gram.push()
    with pytest.raises(ValueError, match="needs at least"):
        SignHashSketch(10, 64)


def test_only_half_precision_runs_sketch():
    d = 1 << 20
    assert sketched_gram(OrthogonalityEstimate(torch.float32, d), torch.float32, d, True) is None
    assert sketched_gram(OrthogonalityEstimate(torch.bfloat16, d), torch.bfloat16, d, False) is None
    assert sketched_gram(None, torch.bfloat16, d, True) is None
    ortho = OrthogonalityEstimate(torch.bfloat16, d)
    assert sketched_gram(ortho, torch.bfloat16, d, True) is not None


def _asymmetric_bf16(d: int, device: str = "cpu"):
    """A diagonal spectrum (outliers 40, 30, 25, 20 above a bulk in [-0.5, 1.5], -8 below) whose product is
    rounded to bf16 and carries an asymmetric rank-one error of 4e-3 (1e-4 of ||H||)."""
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(d, generator=g) * 2 - 0.5
    lam[:5] = torch.tensor([40.0, 30, 25, -8, 20])
    a = torch.randn(d, generator=g)
    b = torch.randn(d, generator=g)
    a, b = a / a.norm(), b / b.norm()
    lam, a, b = lam.to(device), a.to(device), b.to(device)

    def mv(v):
        x = v.float()
        return (lam * x + 4e-3 * a * (b @ x)).to(torch.bfloat16)

    return mv, lam


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_measured_regime_skips_passes_and_its_bounds_cover_the_basis(monkeypatch, device):
    """The same bf16 run with and without sketches: the measured one takes fewer whole-basis passes, every
    inner product of its stored basis lies within the bound it recorded, and its extremes are the whole-basis
    run's within the certified errors (which include the looser orthogonality's floor)."""
    d = 1 << 22
    mv, lam = _asymmetric_bf16(d, device)
    seen: list[OrthogonalityEstimate] = []
    real = measured_reorth.measured_step

    rows: list[int] = []

    def spy(gram, ortho, *args):
        if not seen:
            seen.append(ortho)
        out = real(gram, ortho, *args)
        if ortho.measured:
            rows.append(ortho.steps)  # the row this step wrote
        return out

    monkeypatch.setattr(importlib.import_module("geomprobe.linalg.lanczos"), "measured_step", spy)
    opts = dict(k=1, tol=1e-3, max_iter=40, dtype=torch.bfloat16, delayed=False, keep_basis=True, device=device)
    full = lanczos(mv, d, sketch=False, generator=torch.Generator().manual_seed(3), **opts)
    # on an accelerator the run sketches by default
    meas = lanczos(mv, d, sketch=None if device == "cuda" else True, generator=torch.Generator().manual_seed(3),
                   **opts)
    assert full.reorth_regime.startswith("whole-basis from step")
    assert meas.reorth_regime.startswith("sketched from step")
    assert meas.converged and full.converged
    assert meas.reorthogonalizations < full.reorthogonalizations
    Q = meas.basis[: meas.steps].double().cpu()
    G = (Q @ Q.T).abs()
    n = Q.shape[0]
    W = seen[0]._omega[:n, :n]
    assert rows
    for i in (i for i in rows if i < n):  # rows the measured regime wrote: each covers its true inner products
        assert (G[i, :i].numpy() <= W[i, :i] + 1e-6).all(), (i, G[i, :i].max(), W[i, :i].max())
    for r in (meas, full):
        top, bottom = r.top(1)[0][0], r.bottom(1)[0][0]
        e_min, e_max = r.extreme_err
        # the symmetric part's extremes are within 4e-3 of the diagonal's; bf16 storage adds ~1e-3 ||H||
        assert top <= 40.0 + 4e-3 + 0.05 and 40.0 - top <= e_max + 0.05
        assert bottom >= -8.0 - 4e-3 - 0.05 and bottom + 8.0 <= e_min + 0.05
    assert abs(meas.top(1)[0][0] - full.top(1)[0][0]) < 0.05


def test_a_measured_run_whose_basis_fills_restarts_from_an_orthogonal_residual(monkeypatch):
    """A capped bf16 run in the measured regime hands the thick restart a residual orthogonalized against the whole
    basis (its bounds allowed up to eta), and the restarted run finds the same extremes as an uncapped one."""
    d = 1 << 22
    mv, _ = _asymmetric_bf16(d)
    handed: list[float] = []
    lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")
    real = lanczos_module.restarted_lanczos

    def spy(matvec, dim, **kw):
        r = kw["resume"]
        Q = torch.cat([b.double() for b in r.basis._filled()])[: r.basis.n]
        handed.append(float((Q @ (r.w.double() / r.beta)).abs().max()))
        assert r.ortho is None  # the restarted loop orthogonalizes every step
        return real(matvec, dim, **kw)

    monkeypatch.setattr(lanczos_module, "restarted_lanczos", spy)
    opts = dict(k=1, tol=1e-3, max_iter=60, dtype=torch.bfloat16, delayed=False, sketch=True)
    capped = lanczos(mv, d, max_basis=8, generator=torch.Generator().manual_seed(3), **opts)
    plain = lanczos(mv, d, generator=torch.Generator().manual_seed(3), **opts)
    # a bf16 pass's rounding (2.8e-4 here), not what the measured steps left (1.3e-3 without the pass)
    assert handed and handed[0] < 6e-4
    assert capped.converged and plain.converged
    assert capped.top(1)[0][0] == pytest.approx(plain.top(1)[0][0], abs=0.05)
    assert capped.bottom(1)[0][0] == pytest.approx(plain.bottom(1)[0][0], abs=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_lean_streamed_bf16_spectrum_measures_its_inner_products():
    """A bf16 MLP's spectrum in the lean run with streamed inputs (the 1B Llama's plan): the run sketches its
    vectors, and its extremes agree with the host placement's (which runs the estimate) within their errors and
    the products' bf16 rounding."""
    import torch.nn as nn

    import geomprobe as gp
    from geomprobe.engine.memory_plan import MemoryBudget
    from geomprobe.metrics import spectrum

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).cuda().to(torch.bfloat16)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    budget = MemoryBudget(warn=False, gradient_samples=False, overrides={"working_vectors": ("streamed", "user")})
    lean = gp.Landscape(model, nn.MSELoss(), (x, y), memory=budget, vector_device="cpu")
    host = gp.Landscape(model, nn.MSELoss(), (x, y), memory=MemoryBudget(warn=False, gradient_samples=False),
                        vector_device="cpu")
    a = spectrum(lean, tol=1e-3, max_iter=60)
    b = spectrum(host, tol=1e-3, max_iter=60)
    assert "sketched" in a["reorth_regime"] or a["reorthogonalizations"] == 0, a["reorth_regime"]
    scale = max(abs(b["lambda_max"]), abs(b["lambda_min"]))
    assert abs(a["lambda_max"] - b["lambda_max"]) <= a["lambda_max_err"] + b["lambda_max_err"] + 1e-2 * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_products_run_there_and_agree_with_the_hosts():
    """Vectors on the GPU: their sketches are stored page-locked and multiplied on the device, in pieces of
    ROWS_AT_ONCE; the estimates and bounds equal the host's arithmetic on the same sketches, and cover the truth."""
    d, m = 1 << 20, 1 << 14
    gen = torch.Generator().manual_seed(5)
    gram = SketchedGram(d, m, seed=9)
    xs = []
    for i in range(20):  # more than ROWS_AT_ONCE stored
        x, _ = _pair(d, 0.0, gen)
        xs.append(x.float().cuda())
        gram.push(xs[-1])
    assert gram._rows.is_pinned()
    _, y = _pair(d, 0.01, gen)
    y = (0.01 * xs[0].double().cpu() + y * 0.5).float().cuda()
    est, bound = gram.measure(y, 2.0)
    truth = (torch.stack(xs).double() @ (y.double() / 2.0)).cpu().numpy()
    host_est, host_var = gram._products_host(gram._last)
    assert np.allclose(est, host_est.numpy(), rtol=1e-4, atol=1e-6)
    assert np.allclose(bound, np.abs(host_est.numpy()) + gram.z * np.sqrt(host_var.numpy()), rtol=1e-4, atol=1e-6)
    assert (np.abs(truth) <= bound).all()


def test_the_warm_up_measurement_uses_the_runs_kernels_and_measures_right():
    # what warm_store runs beside a Landscape's build: a real measurement whose bound covers the known product
    from geomprobe.linalg.sketched_gram import SKETCH_MIN, small_measurement, warm_store

    for dtype in (torch.bfloat16, torch.float16):
        est, bound = small_measurement(torch.device("cpu"), dtype)
        assert est.shape == (1,) and np.isfinite(est).all() and abs(2 * SKETCH_MIN) <= bound[0]
        assert abs(est[0] - 2 * SKETCH_MIN) < 0.2 * 2 * SKETCH_MIN
    assert not warm_store(1 << 20, torch.float32, "cpu")  # float32 runs keep no sketches: nothing to warm


def test_the_kernels_are_loaded_once_a_process_for_each_device_and_type(monkeypatch):
    import threading

    import geomprobe.linalg.sketched_gram as sg

    loads = []
    monkeypatch.setattr(sg, "_load_kernels", lambda device, dtype: loads.append((str(device), dtype)))
    monkeypatch.setattr(sg, "_LOADED", set())
    monkeypatch.setattr(sg, "POOLED", False)  # the store's block aside: only the kernels start anything here
    before = set(threading.enumerate())
    assert sg.warm_store(1 << 20, torch.bfloat16, "cuda:0")
    assert not sg.warm_store(1 << 20, torch.bfloat16, "cuda:0")  # loaded already: nothing starts
    assert sg.warm_store(1 << 20, torch.float16, "cuda:0")  # another type's kernels
    assert not sg.warm_store(1 << 20, torch.bfloat16, None) and not sg.warm_store(1 << 20, torch.bfloat16, "cpu")
    for t in set(threading.enumerate()) - before:
        t.join()
    assert sorted(loads, key=str) == sorted([("cuda:0", torch.bfloat16), ("cuda:0", torch.float16)], key=str)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_warm_up_runs_on_the_gpu_beside_the_caller():
    from geomprobe.linalg.sketched_gram import small_measurement, warm_store

    warm_store(1 << 20, torch.bfloat16, "cuda")
    est, bound = small_measurement(torch.device("cuda"), torch.bfloat16)
    assert np.isfinite(est).all() and bound[0] >= 2048
