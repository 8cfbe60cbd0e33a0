"""Thick-restart Lanczos in bounded memory, against matrices with known spectra: the same extremes as the
full-basis run within the reported bounds, every bound covering the truth over many seeds, the stored
vectors never above the cap, and the matvecs it costs against the full basis."""

import pytest
import torch
from tolerances import BF16_REL, FLOAT32_REL, FLOAT64_EXACT, FLOAT64_REL

from geomprobe import ConfigurationError, linalg
from geomprobe.linalg import krylov_basis
from geomprobe.linalg.restarted_lanczos import min_basis, restarted_lanczos


def sym_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


def f64(*x):
    return torch.tensor(x, dtype=torch.float64)


N = 400
SPECTRA = {
    # a cluster of five at the top (gaps 5e-3 of the spread) over a bulk
    "clustered_top": torch.cat([torch.linspace(-0.5, 1.0, N - 5, dtype=torch.float64), f64(9.97, 9.98, 9.99, 9.995, 10.0)]),
    # dense bulk edges at both ends: the slow case
    "dense_edges": torch.linspace(-1.0, 1.0, N, dtype=torch.float64),
    # indefinite: a dense negative edge at the bottom, outliers at the top
    "indefinite": torch.cat([torch.linspace(-3.0, 1.0, N - 2, dtype=torch.float64), f64(1.05, 2.0)]),
}


def nearest_gap(theta, eigs):
    return (theta[:, None] - eigs[None, :]).abs().min(1).values


def covered(r, eigs):
    """Every reported Ritz value has an eigenvalue within its bound (the bound's claim), up to rounding."""
    scale = float(eigs.abs().max())
    return bool((nearest_gap(r.ritz_values, eigs) <= r.bounds * (1 + 1e-9) + FLOAT64_EXACT * scale).all())


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("max_basis", [10, 16])
def test_bounded_run_reaches_the_extremes_within_its_bounds(name, max_basis):
    eigs = SPECTRA[name]
    A = sym_with_spectrum(eigs, seed=1)
    g = torch.Generator().manual_seed(2)
    tol = 1e-6
    full = linalg.lanczos(lambda v: v @ A, N, k=2, tol=tol, max_iter=N, generator=g)
    r = restarted_lanczos(lambda v: v @ A, N, max_basis=max_basis, k=2, tol=tol, max_iter=3000,
                          generator=torch.Generator().manual_seed(2))
    assert full.converged and r.converged and r.restarts > 0
    assert covered(r, eigs)
    spread = float(eigs[-1] - eigs[0])
    for got, err, want in zip(r.top(2)[0] + r.bottom(2)[0], r.top(2)[1] + r.bottom(2)[1],
                              [eigs[-1], eigs[-2], eigs[0], eigs[1]]):
        assert abs(got - float(want)) <= err * (1 + 1e-9) + FLOAT64_EXACT * spread
        assert err <= tol * max(abs(got), spread)
    # the same extremes as the full basis, within the two runs' bounds
    assert abs(r.top(1)[0][0] - full.top(1)[0][0]) <= r.top(1)[1][0] + full.top(1)[1][0] + FLOAT64_EXACT * spread
    assert abs(r.bottom(1)[0][0] - full.bottom(1)[0][0]) <= r.bottom(1)[1][0] + full.bottom(1)[1][0] + FLOAT64_EXACT * spread


