"""A lean Lanczos step's previous vector written into the product's output before the product (``krylov_step``'s
prefill, a matvec that takes ``add``): the previous row is no longer read after the product, the runs keep the
resident run's values and bounds, the orthogonality estimate still covers the measured inner products, and the
matvec's asymmetry is still measured (at the steps :func:`measures_asymmetry` names and at every whole-basis
pass). Also ``Landscape.hvp(out=..., add=...)`` and ``matvec_into``'s ``add`` against plain products."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from reference import make_case
from test_partial_reorth import SPECTRA, sym_with_spectrum

import geomprobe as gp
from geomprobe.engine.memory_plan import MemoryBudget
from geomprobe.linalg import krylov_basis, orthogonality
from geomprobe.linalg.orthogonality import OrthogonalityEstimate
from geomprobe.linalg.vectors import matvec_into, takes_add, takes_out

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


def _matrix(ev: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=ev.dtype))
    return (Q * ev) @ Q.T


def _spectrum(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.cat([torch.rand(n - 3, generator=g, dtype=dtype) * 2 - 1, torch.tensor([3.0, 2.5, -2.0], dtype=dtype)])


class Adding:
    """``H v`` written into ``out``, or added onto its values with ``add``; records each call's ``add`` and the
    values ``out`` held when the product started."""

    def __init__(self, H: torch.Tensor):
        self.H, self.adds, self.before = H, [], []

    def __call__(self, v: torch.Tensor, out: torch.Tensor | None = None, add=False) -> torch.Tensor:
        if out is None:
            return self.H @ v
        self.adds.append(add)
        self.before.append(out.clone() if add else None)
        res = self.H @ v
        return out.add_(res) if add else out.copy_(res)


def test_measured_steps_are_the_first_two_and_every_fourth():
    assert [j for j in range(1, 21) if lanczos_module.measures_asymmetry(j)] == [1, 2, 4, 8, 12, 16, 20]


@pytest.mark.parametrize("mode", ["device", "streamed"])
@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_a_prefilled_lean_run_gives_the_resident_runs_values_and_reads_no_previous_row_after_those_products(
        mode, reorth, monkeypatch):
    ev = _spectrum(500, 0)
    H = _matrix(ev, 0)
    mv = Adding(H)
    reads = []  # per step: whether the previous vector was read onto the compute device after the product
    step = krylov_basis.krylov_step

    def spy(matvec, basis, cur, dim, dtype, j, prev=None, *a, **k):
        n = len(mv.adds)
        w, coeffs, beta = step(matvec, basis, cur, dim, dtype, j, prev, *a, **k)
        if prev is not None:
            reads.append((k["prefill"], mv.adds[n] is not False))
        return w, coeffs, beta

    monkeypatch.setattr(lanczos_module, "krylov_step", spy)
    kw = {"dtype": torch.float64, "tol": 1e-8, "k": 2, "reorth": reorth, "max_iter": 200}
    lean = lanczos_module.lanczos(mv, 500, generator=torch.Generator().manual_seed(1), lean=mode,
                                  basis_device="cpu", **kw)
    monkeypatch.setattr(lanczos_module, "krylov_step", step)
    res = lanczos_module.lanczos(lambda v: H @ v, 500, generator=torch.Generator().manual_seed(1), **kw)
    assert lean.converged and abs(lean.matvecs - res.matvecs) <= 1
    assert np.allclose(lean.top(2)[0], res.top(2)[0], rtol=0, atol=1e-10)
    assert np.allclose(lean.bottom(1)[0], res.bottom(1)[0], rtol=0, atol=1e-10)
    for theta, b in zip(lean.ritz_values.tolist(), lean.bounds.tolist()):
        assert float((ev - theta).abs().min()) <= b + 1e-12
    # the product added onto its output at exactly the prefilled steps: whole-basis ones all, local ones all but
    # the measured ones
    assert all(p == added for p, added in reads)
    prefilled = [p for p, _ in reads]
    if reorth == "full":
        assert all(prefilled)
    else:
        assert prefilled == [not lanczos_module.measures_asymmetry(j) for j in range(1, len(reads) + 1)]
    # what the product started from: -beta_{j-1} v_{j-1}, the stored row scaled
    i = next(i for i, a in enumerate(mv.adds) if a is not False)
    V = lanczos_module.lanczos(lambda v: H @ v, 500, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                               tol=0, max_iter=i + 1, keep_basis=True, reorth=reorth)
    start = -float(V.beta[i - 1]) * V.basis[i - 1]
    assert torch.allclose(mv.before[i], start, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_a_prefilled_partial_run_keeps_its_estimate_above_the_measured_inner_products(name, dtype, monkeypatch):
    # test_partial_reorth.py's check of the estimate, on the lean run whose prefilled steps leave the inner
    # product with the step-before-last to the recurrence: at every step without a pass the largest estimate
    # over the new vector's inner products is at least the measured one
    A = sym_with_spectrum(SPECTRA[name], seed=4, dtype=dtype)
    seen = []
    advance = OrthogonalityEstimate.advance

    def spy(self, a, *rest, **kw):
        due = advance(self, a, *rest, **kw)
        seen.append((len(a), float(np.abs(self._cur[:-1]).max()), due, kw.get("local_prev", True)))
        return due

    monkeypatch.setattr(OrthogonalityEstimate, "advance", spy)
    monkeypatch.setattr(orthogonality, "SWITCH_WINDOW", -1)  # the estimate at every step, no switch
    r = lanczos_module.lanczos(Adding(A), 600, tol=0.0, max_iter=250, dtype=dtype, keep_basis=True, lean=True,
                               basis_device="cpu", generator=torch.Generator().manual_seed(2))
    V = r.basis.double()
    G = (V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs()
    floor = 10 * math.sqrt(600) * torch.finfo(torch.float64).eps  # the float64 Gram matrix's own rounding
    assert float(G.max()) < 10 * math.sqrt(torch.finfo(dtype).eps)  # semi-orthogonal throughout
    checked = prefilled = 0
    for step, est, due, local_prev in seen:
        if due or step >= V.shape[0]:
            continue
        assert float(G[step, :step].max()) <= max(est, floor), (step, est)
        checked += 1
        prefilled += not local_prev
    assert checked > 50 and prefilled > 30


def test_an_asymmetric_matvec_is_still_found_and_orthogonalized_whole():
    # the matvec's own error (a product off by a small antisymmetric part) shows at the measured steps: the run goes
    # to whole-basis steps for that reason, as without the prefill, and its values stay the full run's
    n = 300
    ev = _spectrum(n, 4)
    H = _matrix(ev, 4)
    g = torch.Generator().manual_seed(5)
    E = torch.randn(n, n, generator=g, dtype=torch.float64) * 1e-5
    noisy = H + (E - E.T)
    lean = lanczos_module.lanczos(Adding(noisy), n, tol=1e-8, k=1, dtype=torch.float64, lean=True, basis_device="cpu",
                                  generator=torch.Generator().manual_seed(6))
    full = lanczos_module.lanczos(lambda v: noisy @ v, n, tol=1e-8, k=1, dtype=torch.float64, reorth="full",
                                  generator=torch.Generator().manual_seed(6))
    assert "the matvec's asymmetry" in lean.reorth_regime
    assert lean.asymmetry > 1e-6
    assert abs(lean.top(1)[0][0] - full.top(1)[0][0]) < 1e-7


def test_matvec_into_adds_onto_out_for_either_kind_of_matvec():
    A = torch.randn(5, 5, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    start = torch.randn(5, dtype=torch.float64)
    for mv in (lambda x: A @ x, Adding(A)):
        out = start.clone()
        assert matvec_into(mv, v, out, add=True) is out
        assert torch.allclose(out, start + A @ v, atol=1e-14)
        out = start.clone()
        assert torch.allclose(matvec_into(mv, v, out), A @ v, atol=1e-14)
    assert takes_add(Adding(A)) and not takes_add(lambda x: A @ x)
    assert takes_out(Adding(A))

    def wrong(x, out=None, add=False):
        return A @ x

    with pytest.raises(gp.ConfigurationError, match="must return the out"):
        matvec_into(wrong, v, start.clone(), add=True)


@pytest.mark.parametrize("case", ["tanh_mlp", "transformer"])
@pytest.mark.parametrize("vector_device", [None, "cpu"])
def test_a_landscape_adds_its_product_onto_out(case, vector_device):
    model, loss, batches, mode = make_case(case)
    land = gp.Landscape(model, loss, batches, mode=mode, vector_device=vector_device,
                        memory=MemoryBudget(warn=False, gradient_samples=False))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(land.dim, generator=g, dtype=land.dtype)
    start = torch.randn(land.dim, generator=g, dtype=land.dtype)
    ref = land.hvp(v)
    out = start.clone()
    assert land.hvp(v, out=out, add=True) is out
    assert torch.allclose(out, start + ref, rtol=1e-12, atol=1e-12)
    out = start.clone()
    assert torch.allclose(land.matvec(v, out, add=True), start + ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(gp.ConfigurationError, match="add needs out"):
        land.hvp(v, add=True)
    # rebuilt graphs (one sample's graph at a time) add the same
    small = gp.Landscape(model, loss, batches, mode=mode, vector_device=vector_device, micro_batch_size=1,
                         memory=MemoryBudget(warn=False, gradient_samples=False))
    out = start.clone()
    small.hvp(v, out=out, add=True)
    assert torch.allclose(out, start + ref, rtol=1e-10, atol=1e-10)


def test_finite_differences_add_their_product_onto_out():
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode, hvp_method="finite-difference")
    v = torch.randn(land.dim, dtype=land.dtype, generator=torch.Generator().manual_seed(1))
    start = torch.ones(land.dim, dtype=land.dtype)
    ref = land.hvp(v)
    out = start.clone()
    land.hvp(v, out=out, add=True)
    assert torch.allclose(out, start + ref, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["device", "streamed"])
def test_on_a_gpu_a_prefilled_lean_spectrum_overlaps_its_copy_and_gives_the_plain_lean_values(mode, monkeypatch):
    # the previous row's copy into the output runs on the rows' side stream (an event the product waits for before
    # its first write); the spectrum is the one the lean run without the prefill gives
    from torch import nn

    from geomprobe.metrics import spectrum
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).cuda()
    x, y = torch.randn(64, 512, device="cuda"), torch.randn(64, 512, device="cuda")
    budget = MemoryBudget(warn=False, gradient_samples=False, overrides={"working_vectors": (mode, "user")})
    from geomprobe.engine import landscape as landscape_module
    warmed = []
    real_warm = landscape_module.warm_lean_rows
    monkeypatch.setattr(landscape_module, "warm_lean_rows", lambda d, t: warmed.append((d, t)) or real_warm(d, t))
    land = gp.Landscape(model, nn.MSELoss(), (x, y), memory=budget, vector_device="cpu")
    assert warmed == [(land.dim, land.dtype)]  # the first row's page-locked block mapped while the graph built
    events = []
    from geomprobe.linalg import lean_vectors
    real_fill = lean_vectors.RowCopies.fill

    def counted(self, out, row, scale):
        e = real_fill(self, out, row, scale)
        events.append(e)
        return e

    monkeypatch.setattr(lean_vectors.RowCopies, "fill", counted)
    a = spectrum(land, tol=0, max_iter=12)
    monkeypatch.setattr(lanczos_module, "measures_asymmetry", lambda j: True)  # no prefill at any local step
    monkeypatch.setattr(lean_vectors.RowCopies, "fill", real_fill)
    b = spectrum(land, tol=0, max_iter=12)
    assert events and all(isinstance(e, torch.cuda.Event) for e in events)
    assert a["lambda_max"] == pytest.approx(b["lambda_max"], rel=1e-5)
    assert a["lambda_min"] == pytest.approx(b["lambda_min"], rel=1e-4, abs=1e-6)
