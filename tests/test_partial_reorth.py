"""Partial reorthogonalization (geomprobe.linalg.orthogonality): the same Lanczos answers as full
reorthogonalization on matrices with known spectra, a basis kept semi-orthogonal, and a fraction of the reads."""

import math
import sys

import numpy as np
import pytest
import torch
from lanczos_helpers import outlier_run, tiny_gpt2_landscape
from tolerances import BF16_REL

from geomprobe import ConfigurationError, linalg
from geomprobe.linalg import krylov_basis, orthogonality
from geomprobe.linalg.certify import rounding_level
from geomprobe.linalg.orthogonality import OrthogonalityEstimate, orthogonality_eps


def sym_with_spectrum(eigs, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T).to(dtype)


SPECTRA = {
    # a few outliers over a bulk: the top Ritz values converge to working precision early, which is where
    # plain Lanczos loses orthogonality and grows ghost copies
    "outliers": torch.cat([torch.linspace(-1, 1, 594, dtype=torch.float64), torch.tensor([4.0, 6.0, 9.0, 10.0, 12.0, 30.0])]),
    "cluster_at_top": torch.cat([torch.linspace(0, 1, 590, dtype=torch.float64), 5 + 1e-3 * torch.arange(10.0, dtype=torch.float64)]),
    "dense_edges": torch.linspace(-3, 2, 600, dtype=torch.float64) ** 3,
}


