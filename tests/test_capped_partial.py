"""A capped Lanczos run reorthogonalizes partially until its basis is full and hands a semi-orthogonal basis to
the thick restart (linalg/lanczos.py, restarted_lanczos.RestartFrom): the residual made orthogonal to the whole
basis first, the later bounds widened by the basis's estimated departure from orthonormality. Checked on
matrices with known spectra over seeds (every bound covers the truth), on the hand-over itself, and on the
passes it saves."""

from __future__ import annotations

import importlib

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
    assert r.reorth_regime == "partial until the cap, then full (thick restart)"
    assert passes < r.reorthogonalizations <= passes + r.matvecs - 40
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
