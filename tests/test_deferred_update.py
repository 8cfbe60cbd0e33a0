"""A host Lanczos step that leaves its Gram-Schmidt update to the append (krylov_step's defer): the same run as
the step that applies it at once, two fewer passes over the vectors per step, and every other use of the
vector sees it updated (LanczosBasis.settle, orthogonalize_step, the DGKS fallback)."""

from __future__ import annotations

import importlib

import pytest
import torch

from geomprobe.linalg.krylov_basis import REPASS, LanczosBasis, _host_step, orthogonalize_step
from geomprobe.linalg.lanczos import lanczos

kb = importlib.import_module("geomprobe.linalg.krylov_basis")


def _diag(d: int, dtype: torch.dtype) -> torch.Tensor:
    diag = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    diag[-3:] = torch.tensor([4.0, 6.0, 9.0], dtype=torch.float64)
    diag[0] = -3.0
    return diag.to(dtype)


def _run(monkeypatch, defer: bool, dtype: torch.dtype, d: int = 3000, steps: int = 40):
    monkeypatch.setattr(kb, "DEFER_UPDATE", defer)
    diag = _diag(d, dtype)
    return lanczos(lambda v: diag * v, d, tol=0.0, max_iter=steps, dtype=dtype, device="cpu", keep_basis=True,
                   generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_same_run_as_the_update_applied_at_once(monkeypatch, dtype, rel):
    a = _run(monkeypatch, True, dtype)
    b = _run(monkeypatch, False, dtype)
    assert a.steps == b.steps == 40
    assert torch.allclose(a.alpha, b.alpha, rtol=rel, atol=rel)
    assert torch.allclose(a.beta, b.beta, rtol=rel, atol=rel)
    # the extremes of the known spectrum, both ways
    for r in (a, b):
        assert abs(r.top(1)[0][0] - 9.0) < 1e-6 * 9 and abs(r.bottom(1)[0][0] + 3.0) < 1e-3
    # the stored rows are unit vectors, locally orthogonal to rounding, as without the deferral
    eps = torch.finfo(dtype).eps
    Q = a.basis_blocks[0][: a.steps].double()
    assert float((Q.norm(dim=1) - 1).abs().max()) < 20 * eps
    assert float((Q[1:] * Q[:-1]).sum(1).abs().max()) < 50 * eps


def test_two_fewer_passes_per_step(monkeypatch):
    calls = {"pass": 0, "combine": 0}
    real_pass, real_combine = kb.lanczos_pass, kb.host_combine

    def counted_pass(*a, **k):
        calls["pass"] += 1
        return real_pass(*a, **k)

    def counted_combine(*a, **k):
        calls["combine"] += 1
        return real_combine(*a, **k)

    monkeypatch.setattr(kb, "lanczos_pass", counted_pass)
    monkeypatch.setattr(kb, "host_combine", counted_combine)
    steps = {}
    for defer in (True, False):
        calls.update({"pass": 0, "combine": 0})
        r = _run(monkeypatch, defer, torch.float64, d=500, steps=12)
        steps[defer] = dict(calls, whole=r.reorthogonalizations)
    assert steps[True]["whole"] == steps[False]["whole"] >= 1
    # each of the 11 three-term steps: alpha, the update's coefficients, then the update applied by the pass
    # that writes the row (10 appends: the last step's vector is not stored) instead of one more pass first;
    # a step that takes a whole-basis pass applies it first (LanczosBasis.settle), as before
    assert steps[True]["combine"] == 10 and steps[False]["combine"] == 0
    assert steps[False]["pass"] - steps[True]["pass"] == 11 - steps[True]["whole"]


def _basis(d: int, n: int, seed: int = 0) -> tuple[LanczosBasis, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    basis = LanczosBasis(d, torch.float64, "cpu")
    rows = [basis.append(Q[:, i].clone()) for i in range(n)]
    return basis, rows


def test_settle_and_append_apply_the_pending_update():
    d = 400
    basis, (prev, cur) = _basis(d, 2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    c = torch.tensor([0.25, -0.5], dtype=torch.float64)
    expected = w - 0.25 * prev + 0.5 * cur
    groups = [prev[None], cur[None]]

    basis.defer_correction(w, groups, c)
    other = w.clone()
    assert basis.settle(other) is other and torch.equal(other, w)  # not the pending vector: untouched, still pending
    kept = w.clone()
    row = basis.append_normalized(w, 2.0)
    assert torch.allclose(row, expected / 2.0, rtol=0, atol=1e-15)
    assert torch.equal(w, kept)  # the quotient goes into the row; w is left as it was
    assert basis.n == 3 and basis._pending is None

    basis.defer_correction(w, groups, c)
    assert basis.settle(w) is w and torch.allclose(w, expected, rtol=0, atol=1e-15)
    before = w.clone()
    basis.settle(w)  # nothing pending any more
    assert torch.equal(w, before)


def test_whole_basis_pass_sees_the_update():
    d = 300
    basis, rows = _basis(d, 5, seed=1)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    B = torch.stack(rows)
    basis.defer_correction(w, [B[-2:]], torch.tensor([0.1, 0.2], dtype=torch.float64))
    w, beta = orthogonalize_step(basis, w, float(w.norm()), 6)
    assert basis._pending is None
    assert float((B @ w).abs().max()) < 1e-13 and abs(beta - float(w.norm())) < 1e-12


def test_a_step_that_needs_a_second_pass_is_not_deferred():
    """The three-term step leaves most of w along the basis (a wrong coupling): beta < REPASS * ||w||, so the
    update and its DGKS repass run in the step and nothing is left pending."""
    d = 500
    basis, (prev, cur) = _basis(d, 2, seed=2)
    g = torch.Generator().manual_seed(5)
    small = torch.randn(d, generator=g, dtype=torch.float64)
    small -= prev * (prev @ small) + cur * (cur @ small)
    w = 5.0 * prev + 2.0 * cur + 1e-3 * small  # beta_prev passed as 0: the prev part stays after the three-term
    w, coeffs, beta = _host_step(w, basis, cur, prev, 0.0, 3, local=True, defer=True)
    assert basis._pending is None
    assert beta < REPASS * 5.0
    assert float(prev @ w) < 1e-14 and float(cur @ w) < 1e-14
    assert abs(beta - 1e-3 * float(small.norm())) < 1e-12
    assert abs(float(coeffs[-2]) - 5.0) < 1e-12 and abs(float(coeffs[-1]) - 2.0) < 1e-12
