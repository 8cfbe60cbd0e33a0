"""The delayed whole-basis pass (linalg/delayed_lanczos.py): the projection of each step runs beside the next
product, the product corrected afterwards through the Lanczos relation. Checked against the ordinary loop
(same tridiagonal to rounding), known spectra (bounds cover the truth), an exhausted Krylov space, a network's
bf16 HVPs, and on a GPU the offloaded basis it exists for."""

from __future__ import annotations

import importlib

import pytest
import torch
from lanczos_helpers import assert_agrees_on_bf16_hvps, assert_matches_ordinary_run, known_spectrum, tiny_gpt2_landscape

from geomprobe.linalg import delayed_lanczos
from geomprobe.linalg.krylov_basis import LanczosBasis

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


def _force_delayed(monkeypatch, from_step: int = 3) -> None:
    # on the CPU the basis is never offloaded: let the loop hand over anyway, from an early step
    monkeypatch.setattr(lanczos_module, "delayed_due", lambda basis, every, steps: every and steps >= from_step)


_known = known_spectrum


def _run(mv, d, dtype, **kw):
    return lanczos_module.lanczos(mv, d, dtype=dtype, generator=torch.Generator().manual_seed(0), keep_basis=True,
                                  **kw)


def test_the_delayed_run_gives_the_full_runs_tridiagonal_and_bounds_that_cover_the_spectrum(monkeypatch):
    mv, ev = _known(1500, torch.float64)
    plain = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full")
    _force_delayed(monkeypatch)
    late = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full")
    assert "passes beside the products from step 4" in late.reorth_regime
    assert_matches_ordinary_run(late, plain, ev)


def test_a_long_float32_run_stays_orthogonal_and_matches_the_full_run(monkeypatch):
    # 200 steps into a dense bulk: the candidate's parts along the basis stay at rounding level (a correction
    # that left the stored vectors' terms to the next projection grew them by ||T|| / beta a step, and gave up
    # every four steps on this matrix)
    mv, _ = _known(2000, torch.float32)
    plain = _run(mv, 2000, torch.float32, tol=0.0, max_iter=200, reorth="full")
    _force_delayed(monkeypatch)
    late = _run(mv, 2000, torch.float32, tol=1e-12, max_iter=200, reorth="full")
    assert late.steps == 200 and late.matvecs == 201
    V = late.basis.double()
    assert float((V @ V.T - torch.eye(200, dtype=torch.float64)).abs().max()) < 2e-6
    torch.testing.assert_close(late.ritz_values[-3:], plain.ritz_values[-3:], rtol=1e-6, atol=0)
    torch.testing.assert_close(late.ritz_values[:3], plain.ritz_values[:3], rtol=0, atol=1e-5)


def test_an_exhausted_krylov_space_ends_the_delayed_run_with_every_eigenvalue(monkeypatch):
    mv, ev = _known(600, torch.float64, distinct=24)
    _force_delayed(monkeypatch)
    r = _run(mv, 600, torch.float64, tol=1e-12, reorth="full")
    assert r.converged and r.steps == 24
    torch.testing.assert_close(r.ritz_values, torch.unique(ev), rtol=0, atol=1e-10)


def test_the_partial_runs_whole_basis_regime_hands_over_and_agrees_on_a_transformers_bf16_hvps(monkeypatch):
    land = tiny_gpt2_landscape(torch.bfloat16)
    kw = {"tol": 1e-3, "max_iter": 120, "risk": None}
    plain = _run(land.hvp, land.dim, torch.bfloat16, **kw)
    _force_delayed(monkeypatch, from_step=8)
    late = _run(land.hvp, land.dim, torch.bfloat16, **kw)
    assert_agrees_on_bf16_hvps(late, plain)