def test_bounds_are_the_true_residuals_of_the_restarted_ritz_vectors():
    # after restarts the bound is beta_p |u_{p,i}| in the restarted basis: it must equal ||H y - theta y||
    eigs = SPECTRA["indefinite"]
    A = sym_with_spectrum(eigs, seed=3)
    r = restarted_lanczos(lambda v: v @ A, N, max_basis=10, tol=1e-5, max_iter=2000, keep_basis=True,
                          generator=torch.Generator().manual_seed(4))
    assert r.restarts > 0
    V = r.basis
    assert V.shape[0] <= 10
    assert (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs().max() < FLOAT64_REL * 1e-4
    scale = float(eigs.abs().max())
    for i in range(V.shape[0]):
        y = r.ritz_vector(i)
        res = float((A @ y - r.ritz_values[i] * y).norm())
        assert res == pytest.approx(float(r.bounds[i]), abs=FLOAT64_REL * 1e-3 * scale)


def test_bounds_cover_the_truth_over_many_seeds():
    # rigorous bounds: coverage must be complete, not a rate, for every reported value and every seed,
    # also when the run is cut short (max_iter) and with the gap bounds
    eigs = torch.cat([torch.linspace(0.0, 1.0, 197, dtype=torch.float64), f64(1.02, 1.5, 3.0)])
    A = sym_with_spectrum(eigs, seed=5)
    misses = 0
    extremes_missed = 0
    for seed in range(40):
        for bound, max_iter in (("residual", 400), ("residual", 25), ("gap", 400)):
            r = restarted_lanczos(lambda v: v @ A, 200, max_basis=9, tol=1e-6, max_iter=max_iter, bound=bound,
                                  generator=torch.Generator().manual_seed(seed))
            misses += not covered(r, eigs)
            if r.converged:
                top, err = r.top(1)
                extremes_missed += abs(top[0] - 3.0) > err[0] * (1 + 1e-9) + 1e-12
    assert misses == 0 and extremes_missed == 0


def test_stored_vectors_never_exceed_the_cap(monkeypatch):
    # counted independently of the kernel's own report: rows allocated and rows filled after every row stored
    # (``_next_row`` hands out every stored row: a plain append's and a host basis's normalized one)
    seen = []
    orig = krylov_basis.LanczosBasis._next_row

    def counting_next_row(self):
        out = orig(self)
        seen.append((self.n, sum(b.shape[0] for b in self.blocks)))
        return out

    monkeypatch.setattr(krylov_basis.LanczosBasis, "_next_row", counting_next_row)
    A = sym_with_spectrum(SPECTRA["dense_edges"], seed=6)
    for cap in (5, 11, 16, 21, 40):
        seen.clear()
        r = restarted_lanczos(lambda v: v @ A, N, max_basis=cap, tol=1e-6, max_iter=150,
                              generator=torch.Generator().manual_seed(0))
        assert r.matvecs > cap and r.restarts > 0
        assert max(n for n, _ in seen) <= cap and max(a for _, a in seen) <= cap
        assert r.basis_peak == max(n for n, _ in seen)


def test_matvecs_against_the_full_basis():
    # the measured price of bounded memory: on these spectra a basis of 16 costs at most 1.6x the matvecs
    # of the unbounded run, a basis of 10 at most 5.5x (a tight cluster at the top: 5.0x with both runs
    # waiting for the extreme certificate, 509 against 101; 4.2x on the residual rule alone)
    counts = {}
    for name, eigs in SPECTRA.items():
        A = sym_with_spectrum(eigs, seed=7)
        mv = A.__rmatmul__  # v -> v @ A
        full = linalg.lanczos(mv, N, tol=1e-6, max_iter=N, generator=torch.Generator().manual_seed(1))
        counts[name] = [full.matvecs]
        for cap, factor in ((16, 1.6), (10, 5.5)):
            r = linalg.lanczos(mv, N, tol=1e-6, max_iter=N * 4, max_basis=cap,
                               generator=torch.Generator().manual_seed(1))
            assert r.converged and r.basis_peak <= cap
            counts[name].append(r.matvecs)
            assert r.matvecs <= factor * full.matvecs, (name, cap, counts[name])
    print("matvecs full / max_basis=16 / max_basis=10:", counts)


def test_lanczos_dispatches_on_max_basis():
    A = sym_with_spectrum(SPECTRA["indefinite"], seed=8)
    def g():
        return torch.Generator().manual_seed(3)

    plain = linalg.lanczos(lambda v: v @ A, N, tol=1e-6, generator=g())
    roomy = linalg.lanczos(lambda v: v @ A, N, tol=1e-6, generator=g(), max_basis=300)  # fits: the plain run
    assert roomy.restarts == 0 and torch.equal(roomy.ritz_values, plain.ritz_values)
    tight = linalg.lanczos(lambda v: v @ A, N, tol=1e-6, max_iter=2000, generator=g(), max_basis=10)
    assert tight.restarts > 0 and tight.basis_peak <= 10 and tight.converged
    assert abs(tight.bottom(1)[0][0] - plain.bottom(1)[0][0]) <= tight.bottom(1)[1][0] + plain.bottom(1)[1][0]
    with pytest.raises(ConfigurationError, match="max_basis must be an integer >= 5"):
        linalg.lanczos(lambda v: v @ A, N, max_basis=4)
    with pytest.raises(ConfigurationError, match="max_basis must be a positive integer"):
        linalg.lanczos(lambda v: v @ A, N, max_basis=0)
    with pytest.raises(ConfigurationError, match="keep must lie in"):
        restarted_lanczos(lambda v: v @ A, N, max_basis=10, keep=1.0)
    assert min_basis(2, "largest") == 5 and min_basis(2, "both") == 7


def test_offloaded_float32_and_asymmetry_with_restarts():
    eigs = SPECTRA["clustered_top"]
    A = sym_with_spectrum(eigs, seed=9)
    kw = {"max_basis": 12, "tol": 1e-5, "max_iter": 1000, "keep_basis": True}
    here = restarted_lanczos(lambda v: v @ A, N, generator=torch.Generator().manual_seed(1), **kw)
    # "cpu:0" differs from "cpu" to torch: the offloaded path (streamed passes, rotation through the device)
    off = restarted_lanczos(lambda v: v @ A, N, generator=torch.Generator().manual_seed(1), basis_device="cpu:0", **kw)
    assert off.restarts == here.restarts > 0 and off.matvecs == here.matvecs
    assert torch.allclose(off.ritz_values, here.ritz_values, rtol=0, atol=FLOAT64_REL * 1e-3)
    assert here.asymmetry < 1e-13
    A32 = A.float()
    r32 = restarted_lanczos(lambda v: v @ A32, N, max_basis=12, tol=1e-4, max_iter=1000, dtype=torch.float32,
                            generator=torch.Generator().manual_seed(1))
    assert r32.converged and r32.restarts > 0
    assert r32.top(1)[0][0] == pytest.approx(10.0, rel=FLOAT32_REL * 1e-1)
    E = torch.randn(N, N, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    noisy = restarted_lanczos(lambda v: v @ (A + 1e-4 * E / E.norm() * A.norm()), N, max_basis=12, tol=1e-5,
                              max_iter=1000, generator=torch.Generator().manual_seed(1))
    assert noisy.restarts > 0 and 1e-7 < noisy.asymmetry < 1e-3


def test_memory_bytes_for_the_planner():
    d = 1_000_000
    m32 = linalg.lanczos_memory_bytes(d, torch.float32, 20)
    m16 = linalg.lanczos_memory_bytes(d, torch.bfloat16, 20)
    assert m32.host == 0 and m32.device >= 22 * d * 4
    assert m16.device >= 22 * d * 2 and m16.device < m32.device
    # grows by one d-vector per basis vector
    assert linalg.lanczos_memory_bytes(d, torch.float32, 21).device - m32.device == d * 4
    off = linalg.lanczos_memory_bytes(d, torch.float32, 20, offloaded=True)
    assert off.host == 20 * d * 4 and off.device < m32.device
    with pytest.raises(ConfigurationError, match="max_basis must be a positive integer"):
        linalg.lanczos_memory_bytes(d, torch.float32, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_basis", [None, 6])
def test_cuda_lanczos_stays_on_the_device_in_its_dtype(dtype, max_basis, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eigs = torch.cat([f64(-4.0), torch.linspace(-1.0, 1.0, N - 2, dtype=torch.float64), f64(5.0)])
    A = sym_with_spectrum(eigs, seed=12).float().cuda()
    seen = set()

    def mv(v):
        seen.add((v.device.type, v.dtype))
        return (v.float() @ A).to(dtype)

    for where in (None, "cpu"):
        r = linalg.lanczos(mv, N, tol=1e-3, max_iter=2000, dtype=dtype, device="cuda", max_basis=max_basis,
                           basis_device=where, generator=torch.Generator().manual_seed(0))
        assert seen == {("cuda", dtype)}
        rel = FLOAT32_REL if dtype == torch.float32 else BF16_REL
        assert r.converged and r.top(1)[0][0] == pytest.approx(5.0, rel=rel)
        assert r.bottom(1)[0][0] == pytest.approx(-4.0, rel=rel)
        assert max_basis is None or r.basis_peak <= max_basis


def test_spectrum_metric_in_bounded_memory_against_the_dense_hessian():
    # the metric passes max_basis through: on a small network's exact float64 Hessian the bounded run
    # reaches the extremes within its bounds, says how often it restarted, and caches apart from the plain run
    from reference import dense_hessian, make_case

    from geomprobe import Landscape
    from geomprobe.metrics.spectrum import spectrum

    model, loss, batches, mode = make_case("tanh_mlp")
    eigs = torch.linalg.eigvalsh(dense_hessian(model, loss, batches, mode=mode))
    land = Landscape(model, loss, batches, mode=mode)
    plain = spectrum(land, tol=1e-8)
    out = spectrum(land, tol=1e-8, max_basis=6, max_iter=3000)
    assert out["converged"] and out["restarts"] > 0 and out["hvps"] > plain["hvps"] > 0
    scale = float(eigs.abs().max())
    for key, want in (("lambda_max", eigs[-1]), ("lambda_min", eigs[0])):
        assert abs(out[key] - float(want)) <= out[key + "_err"] + FLOAT64_REL * scale
    assert "restarts" not in plain
