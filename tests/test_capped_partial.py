"""A capped Lanczos run reorthogonalizes partially until its basis is full and hands a semi-orthogonal basis to
the thick restart (linalg/lanczos.py, restarted_lanczos.RestartFrom): the residual made orthogonal to the whole
basis first, and the restarted run goes on partially with the same estimate, which follows the kept Ritz vectors
through each restart (orthogonality.OrthogonalityEstimate.restarted) and widens the bounds. Checked on matrices
with known spectra over seeds (every bound covers the truth, the estimate stays above the measured departure
from orthonormality), on the hand-over itself, and on the passes it saves."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from geomprobe.linalg.restarted_lanczos import restarted_lanczos

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


def _matrix(ev: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=torch.float64))
    return (Q * ev) @ Q.T


def _bulk(n: int, seed: int) -> torch.Tensor:
    # a dense bulk with a few outliers: the edges need more than a 40-vector basis at tol 1e-6
    g = torch.Generator().manual_seed(100 + seed)
    return torch.cat([torch.rand(n - 3, generator=g, dtype=torch.float64) * 2 - 1,
                      torch.tensor([3.0, 2.5, -2.0], dtype=torch.float64)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_a_capped_partial_run_restarts_from_its_semi_orthogonal_basis_with_bounds_that_cover(dtype, seed, monkeypatch):
    ev = _bulk(1000, seed)
    H = _matrix(ev, seed).to(dtype)
    handed = []

    def spy(*a, **kw):
        if kw.get("resume") is not None:
            r = kw["resume"]
            Q = r.basis.matrix().double()
            handed.append((float((Q @ r.w.double()).abs().max() / r.w.double().norm()), r.widen, r.passes, r.matvecs))
        return restarted_lanczos(*a, **kw)

    monkeypatch.setattr(lanczos_module, "restarted_lanczos", spy)
    r = lanczos_module.lanczos(lambda v: H @ v, 1000, dtype=dtype, generator=torch.Generator().manual_seed(seed),
                               tol=1e-6, max_basis=40, max_iter=3000, k=2, risk=None)
    assert len(handed) == 1
    leak, widen, passes, steps = handed[0]
    assert steps == 40 and passes < steps  # partial until the cap: most steps took no whole-basis pass
    eps = torch.finfo(dtype).eps
    assert leak < 50 * eps  # the residual handed over is orthogonal to the whole basis
    assert 1.0 <= widen < 1.01
    assert r.restarts >= 1 and r.converged and r.basis_peak <= 40
    assert r.reorth_regime == "partial until the cap and after it (thick restart)"
    # after the cap too: a pass at the first step after each restart and where the estimate asks, far fewer
    # than one per restarted step (what the restarted loop took before)
    assert passes < r.reorthogonalizations < passes + 0.6 * (r.matvecs - 40)
    # every bound covers an eigenvalue, and the extremes are the matrix's (to the matvec's own precision)
    slack = 0.0 if dtype == torch.float64 else 1e-5 * 3.0
    for theta, b in zip(r.ritz_values.tolist(), r.bounds.tolist()):
        assert float((ev - theta).abs().min()) <= b + slack + 1e-12
    top, bottom = torch.sort(ev).values[-2:].flip(0), torch.sort(ev).values[:2]
    for (theta, b), want in zip(zip(*r.top(2)), top.tolist()):
        assert abs(theta - want) <= b + slack + 1e-12
    for (theta, b), want in zip(zip(*r.bottom(2)), bottom.tolist()):
        assert abs(theta - want) <= b + slack + 1e-12


def test_a_capped_run_whose_every_step_is_a_pass_hands_over_without_another(monkeypatch):
    ev = _bulk(800, 7)
    H = _matrix(ev, 7)
    passes = []

    def spy(*a, **kw):
        passes.append((kw["resume"].passes, kw["resume"].widen))
        return restarted_lanczos(*a, **kw)

    monkeypatch.setattr(lanczos_module, "restarted_lanczos", spy)
    r = lanczos_module.lanczos(lambda v: H @ v, 800, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                               tol=1e-6, max_basis=30, max_iter=2000, k=2, risk=None, reorth="full")
    assert passes == [(30, 1.0)] and r.reorth_regime == "full (thick restart)" and r.converged
    assert r.reorthogonalizations == r.matvecs


def test_the_cap_saves_the_passes_it_used_to_force():
    # the same capped run, partial (default) against every step a whole-basis pass (what a cap forced before)
    ev = _bulk(1500, 3)
    H = _matrix(ev, 3).float()
    kw = {"dtype": torch.float32, "tol": 1e-4, "max_basis": 60, "max_iter": 400, "risk": None}
    part = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(1), **kw)
    full = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(1), reorth="full",
                                  **kw)
    assert part.converged and full.converged
    assert part.reorthogonalizations < 0.5 * full.reorthogonalizations
    torch.testing.assert_close(part.ritz_values[-1], full.ritz_values[-1], rtol=1e-5, atol=0)
    torch.testing.assert_close(part.ritz_values[0], full.ritz_values[0], rtol=1e-5, atol=0)


def test_a_capped_runs_blocks_stop_at_the_cap(monkeypatch):
    # whole 16-row blocks held up to 15 vectors more than the memory plan counted (a cap of 30: 32 rows)
    from geomprobe.linalg.krylov_basis import LanczosBasis

    rows = []
    inner = LanczosBasis._new_block
    monkeypatch.setattr(LanczosBasis, "_new_block", lambda self, r: rows.append(r) or inner(self, r))
    ev = _bulk(900, 2)
    H = _matrix(ev, 2)
    r = lanczos_module.lanczos(lambda v: H @ v, 900, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                               tol=1e-6, max_basis=30, max_iter=2000, k=2, risk=None)
    assert r.restarts >= 1 and r.converged
    # the plain run's blocks (16 + 14), then the restarted run reuses that basis
    assert sum(rows) == 30 and max(rows) == 16


def _kept_estimates(monkeypatch) -> list:
    from geomprobe.linalg.orthogonality import OrthogonalityEstimate

    seen = []
    inner = OrthogonalityEstimate.restarted
    monkeypatch.setattr(OrthogonalityEstimate, "restarted", lambda self, U: seen.append(self) or inner(self, U))
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_the_estimate_follows_the_kept_ritz_vectors_through_many_restarts(dtype, seed, monkeypatch):
    # a cap of 25 on a 1500 x 1500 bulk: 10-22 restarts. The estimate's bound on ||V^T V - I|| (the Perron root
    # of its entries, the kept block as sigma I) and on each Ritz vector's norm stay above the measured ones,
    # the run takes the full run's matvecs and extremes with a fraction of its passes
    ev = _bulk(1500, seed)
    H = _matrix(ev, seed).to(dtype)
    seen = _kept_estimates(monkeypatch)
    kw = {"dtype": dtype, "tol": 1e-6, "max_basis": 25, "max_iter": 3000, "k": 2, "risk": None}
    r = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(seed), keep_basis=True,
                               **kw)
    full = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(seed), reorth="full",
                                  **kw)
    assert r.restarts >= 8 and seen and r.converged
    V = r.basis.double()
    E = (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).numpy()
    W = seen[-1]._omega[: V.shape[0], : V.shape[0]]
    assert np.linalg.norm(E, 2) <= np.linalg.eigvalsh(W)[-1]
    for u in r.U.numpy().T:  # ||V u||^2 - 1, measured against the quadratic form the bounds widen by
        assert abs(u @ E @ u) <= np.abs(u) @ W @ np.abs(u)
    assert np.linalg.eigvalsh(W)[-1] < (1e-7 if dtype == torch.float64 else 3e-3)  # factors within 0.15 %
    assert r.matvecs == full.matvecs and r.reorthogonalizations < 0.5 * full.reorthogonalizations
    slack = 0.0 if dtype == torch.float64 else 1e-5 * 3.0
    for theta, b in zip(r.ritz_values.tolist(), r.bounds.tolist()):
        assert float((ev - theta).abs().min()) <= b + slack + 1e-12


def test_an_asymmetric_product_after_the_cap_goes_to_whole_basis_steps():
    # a product that turns asymmetric (1e-4 relative) after the cap: the restarted run's estimate takes the
    # measured asymmetry, its passes come back to back and every later step is a pass; the answers stay the
    # full run's
    ev = _bulk(1200, 5)
    H = _matrix(ev, 5)
    N = torch.randn(1200, 1200, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    A = H + 1e-4 * (N - N.T) / 1200**0.5
    kw = {"dtype": torch.float64, "tol": 1e-6, "max_basis": 30, "max_iter": 3000, "k": 2, "risk": None}

    def run(reorth):
        calls = [0]

        def mv(v):
            calls[0] += 1
            return (H if calls[0] <= 30 else A) @ v

        return lanczos_module.lanczos(mv, 1200, generator=torch.Generator().manual_seed(0), reorth=reorth, **kw)

    r, full = run("partial"), run("full")
    assert r.converged and r.restarts >= 1
    assert r.reorth_regime.startswith("partial until the cap, then whole-basis from step")
    assert "the matvec's asymmetry" in r.reorth_regime
    assert r.top(2)[0] == pytest.approx(full.top(2)[0], abs=1e-3)
    assert r.bottom(2)[0] == pytest.approx(full.bottom(2)[0], abs=1e-3)


def test_the_certified_extremes_of_capped_partial_runs_cover_at_their_stated_rate():
    # 60 random starts on three 800 x 800 spectra whose edges are a dense bulk (spacing 2.5e-3, the hardest
    # case for a certificate: a start nearly orthogonal to the last eigenvector converges to the next one),
    # capped at 30 vectors: partial reorthogonalization until and after the cap, the extremes certified at
    # risk 1 % each. 120 end checks: at most 4 misses (binomial tail 7e-4 at the stated rate)
    misses = runs = 0
    for mseed in range(3):
        g = torch.Generator().manual_seed(100 + mseed)
        ev = torch.linspace(-1, 1, 800, dtype=torch.float64) + 1e-4 * torch.rand(800, generator=g, dtype=torch.float64)
        H = _matrix(ev, mseed)
        for seed in range(20):
            r = lanczos_module.lanczos(lambda v: H @ v, 800, dtype=torch.float64, tol=1e-3, max_iter=3000, k=1,
                                       max_basis=30, risk=0.01, generator=torch.Generator().manual_seed(1000 + seed))
            assert r.converged and r.restarts >= 1
            assert r.reorth_regime == "partial until the cap and after it (thick restart)"
            e_min, e_max = r.extreme_err
            misses += (r.bottom(1)[0][0] - float(ev.min()) > e_min) + (float(ev.max()) - r.top(1)[0][0] > e_max)
            runs += 1
    assert runs == 60 and misses <= 4


def _offloaded_against_resident(seed: int, monkeypatch, device: str, off_kw: dict) -> None:
    ev = _bulk(1500, seed)
    H = _matrix(ev, seed).to(torch.float64).to(device)
    seen = _kept_estimates(monkeypatch)
    kw = {"dtype": torch.float64, "tol": 1e-6, "max_basis": 25, "max_iter": 3000, "k": 2, "risk": None}
    off = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(seed),
                                 keep_basis=True, device=device, **off_kw, **kw)
    assert seen
    estimate = seen[-1]  # the offloaded run's, before the resident run adds its own
    res = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(seed),
                                 keep_basis=True, device=device, **kw)
    assert off.restarts >= 8 and off.converged
    assert off.reorth_regime == res.reorth_regime == "partial until the cap and after it (thick restart)"
    assert abs(off.matvecs - res.matvecs) <= 2  # rounding apart (the offloaded pass goes a few rows at a time)
    assert abs(off.top(1)[0][0] - float(ev.max())) < 1e-5 and abs(off.bottom(1)[0][0] - float(ev.min())) < 1e-5
    V = off.basis.double().cpu()
    E = (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).numpy()
    W = estimate._omega[: V.shape[0], : V.shape[0]]
    assert np.linalg.norm(E, 2) <= np.linalg.eigvalsh(W)[-1]


@pytest.mark.parametrize("seed", range(2))
def test_the_offloaded_route_on_the_cpu_restarts_with_the_guarantees_of_a_resident_run(seed, monkeypatch):
    """The offloaded basis's arithmetic (rows streamed a few at a time) on a CPU basis marked offloaded. Its
    first pass after a restart once took each piece's coefficients from w as the earlier pieces left it: the
    couplings read as the matvec's asymmetry (1.9e-9 to 2.5e-6), the run fell to whole-basis passes from step
    50-60 and ||V^T V - I|| reached 1.6e-5 to 1.1e-3 (the same on an H200, round33)."""
    from geomprobe.linalg import krylov_basis

    init = krylov_basis.LanczosBasis.__init__
    marked = []

    def offloaded(self, *a, **k):
        init(self, *a, **k)
        if not marked:  # the first basis made: the offloaded run's; the resident run's stays as it is
            self.offloaded, self.on_host = True, False
            marked.append(self)

    monkeypatch.setattr(krylov_basis.LanczosBasis, "__init__", offloaded)
    _offloaded_against_resident(seed, monkeypatch, "cpu", {})
    assert marked and marked[0].offloaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", range(2))
def test_an_offloaded_capped_run_restarts_with_the_guarantees_of_a_resident_one(seed, monkeypatch):
    """The same capped runs as above with the vectors on the GPU and the basis offloaded to host memory (the
    1.5x plan's route): the estimate still bounds ||V^T V - I||, the regime stays partial, and the extremes and
    matvecs are the resident run's."""
    _offloaded_against_resident(seed, monkeypatch, "cuda", {"basis_device": "cpu"})