def test_the_delayed_loop_runs_only_for_a_basis_offloaded_from_a_cuda_device():
    cpu = LanczosBasis(10, torch.float32, "cpu")
    assert not delayed_lanczos.delayed_due(cpu, True, 50)

    class Offloaded:
        offloaded, compute, lean = True, torch.device("cuda", 0), False
        space = cpu.space

    assert delayed_lanczos.delayed_due(Offloaded(), True, delayed_lanczos.DELAYED_FROM_STEP)
    assert not delayed_lanczos.delayed_due(Offloaded(), True, delayed_lanczos.DELAYED_FROM_STEP - 1)
    assert not delayed_lanczos.delayed_due(Offloaded(), False, 50)  # passes only where the estimate asks
    lean = Offloaded()
    lean.lean = True  # a lean basis keeps two d-vectors on the device: the loop would hold more
    assert not delayed_lanczos.delayed_due(lean, True, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_an_offloaded_basis_takes_the_delayed_loop_and_gives_the_ordinary_runs_values(monkeypatch):
    d = 4000
    g = torch.Generator().manual_seed(3)
    ev = torch.cat([torch.tensor([30.0]), torch.rand(d - 1, generator=g, dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    H = ((Q * ev) @ Q.T).float().cuda()
    kw = {"tol": 1e-6, "dtype": torch.float32, "device": "cuda", "basis_device": "cpu", "reorth": "full", "risk": None}
    late = lanczos_module.lanczos(lambda v: H @ v, d, generator=torch.Generator().manual_seed(0), **kw)
    assert "passes beside the products" in late.reorth_regime
    monkeypatch.setattr(lanczos_module, "delayed_due", lambda *a: False)
    plain = lanczos_module.lanczos(lambda v: H @ v, d, generator=torch.Generator().manual_seed(0), **kw)
    assert late.matvecs == plain.matvecs + 1
    torch.testing.assert_close(late.ritz_values[-1], plain.ritz_values[-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(late.ritz_values[0], plain.ritz_values[0], rtol=0, atol=1e-5)


def test_a_capped_run_restarts_only_once_its_basis_is_full_and_resumes_from_it(monkeypatch):
    # the bounded-memory run was the restarted loop from its first step: now the plain loop runs until the cap,
    # so a run that converges earlier is the plain run (every step fully orthogonalized), and one that does not
    # continues with thick restarts from the full basis, its first steps counted once
    mv, _ev = _known(1200, torch.float64)
    plain = _run(mv, 1200, torch.float64, tol=1e-10)
    roomy = _run(mv, 1200, torch.float64, tol=1e-10, max_basis=plain.steps + 25)
    # the cap does not change how the run reorthogonalizes (partially here: 4 whole-basis passes of 15 steps)
    assert roomy.restarts == 0 and roomy.steps == plain.steps and roomy.reorth_regime == plain.reorth_regime
    assert roomy.reorthogonalizations == plain.reorthogonalizations < plain.steps
    torch.testing.assert_close(roomy.ritz_values, plain.ritz_values, rtol=0, atol=1e-12)
    # a dense bulk's edge at tol 1e-10 takes more than 30 vectors: restarts, from the plain run's 30
    g = torch.Generator().manual_seed(4)
    ev2 = torch.rand(1200, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(1200, 1200, generator=g, dtype=torch.float64))
    H2 = (Q * ev2) @ Q.T
    mv2 = lambda v: H2 @ v
    calls = []
    inner = lanczos_module.restarted_lanczos
    monkeypatch.setattr(lanczos_module, "restarted_lanczos",
                        lambda *a, **kw: calls.append(kw.get("resume")) or inner(*a, **kw))
    tight = lanczos_module.lanczos(mv2, 1200, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                                   tol=1e-6, max_basis=30, max_iter=3000, which="largest", k=2)
    assert len(calls) == 1 and calls[0] is not None and calls[0].matvecs == 30
    assert tight.restarts >= 1 and tight.converged and tight.basis_peak <= 30
    top = torch.sort(ev2, descending=True).values[:2]
    for (theta, b), want in zip(zip(*tight.top(2)), top.tolist()):
        assert abs(theta - want) <= b + 1e-9


def test_a_step_the_delayed_loop_cannot_project_in_one_pass_goes_back_to_the_ordinary_loop(monkeypatch):
    # every delayed step handed back (as where one classical pass removes most of the candidate): the ordinary
    # loop continues from the candidate projected again, with the previous vector read back from the basis
    mv, _ = _known(1500, torch.float64)
    plain = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full")
    _force_delayed(monkeypatch)
    monkeypatch.setattr(delayed_lanczos, "REPASS", 1.5)
    back = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full")
    handed = back.steps - 3  # from step 4 on, each step's product is taken twice
    assert back.matvecs == plain.matvecs + handed and back.steps == plain.steps
    torch.testing.assert_close(back.alpha, plain.alpha, rtol=0, atol=1e-11 * 40)
    torch.testing.assert_close(back.beta, plain.beta, rtol=0, atol=1e-11 * 40)


def test_the_plan_counts_the_delayed_loops_vectors_where_they_fit_and_the_metrics_follow_it():
    from types import SimpleNamespace

    from geomprobe.engine.memory_plan import plan_memory
    from geomprobe.metrics._common import delayed_fits

    # GPT-2 124M in bf16 under the 1.5x plan, the figures of the eleventh round's GPU runs (RESULTS section 6):
    # the basis in host memory, 0.67 GB above the planned peak, room for the loop's two 249 MB vectors
    case = {"dim": 124_439_808, "itemsize": 2, "batch_sizes": [8], "graph_bytes_per_sample": 580_977_868.0,
                "available_bytes": 148 * 10**9, "allocated_bytes": 1_086_259_712, "host_bytes": 266 * 10**9,
                "bounded_basis": True, "basis_vectors": 301, "gradient_samples": False}
    plan = plan_memory(**case, train_peak_bytes=5_583_023_104)
    v = plan.items["vector"]
    assert plan.basis_device == "cpu" and plan.fits
    assert plan.items["delayed_work"] == delayed_lanczos.DELAYED_EXTRA_VECTORS * v
    assert plan.items["lanczos_phase"] >= plan.items["lanczos_work"] + plan.items["delayed_work"]
    assert plan.peak_bytes <= plan.budget_bytes and delayed_fits(SimpleNamespace(plan=plan))
    # a training peak 5 % lower leaves 0.29 GB: not counted, and the metrics keep the passes between products
    tight = plan_memory(**case, train_peak_bytes=5_300_000_000)
    assert tight.basis_device == "cpu" and tight.fits and tight.items["delayed_work"] == 0
    assert not delayed_fits(SimpleNamespace(plan=tight))
    # a basis on the device never takes the delayed loop: nothing counted
    resident = plan_memory(**case, train_peak_bytes=60 * 10**9)
    assert resident.basis_device is None and resident.items["delayed_work"] == 0
    assert delayed_fits(SimpleNamespace(plan=None))  # no plan, no budget: the device's memory is the limit
    assert delayed_fits(SimpleNamespace(plan=SimpleNamespace(budget_bytes=None)))