def _gram_off(V: torch.Tensor) -> float:
    V = V.double()
    return float((V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_partial_gives_the_full_runs_answers_and_its_bounds_cover_the_truth(name, dtype):
    eigs = SPECTRA[name]
    A = sym_with_spectrum(eigs, seed=3, dtype=dtype)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    runs = {mode: linalg.lanczos(lambda v: v @ A, len(eigs), k=2, tol=tol, max_iter=600, dtype=dtype,
                                 generator=torch.Generator().manual_seed(5), reorth=mode, keep_basis=True)
            for mode in ("full", "partial")}
    full, part = runs["full"], runs["partial"]
    assert full.converged and part.converged
    # the same steps to the one or two: the scalars differ by rounding only
    assert abs(part.steps - full.steps) <= 2
    true_top, true_bottom = float(eigs.max()), float(eigs.min())
    scale = float(eigs.abs().max())
    # the matrix itself is rounded to dtype: its eigenvalues move by up to this (the bounds are about A as stored)
    slack = rounding_level(dtype, scale)
    for r in (full, part):
        (t,), (e,) = r.top(1)
        (b,), (eb,) = r.bottom(1)
        # residual bounds: some eigenvalue within each; the extremes themselves within tol (certified)
        assert np.abs(eigs.numpy() - t).min() <= e + slack
        assert np.abs(eigs.numpy() - b).min() <= eb + slack
        assert abs(t - true_top) <= tol * scale * 1.01 + r.extreme_err[1] + slack
        assert abs(b - true_bottom) <= tol * scale * 1.01 + r.extreme_err[0] + slack
        assert true_top <= t + r.extreme_err[1] + slack
        assert true_bottom >= b - r.extreme_err[0] - slack
    assert part.top(1)[0][0] == pytest.approx(full.top(1)[0][0], rel=10 * tol)
    # a fraction of the whole-basis passes, and the basis stays semi-orthogonal
    assert full.reorthogonalizations == full.steps
    # fewer whole-basis passes (an outlier converged to working precision early still asks for one every
    # few steps: measured 45 of 74 in float32; the dense spectra far fewer)
    assert part.reorthogonalizations < part.steps
    if name == "dense_edges":
        assert part.reorthogonalizations <= part.steps // 4
    eps = orthogonality_eps(dtype, len(eigs))
    assert _gram_off(part.basis) <= 2 * math.sqrt(eps)


def test_without_the_passes_plain_lanczos_grows_ghosts_which_partial_prevents(monkeypatch):
    # the control that makes the test above meaningful: 300 float32 steps on outliers over a bulk lose
    # orthogonality completely when no whole-basis pass ever runs, and the top eigenvalue comes out twice
    eigs = SPECTRA["outliers"]
    A = sym_with_spectrum(eigs, seed=3, dtype=torch.float32)

    def run():
        return linalg.lanczos(lambda v: v @ A, 600, tol=0.0, max_iter=300, dtype=torch.float32,
                              generator=torch.Generator().manual_seed(1), keep_basis=True)

    good = run()
    assert good.reorthogonalizations >= 2  # the estimate asked for passes here
    assert _gram_off(good.basis) <= 2 * math.sqrt(orthogonality_eps(torch.float32, 600))
    ghosts_good = int((good.ritz_values - 30.0).abs().lt(1e-3).sum())
    assert ghosts_good == 1

    advance = OrthogonalityEstimate.advance
    monkeypatch.setattr(OrthogonalityEstimate, "advance", lambda self, *args: advance(self, *args) and False)
    bad = run()
    assert bad.reorthogonalizations == 0
    assert _gram_off(bad.basis) > 0.1
    assert int((bad.ritz_values - 30.0).abs().lt(1e-3).sum()) >= 2  # a ghost copy of lambda_max


def _spy_estimates(monkeypatch) -> list:
    """(step, largest estimated inner product of the new vector, pass due) at every step, recorded as the run goes;
    the estimate runs at every step, never the switch to whole-basis steps."""
    seen = []
    advance = OrthogonalityEstimate.advance

    def spy(self, a, *rest):
        due = advance(self, a, *rest)
        seen.append((len(a), float(np.abs(self._cur[:-1]).max()), due))
        return due

    monkeypatch.setattr(OrthogonalityEstimate, "advance", spy)
    monkeypatch.setattr(orthogonality, "SWITCH_WINDOW", -1)
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_the_estimate_stays_above_the_measured_inner_products(name, dtype, monkeypatch):
    # Simon's recurrence with the pessimistic sign of its rounding term: at every step its largest estimate
    # over the new vector's inner products is at least the measured one (before any pass resets both)
    eigs = SPECTRA[name]
    A = sym_with_spectrum(eigs, seed=4, dtype=dtype)
    seen = _spy_estimates(monkeypatch)
    store = {}
    append = krylov_basis.LanczosBasis.append_normalized

    def keep(self, w, beta):
        out = append(self, w, beta)
        store["basis"] = self
        return out

    monkeypatch.setattr(krylov_basis.LanczosBasis, "append_normalized", keep)
    r = linalg.lanczos(lambda v: v @ A, 600, tol=0.0, max_iter=250, dtype=dtype,
                       generator=torch.Generator().manual_seed(2), keep_basis=True)
    V = r.basis.double()
    G = (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs()
    checked = 0
    # below ~sqrt(d) eps the measured products are the float64 Gram matrix's own rounding, not the basis's
    floor = 10 * math.sqrt(600) * torch.finfo(torch.float64).eps
    for step, est, due in seen:
        if due or step >= V.shape[0]:
            continue
        measured = float(G[step, :step].max())
        assert measured <= max(est, floor), (step, measured, est)
        checked += 1
    assert checked > 50


def test_an_asymmetric_matvec_error_enters_the_estimate():
    # an HVP with its own non-symmetric error (1e-4 relative, as fp32 through cuDNN can be) loses orthogonality
    # at that rate, which the symmetric recurrence cannot see: the measured asymmetry feeds the estimate, so the
    # run takes its passes (nearly every step here) and finds no ghost eigenvalue below the spectrum
    A = sym_with_spectrum(torch.linspace(-1.0, 4.0, 80), seed=9)
    E = torch.randn(80, 80, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    noisy = A + 1e-4 * E / E.norm() * A.norm()
    full = linalg.lanczos(lambda v: v @ noisy, 80, tol=1e-8, reorth="full")
    part = linalg.lanczos(lambda v: v @ noisy, 80, tol=1e-8)
    assert 1e-7 < part.asymmetry < 1e-3
    assert part.reorthogonalizations >= part.steps - 3
    assert float(part.ritz_values.min()) > -1.0 - 1e-3
    assert part.bottom(1)[0][0] == pytest.approx(full.bottom(1)[0][0], abs=1e-6)
    assert part.top(1)[0][0] == pytest.approx(full.top(1)[0][0], abs=1e-6)


def test_half_precision_partial_run_converges_to_the_full_runs_values():
    eigs = torch.cat([torch.linspace(-1, 1, 1998, dtype=torch.float64), torch.tensor([5.0, 8.0], dtype=torch.float64)])
    A = sym_with_spectrum(eigs, seed=11).float()

    def mv16(v):
        return (v.float() @ A).bfloat16()

    full = linalg.lanczos(mv16, 2000, tol=1e-3, dtype=torch.bfloat16, reorth="full",
                          generator=torch.Generator().manual_seed(0))
    part = linalg.lanczos(mv16, 2000, tol=1e-3, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert full.converged and part.converged
    assert part.top(1)[0][0] == pytest.approx(8.0, rel=BF16_REL)
    assert part.bottom(1)[0][0] == pytest.approx(-1.0, rel=BF16_REL)
    assert part.reorthogonalizations < full.reorthogonalizations


def test_host_vectors_take_the_same_partial_run_as_the_plain_kernels():
    # a basis in host memory runs the fused host passes (host_arith): the same decisions and values
    eigs = SPECTRA["outliers"]
    A = sym_with_spectrum(eigs, seed=6, dtype=torch.float32)
    runs = []
    for forced in (False, True):
        with _force(forced):
            runs.append(linalg.lanczos(lambda v: v @ A, 600, k=1, tol=1e-4, dtype=torch.float32,
                                       generator=torch.Generator().manual_seed(7)))
    host, plain = runs
    assert host.steps == plain.steps and host.reorthogonalizations == plain.reorthogonalizations
    torch.testing.assert_close(host.ritz_values, plain.ritz_values, rtol=1e-5, atol=1e-5)


class _force:
    """Route host vectors through the plain (device) kernels, as the library's own switch does."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self._mp = pytest.MonkeyPatch()
        self._mp.setattr(krylov_basis, "forced_kernels", lambda: self.on)
        return self

    def __exit__(self, *exc):
        self._mp.undo()


def test_partial_reads_the_basis_only_at_its_passes(monkeypatch):
    # whole-basis reads: every step under "full", only the flagged steps under "partial"
    eigs = SPECTRA["dense_edges"]
    A = sym_with_spectrum(eigs, seed=2, dtype=torch.float32)
    widths = []
    reorth = krylov_basis.LanczosBasis.reorthogonalize

    def count(self, w, passes=2):
        widths.append(self.n)
        return reorth(self, w, passes)

    with _force(True):
        monkeypatch.setattr(krylov_basis.LanczosBasis, "reorthogonalize", count)
        for mode in ("full", "partial"):
            widths.clear()
            r = linalg.lanczos(lambda v: v @ A, 600, tol=1e-4, dtype=torch.float32, reorth=mode,
                               generator=torch.Generator().manual_seed(3))
            rows = sum(widths)
            if mode == "full":
                full_rows, full_steps = rows, r.steps
            else:
                assert r.reorthogonalizations < r.steps / 3
                # the first step's pass over one vector, then only the flagged steps (and DGKS repasses)
                assert len(widths) <= 1 + 2 * r.reorthogonalizations
    assert full_rows >= full_steps * (full_steps - 1) / 2
    assert rows < full_rows / 3


def test_passes_that_come_back_to_back_switch_the_run_to_whole_basis_steps(monkeypatch):
    # float32, outliers over a bulk, 200 of 600 steps: once passes come within SWITCH_WINDOW of each other the
    # run goes selective, and when more Ritz vectors converge than it keeps, every later step is a plain
    # whole-basis step (no local pass first); the answers stay those of the full run
    eigs = SPECTRA["outliers"]
    A = sym_with_spectrum(eigs, seed=3, dtype=torch.float32)
    calls = []
    step = krylov_basis.krylov_step

    def spy(*args, local=False, **kw):
        calls.append(local)
        return step(*args, local=local, **kw)

    monkeypatch.setattr(sys.modules["geomprobe.linalg.lanczos"], "krylov_step", spy)
    def run(**kw):
        return linalg.lanczos(lambda v: v @ A, 600, tol=0.0, max_iter=200, dtype=torch.float32,
                              generator=torch.Generator().manual_seed(1), **kw)

    part = run()
    switched = calls.index(False, 1)  # the first step after the first one taken without the local pass
    assert 2 < switched < 100 and not any(calls[switched:])
    assert part.reorthogonalizations >= part.steps - switched
    full = run(reorth="full")
    torch.testing.assert_close(part.ritz_values[-3:], full.ritz_values[-3:], rtol=1e-5, atol=1e-5)


def test_bad_reorth_option_is_refused():
    with pytest.raises(ConfigurationError, match="reorth must be one of"):
        linalg.lanczos(lambda v: v, 10, reorth="selective")


def test_bound_factors_follow_the_estimated_norm_of_each_ritz_vector():
    est = OrthogonalityEstimate(torch.float32, 1000)
    est._omega = np.array([[0.0, 0.1, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    U = np.eye(3)
    np.testing.assert_allclose(est.bound_factors(U), [1.0, 1.0, 1.0])  # unit coordinate vectors: no spread
    u = np.array([[1.0], [1.0], [0.0]]) / math.sqrt(2)
    # |u|^T |W| |u| = 2 * 0.1 * 0.5 = 0.1
    np.testing.assert_allclose(est.bound_factors(u), [1 / math.sqrt(0.9)])
    est._omega[0, 1] = est._omega[1, 0] = 0.6
    assert est.bound_factors(u)[0] == math.inf
    assert orthogonality.orthogonality_eps(torch.bfloat16, 10**8) == pytest.approx(2.0**-7 / 1e4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ritz_vectors_streamed_through_the_compute_device_equal_the_host_formula(dtype):
    # an offloaded basis (host rows, a run on an accelerator) forms its Ritz vectors on the accelerator, a row
    # at a time; here the "accelerator" is the CPU itself, which runs the same code
    from geomprobe.linalg.ritz import _host_ritz_vectors, _streamed_ritz_vectors

    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(5, 3001, generator=g).to(dtype), torch.randn(3, 3001, generator=g).to(dtype)]
    U = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0][:, [0, 7]]
    got = _streamed_ritz_vectors(blocks, U, torch.device("cpu")).cpu()
    want = _host_ritz_vectors(blocks, U)
    ref = U.T @ torch.cat(blocks).double()
    ref /= ref.norm(dim=1, keepdim=True)
    assert got.dtype == dtype and got.shape == (2, 3001)
    tol = 1e-2 if dtype == torch.bfloat16 else (1e-6 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_offloaded_run_forms_its_ritz_vectors_on_the_device():
    eigs = SPECTRA["outliers"]
    A = sym_with_spectrum(eigs, seed=3, dtype=torch.float32).cuda()
    r = linalg.lanczos(lambda v: v @ A, 600, k=1, tol=1e-4, dtype=torch.float32, device="cuda",
                       basis_device="cpu", keep_basis=True, generator=torch.Generator().manual_seed(0))
    assert r.compute_device.type == "cuda" and r.basis_blocks[0].device.type == "cpu"
    y = r.ritz_vectors([-1])[0]
    assert y.device.type == "cpu"
    resid = float(((A @ y.cuda()) - r.top(1)[0][0] * y.cuda()).norm())
    assert resid <= 10 * r.top(1)[1][0] + 1e-4


def test_an_isolated_outlier_is_kept_and_later_steps_orthogonalize_against_it_alone(monkeypatch):
    # float32, one eigenvalue 100x the bulk (GPT-2's top is 35x its bulk): once it converges, orthogonality
    # leaks along its Ritz vector at every step; the run keeps that vector on the device and removes it from each
    # new vector (selective orthogonalization) instead of a whole-basis pass per step, until a bulk edge's Ritz
    # vectors converge too; the basis stays semi-orthogonal and the answers are the full run's
    _, full, _ = outlier_run(monkeypatch, "full")
    _, part, kept = outlier_run(monkeypatch)
    assert kept and kept[0] == 1  # the outlier's vector, first
    # the regime starts at the outlier's convergence; the bulk's top edge converging to a third Ritz vector at
    # that end ends it (at step 14 with the product's rounding injected at eps ||T|| per step, injection_eps)
    assert part.reorth_regime.startswith("selective from step")
    assert part.converged and part.reorthogonalizations <= part.steps - 5
    assert _gram_off(part.basis) <= 2 * math.sqrt(orthogonality_eps(torch.float32, 3000))
    assert part.top(1)[0][0] == pytest.approx(100.0, rel=1e-6)
    assert part.bottom(1)[0][0] == pytest.approx(full.bottom(1)[0][0], abs=1e-3)


def test_the_result_says_how_the_run_orthogonalized():
    eigs = SPECTRA["outliers"]
    A = sym_with_spectrum(eigs, seed=3, dtype=torch.float32)
    assert linalg.lanczos(lambda v: v @ A, 600, tol=0.0, max_iter=200, dtype=torch.float32,
                          reorth="full").reorth_regime == "full"
    regime = linalg.lanczos(lambda v: v @ A, 600, tol=0.0, max_iter=200, dtype=torch.float32).reorth_regime
    assert regime.startswith("selective from step") and "whole-basis from step" in regime
    dense = sym_with_spectrum(SPECTRA["dense_edges"], seed=2, dtype=torch.float32)
    assert linalg.lanczos(lambda v: v @ dense, 600, tol=1e-4, dtype=torch.float32).reorth_regime == "estimated"


def test_a_bounded_memory_run_says_how_it_reorthogonalized():
    # partially until the cap and after it: a pass at each restart's first step and where the estimate asks
    A = sym_with_spectrum(SPECTRA["dense_edges"], seed=2, dtype=torch.float64)
    r = linalg.lanczos(lambda v: v @ A, 600, tol=1e-6, max_basis=20, generator=torch.Generator().manual_seed(0))
    assert r.restarts > 0 and r.reorth_regime == "partial until the cap and after it (thick restart)"
    assert r.restarts <= r.reorthogonalizations < 0.5 * (r.matvecs - 20)
    full = linalg.lanczos(lambda v: v @ A, 600, tol=1e-6, max_basis=20, generator=torch.Generator().manual_seed(0),
                          reorth="full")
    assert full.reorthogonalizations == full.matvecs and full.reorth_regime == "full (thick restart)"
    assert full.basis_peak <= 20 and r.basis_peak <= 20


def test_the_estimate_stays_above_the_inner_products_of_a_transformers_hvps(monkeypatch):
    # a network's HVP rounds inside its layers and its error lies where the basis does: along a basis vector
    # it leaks ~0.3 eps ||T|| per step, not the eps / sqrt(d) of rounding spread evenly over d entries (the
    # injection before: this tiny GPT-2's measured inner products then ran 4x above the estimate from step 12)
    land = tiny_gpt2_landscape(torch.float32)
    seen = _spy_estimates(monkeypatch)
    r = linalg.lanczos(land.hvp, land.dim, tol=0.0, max_iter=40, dtype=torch.float32,
                       generator=torch.Generator().manual_seed(0), keep_basis=True)
    V = r.basis.double()
    G = (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs()
    checked = 0
    for step, est, due in seen:
        if due or step >= V.shape[0]:
            continue
        measured = float(G[step, :step].max())
        assert measured <= est, (step, measured, est)
        checked += 1
    assert checked >= 15
    assert r.reorthogonalizations >= 1  # it did lose orthogonality, and a pass was asked for
