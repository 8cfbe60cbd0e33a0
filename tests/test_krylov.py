"""Krylov kernels on matrices with known spectra: values within their bounds, estimators within their errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import BF16_REL, FLOAT64_EXACT, SIGMAS

from geomprobe import ConfigurationError, linalg


def sym_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


def mv(A):
    return lambda v: v @ A


def test_lanczos_extremes_and_bounds_cover_truth():
    eigs = torch.cat([torch.linspace(-1, 3, 198, dtype=torch.float64), torch.tensor([7.0, 9.0], dtype=torch.float64)])
    A = sym_with_spectrum(eigs)
    r = linalg.lanczos(mv(A), 200, k=2, tol=1e-8)
    assert r.converged
    top, top_err = r.top(2)
    bot, bot_err = r.bottom(2)
    for got, err, want in zip(top + bot, top_err + bot_err, [9.0, 7.0, -1.0, eigs[1].item()]):
        assert abs(got - want) <= max(err, 1e-12) * 1.0001 + 1e-12
        assert abs(got - want) <= 1e-6 * 10


def test_lanczos_outlier_top_needs_few_steps():
    # docs/metrics.md#spectrum: an outlying top eigenvalue converges to 1e-3 relative in 5-9 steps
    n = 20_000
    d = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d[0] = 10.0
    r = linalg.lanczos(lambda v: v * d, n, which="largest", tol=1e-3)
    assert r.converged and r.steps <= 10
    assert abs(r.top(1)[0][0] - 10.0) <= 1e-3 * 10


def test_lanczos_reports_not_converged_when_cut_short():
    d = torch.linspace(0, 1, 5000, dtype=torch.float64)
    r = linalg.lanczos(lambda v: v * d, 5000, which="smallest", tol=1e-9, max_iter=15)
    assert not r.converged and r.steps == 15
    val, err = r.bottom(1)
    # a Ritz value lies inside the spectrum's hull, so it is an upper estimate of lambda_min = 0 ...
    assert 0.0 < val[0] <= 1.0
    # ... and the reported bound honestly says the requested accuracy was not reached
    assert err[0] > 1e-9 * (r.top(1)[0][0] - val[0])
    # while still bounding the distance to the nearest eigenvalue (spacing 2e-4 on this grid)
    assert float((d - val[0]).abs().min()) <= err[0] + 1e-12


def test_lanczos_exact_on_invariant_subspace_and_ritz_vectors():
    A = torch.diag(torch.tensor([1.0, 1.0, 5.0, 5.0], dtype=torch.float64))
    r = linalg.lanczos(mv(A), 4, tol=1e-10, keep_basis=True)
    assert r.converged and r.steps <= 3
    assert r.top(1)[0][0] == pytest.approx(5.0, abs=FLOAT64_EXACT)
    u = r.ritz_vector(-1)
    assert torch.allclose(A @ u, 5.0 * u, atol=1e-10)


def test_lanczos_float32_matvec():
    A = sym_with_spectrum(torch.linspace(0, 10, 100)).float()
    r = linalg.lanczos(lambda v: v @ A, 100, tol=1e-4, dtype=torch.float32)
    assert r.converged
    assert r.top(1)[0][0] == pytest.approx(10.0, rel=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_lanczos_random_symmetric_matrices(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (B + B.T) / 2
    eig = torch.linalg.eigvalsh(A)
    r = linalg.lanczos(mv(A), n, tol=1e-10, generator=g)
    scale = eig.abs().max().item()
    assert abs(r.top(1)[0][0] - eig[-1].item()) <= 1e-8 * scale
    assert abs(r.bottom(1)[0][0] - eig[0].item()) <= 1e-8 * scale


def test_lanczos_bad_input():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match="which must be"):
        linalg.lanczos(mv(A), 3, which="middle")
    with pytest.raises(ConfigurationError, match="v0 must have shape"):
        linalg.lanczos(mv(A), 3, v0=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match="zero or not finite"):
        linalg.lanczos(mv(A), 3, v0=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match="dim must be a positive integer"):
        linalg.lanczos(mv(A), 0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        linalg.lanczos(lambda v: v * float("nan"), 3)
    with pytest.raises(ConfigurationError, match="keep_basis"):
        linalg.lanczos(mv(A), 3).ritz_vector(0)


def _coverage_check(estimates, errors, truth):
    """Unbiased (mean within SIGMAS standard errors of the truth) and the errors honest (coverage)."""
    est = torch.tensor(estimates, dtype=torch.float64)
    err = torch.tensor(errors, dtype=torch.float64)
    n = len(estimates)
    assert abs(est.mean().item() - truth) <= SIGMAS * est.std().item() / math.sqrt(n)
    # a standard error is honest when ~95 % of the +-2 se intervals cover the truth
    covered = ((est - truth).abs() <= 2 * err).double().mean().item()
    assert covered >= 0.85
    # and not grossly inflated either
    assert (est - truth).abs().mean().item() >= 0.3 * err.mean().item()


def test_hutchinson_unbiased_with_honest_standard_error():
    A = sym_with_spectrum(torch.linspace(-2, 5, 60), seed=1)
    runs = [linalg.hutchinson_trace(mv(A), 60, samples=30, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    _coverage_check([r.trace for r in runs], [r.trace_err for r in runs], torch.trace(A).item())
    assert runs[0].matvecs == 30


def test_hutchpp_unbiased_and_better_than_hutchinson_on_decaying_spectrum():
    eigs = 1.0 / torch.arange(1, 121, dtype=torch.float64) ** 2 * 100
    A = sym_with_spectrum(eigs, seed=2)
    truth = torch.trace(A).item()
    pp = [linalg.hutchpp_trace(mv(A), 120, matvecs=30, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    hu = [linalg.hutchinson_trace(mv(A), 120, samples=30, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    _coverage_check([r.trace for r in pp], [r.trace_err for r in pp], truth)
    err_pp = torch.tensor([r.trace - truth for r in pp]).pow(2).mean().sqrt()
    err_hu = torch.tensor([r.trace - truth for r in hu]).pow(2).mean().sqrt()
    assert err_pp < 0.25 * err_hu
    assert pp[0].matvecs == 30


def test_bekas_diagonal_unbiased_with_honest_errors():
    A = sym_with_spectrum(torch.linspace(0.5, 4, 40), seed=3)
    truth = torch.diagonal(A)
    zs = []
    for s in range(100):
        est, err = linalg.bekas_diagonal(mv(A), 40, samples=20, generator=torch.Generator().manual_seed(s))
        zs.append((est - truth) / err)
    z = torch.stack(zs)
    assert (z.abs() <= 2).double().mean() >= 0.9
    assert z.mean().abs() <= 0.1


def test_exact_columns_diagonal_and_dense():
    A = sym_with_spectrum(torch.linspace(-1, 1, 30), seed=4)
    cols = linalg.hessian_columns(mv(A), 30, [3, 7, 29], batch=2)
    assert torch.allclose(cols, A[[3, 7, 29]], atol=FLOAT64_EXACT)
    assert torch.allclose(linalg.exact_diagonal(mv(A), 30, [0, 5]), A.diagonal()[[0, 5]], atol=FLOAT64_EXACT)
    assert torch.allclose(linalg.dense_matrix(mv(A), 30, batch=7), A, atol=FLOAT64_EXACT)
    with pytest.raises(ConfigurationError, match="column indices must lie in"):
        linalg.hessian_columns(mv(A), 30, [30])


def test_slq_density_moments_and_normalization():
    eigs = torch.cat([torch.linspace(-0.5, 1.0, 390, dtype=torch.float64), torch.tensor([20.0] * 10, dtype=torch.float64)])
    A = sym_with_spectrum(eigs, seed=5)
    res = linalg.slq(mv(A), 400, n_v=20, m=40, generator=torch.Generator().manual_seed(0))
    assert res.matvecs == 800
    for p in (1, 2, 3):
        truth = (eigs**p).mean().item()
        per_run = torch.tensor([float((w * n**p).sum()) for n, w in zip(res.nodes, res.weights)])
        se = per_run.std().item() / math.sqrt(len(per_run))
        assert abs(res.moment(p) - truth) <= SIGMAS * se
    grid, dens, s2 = linalg.slq_density(res, grid_size=5000)
    assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=1e-9)
    assert s2 == pytest.approx(1e-5 * (res.lambda_max - res.lambda_min))
    assert res.lambda_max == pytest.approx(20.0, rel=1e-8)
    # mass below zero: 1/3 of the bulk (130 / 400 eigenvalues)
    neg = sum(float(w[n < 0].sum()) for n, w in zip(res.nodes, res.weights)) / len(res.nodes)
    assert neg == pytest.approx(130 / 400, abs=0.05)


def test_gap_bounds_cover_the_truth_at_every_step_and_stop_earlier():
    # outliers over a bulk: the quadratic bounds must hold at every step, not only at the end
    eigs = torch.cat([torch.tensor([-2.0], dtype=torch.float64), torch.linspace(0.0, 1.0, 297, dtype=torch.float64),
                      torch.tensor([1.6, 4.0], dtype=torch.float64)])
    A = sym_with_spectrum(eigs, seed=7)
    full = linalg.lanczos(mv(A), 300, tol=0.0, max_iter=40)
    for m in range(3, 41):
        T = torch.diag(full.alpha[:m]) + torch.diag(full.beta[: m - 1], 1) + torch.diag(full.beta[: m - 1], -1)
        theta, U = torch.linalg.eigh(T)
        refined = linalg.gap_bounds(theta, full.beta[m - 1] * U[-1, :].abs())
        nearest = (theta[:, None] - eigs[None, :]).abs().min(1).values  # some eigenvalue within each bound
        assert bool((nearest <= refined * (1 + 1e-9) + 1e-13).all()), m
        assert refined[-1] <= full.beta[m - 1] * U[-1, -1].abs()
    # the two residual stopping rules alone (risk=None): the extreme certificate would bind both runs
    res = linalg.lanczos(mv(A), 300, tol=1e-3, which="largest", risk=None)
    gap = linalg.lanczos(mv(A), 300, tol=1e-3, which="largest", bound="gap", risk=None)
    assert gap.converged and gap.matvecs < res.matvecs
    assert abs(gap.top(1)[0][0] - 4.0) <= 1e-3 * 4.0
    with pytest.raises(ConfigurationError, match="bound must be"):
        linalg.lanczos(mv(A), 300, bound="kato")


def test_an_offloaded_basis_gives_the_same_lanczos_run():
    # "cpu:0" is a different device from "cpu" to torch, so this takes the offloaded path (one pass over the
    # blocks, reorthogonalizing twice per block) without an accelerator
    eigs = torch.cat([torch.linspace(-1, 3, 118, dtype=torch.float64), torch.tensor([7.0, 9.0], dtype=torch.float64)])
    A = sym_with_spectrum(eigs, seed=8)
    for reorth, level in (("full", 1e-12), ("partial", math.sqrt(torch.finfo(torch.float64).eps))):
        here = linalg.lanczos(mv(A), 120, k=2, tol=1e-9, keep_basis=True, reorth=reorth)
        off = linalg.lanczos(mv(A), 120, k=2, tol=1e-9, keep_basis=True, basis_device="cpu:0", reorth=reorth)
        assert off.steps == here.steps > 16  # more than one block of the basis
        assert off.reorthogonalizations == here.reorthogonalizations
        assert torch.allclose(off.ritz_values, here.ritz_values, rtol=0, atol=1e-10)
        V = off.basis  # orthonormal to rounding (full), semi-orthogonal (partial)
        assert (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs().max() < level


def test_asymmetry_reports_a_matvec_with_its_own_error():
    A = sym_with_spectrum(torch.linspace(-1.0, 4.0, 80), seed=9)
    exact = linalg.lanczos(mv(A), 80, tol=1e-8)
    assert exact.asymmetry < 1e-13
    E = torch.randn(80, 80, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    noisy = linalg.lanczos(mv(A + 1e-4 * E / E.norm() * A.norm()), 80, tol=1e-8)  # a non-symmetric error
    assert 1e-7 < noisy.asymmetry < 1e-3


def test_matvecs_that_alias_their_input_or_reuse_a_buffer():
    # the kernel updates the new vector in place: a matvec returning its input, or writing every product
    # into one buffer, must not corrupt the basis (plain and offloaded)
    d = torch.arange(1.0, 41.0, dtype=torch.float64)
    A = torch.diag(d)
    assert linalg.lanczos(lambda v: v, 40, tol=1e-8).top(1)[0][0] == pytest.approx(1.0, abs=FLOAT64_EXACT)
    buf = torch.empty(40, dtype=torch.float64)
    for where in (None, "cpu:0"):
        r = linalg.lanczos(lambda v: torch.mv(A, v, out=buf), 40, tol=1e-8, basis_device=where)
        assert r.converged
        assert r.top(1)[0][0] == pytest.approx(40.0, abs=r.top(1)[1][0] + FLOAT64_EXACT)
        assert r.bottom(1)[0][0] == pytest.approx(1.0, abs=r.bottom(1)[1][0] + FLOAT64_EXACT)


def test_half_precision_lanczos_keeps_its_dtype():
    # bf16 vectors, float32 accumulation: the values are as good as the bf16 matvec allows, which the
    # asymmetry evidence reports
    eigs = torch.cat([torch.linspace(-1, 1, 498, dtype=torch.float64), torch.tensor([5.0, 8.0], dtype=torch.float64)])
    A = sym_with_spectrum(eigs, seed=11).float()
    seen = []

    def mv16(v):
        seen.append(v.dtype)
        return (v.float() @ A).bfloat16()

    r = linalg.lanczos(mv16, 500, tol=1e-3, dtype=torch.bfloat16, keep_basis=True)
    assert r.converged and set(seen) == {torch.bfloat16} and r.basis.dtype == torch.bfloat16
    assert r.top(1)[0][0] == pytest.approx(8.0, rel=BF16_REL)
    assert 1e-5 < r.asymmetry < BF16_REL


def test_ritz_vectors_follow_the_basis_to_its_device():
    # T's eigenvectors live on the host while the basis lives where the vectors were computed (a GPU in use);
    # the meta device stands in for it here. Mixing the two devices failed on CUDA for every warm start.
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    r = linalg.lanczos(mv(A), 20, tol=1e-10, keep_basis=True)
    r.basis = r.basis.to("meta")
    x = r.ritz_vector(-1)
    assert x.device.type == "meta" and x.shape == (20,)


def test_a_fixed_length_basis_is_handed_back_without_a_copy():
    # SLQ and the deflated trace keep the basis of a run of known length: a copy at the end would hold it
    # twice (16 GB more for a 32-step trace of a 124M-parameter model)
    A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    r = linalg.lanczos(mv(A), 100, tol=0.0, max_iter=40, keep_basis=True)
    assert len(r.basis_blocks) == 1  # one block of the run's length, stored as the run wrote it
    stored = r.basis_blocks[0].untyped_storage().data_ptr()
    assert r.basis.untyped_storage().data_ptr() == stored and r.basis.shape == (40, 100)
    assert torch.allclose(r.basis @ r.basis.T, torch.eye(40, dtype=torch.float64), atol=1e-10)


def test_ritz_vectors_read_a_blocked_basis_without_joining_it():
    # a run stopped by its tolerance stores blocks of 16 vectors; its Ritz vectors must be the eigenvectors'
    # approximations V^T u_i (checked against the joined basis and against A's eigenvectors) without ever
    # building the joined (m, d) copy, which at the end of a warm spectrum run doubled the basis's memory
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    evals = torch.linspace(-1.0, 1.0, 200)  # ascending: Q[:, 0] is the smallest end, Q[:, -1] the largest
    A = (Q * evals.double()) @ Q.T
    r = linalg.lanczos(mv(A), 200, tol=1e-10, max_iter=150, keep_basis=True)
    assert r.converged and len(r.basis_blocks) > 1
    n = len(r.ritz_values)
    X = r.ritz_vectors([n - 1, 0])
    assert len(r.basis_blocks) > 1  # not joined by the call
    joined = torch.cat(r.basis_blocks)
    for row, i in zip(X, (n - 1, 0)):
        x = r.U[:, i] @ joined
        assert torch.allclose(row, x / x.norm(), atol=1e-12)
    # the extreme Ritz vectors are A's extreme eigenvectors (up to sign) to the run's accuracy
    assert abs(float(X[0] @ Q[:, -1])) > 1 - 1e-6 and abs(float(X[1] @ Q[:, 0])) > 1 - 1e-6
    assert torch.allclose(r.ritz_vector(-1), X[0], atol=1e-12)


@pytest.mark.parametrize("tol", [float("inf"), float("nan"), -1e-3])
def test_a_tolerance_that_would_certify_anything_is_refused(tol):
    A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match="finite tol >= 0"):
        linalg.lanczos(mv(A), 10, tol=tol)
