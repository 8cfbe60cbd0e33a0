"""Lean Lanczos (``lanczos(lean=True)``): the working vectors on the compute device with two d-vectors there, the
basis in host memory, the previous vector read back from its row after each product. Checked against the
resident run on matrices with known spectra (float64: the same steps, values and bounds to rounding), through
restarts, and through a host-vector Landscape whose plan asks for it (the spectrum's values as on the host)."""

from __future__ import annotations

import importlib
import weakref

import numpy as np
import pytest
import torch
from reference import make_case
from torch import nn

import geomprobe as gp
from geomprobe.engine.memory_plan import HEADROOM, MemoryBudget, plan_memory
from geomprobe.linalg import krylov_basis
from geomprobe.linalg.krylov_basis import LanczosBasis
from geomprobe.metrics import spectrum
from geomprobe.metrics._common import lanczos_placement

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


def _matrix(ev: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=torch.float64))
    return (Q * ev) @ Q.T


class Product:
    """``H v`` written into ``out`` when given; records which buffer each product was written into, and (with a
    ``basis`` set, a lean one) whether its input was a stored row and which of the basis's two device vectors
    held memory meanwhile."""

    def __init__(self, H: torch.Tensor):
        self.H, self.outs, self.fresh = H, [], 0
        self.basis, self.from_rows, self.alive = None, [], []

    def __call__(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            self.fresh += 1
            return self.H @ v
        self.outs.append(id(out))
        if self.basis is not None:
            self.from_rows.append(_is_row(self.basis, v))
            self.alive.append(_alive(self.basis))
        return torch.mv(self.H, v, out=out)


def _is_row(basis, v: torch.Tensor) -> bool:
    return any(v.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b in basis.blocks)


def _alive(basis) -> int:
    """How many of a lean basis's two device vectors hold memory."""
    return sum(t is not None and t.untyped_storage().nbytes() > 0 for t in basis.lean_vectors.pair)


def _spectrum(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.cat([torch.rand(n - 3, generator=g, dtype=torch.float64) * 2 - 1,
                      torch.tensor([3.0, 2.5, -2.0], dtype=torch.float64)])


@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_a_lean_run_takes_the_resident_runs_steps_through_two_output_buffers(reorth, monkeypatch):
    ev = _spectrum(600, 0)
    H = _matrix(ev, 0)
    seen_prev = []
    step = krylov_basis.krylov_step

    def spy(matvec, basis, cur, dim, dtype, j, prev=None, *a, **k):
        if prev is not None:
            seen_prev.append(any(prev.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                                 for b in basis.blocks))
        return step(matvec, basis, cur, dim, dtype, j, prev, *a, **k)

    monkeypatch.setattr(lanczos_module, "krylov_step", spy)
    kw = {"dtype": torch.float64, "tol": 1e-8, "k": 2, "reorth": reorth, "max_iter": 200}
    mv = Product(H)
    lean = lanczos_module.lanczos(mv, 600, generator=torch.Generator().manual_seed(1), lean=True,
                                  basis_device="cpu", **kw)
    monkeypatch.setattr(lanczos_module, "krylov_step", step)
    res = lanczos_module.lanczos(lambda v: H @ v, 600, generator=torch.Generator().manual_seed(1), **kw)
    assert lean.converged and lean.matvecs == res.matvecs
    assert np.allclose(lean.ritz_values.numpy(), res.ritz_values.numpy(), rtol=0, atol=1e-10)
    for theta, b in zip(lean.ritz_values.tolist(), lean.bounds.tolist()):
        assert float((ev - theta).abs().min()) <= b + 1e-12
    # every product went into one of two alternating buffers
    assert mv.fresh == 0 and len(mv.outs) == lean.matvecs and len(set(mv.outs)) == 2
    assert all(a != b for a, b in zip(mv.outs, mv.outs[1:]))
    # the previous vector came from its stored row every step, never from a third working vector
    assert seen_prev and all(seen_prev)
    assert "beside the products" not in lean.reorth_regime


@pytest.mark.parametrize("mode", ["device", "streamed"])
@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_a_lean_run_holds_its_input_only_where_asked_and_gives_the_newest_vector_back_after_its_step(
        mode, reorth, monkeypatch):
    # streamed: each product reads its input from the newest vector's stored row and only its output holds device
    # memory meanwhile; both modes: a whole-basis pass (every step with reorth="full") holds w alone of the two,
    # beside the row it streams. The values and products are the resident run's.
    ev = _spectrum(400, 3)
    H = _matrix(ev, 3)
    mv = Product(H)
    passes = []
    step, reorth_pass = krylov_basis.krylov_step, LanczosBasis.reorthogonalize

    def spy(matvec, basis, *a, **k):
        mv.basis = basis
        return step(matvec, basis, *a, **k)

    def counted(self, w, *a, **k):
        passes.append(_alive(self))
        return reorth_pass(self, w, *a, **k)

    monkeypatch.setattr(lanczos_module, "krylov_step", spy)
    monkeypatch.setattr(LanczosBasis, "reorthogonalize", counted)
    kw = {"dtype": torch.float64, "tol": 1e-8, "k": 2, "reorth": reorth, "max_iter": 200}
    lean = lanczos_module.lanczos(mv, 400, generator=torch.Generator().manual_seed(4), lean=mode,
                                  basis_device="cpu", **kw)
    monkeypatch.setattr(lanczos_module, "krylov_step", step)
    monkeypatch.setattr(LanczosBasis, "reorthogonalize", reorth_pass)
    res = lanczos_module.lanczos(lambda v: H @ v, 400, generator=torch.Generator().manual_seed(4), **kw)
    assert lean.converged and lean.matvecs == res.matvecs
    assert np.allclose(lean.ritz_values.numpy(), res.ritz_values.numpy(), rtol=0, atol=1e-10)
    assert len(mv.from_rows) == lean.matvecs and all(r == (mode == "streamed") for r in mv.from_rows)
    assert set(mv.alive) == {1 if mode == "streamed" else 2}
    assert passes and max(passes) == 1
    assert len(set(mv.outs)) == 2


def test_a_lean_mode_is_named_or_refused():
    from geomprobe.linalg.lean_vectors import lean_mode, lean_step_bytes, lean_work_bytes
    assert [lean_mode(x) for x in (False, None, True, "device", "streamed")] == [
        None, None, "device", "device", "streamed"]
    with pytest.raises(gp.ConfigurationError, match="lean must be"):
        lean_mode("host")
    with pytest.raises(gp.ConfigurationError, match="lean must be"):  # before any work
        lanczos_module.lanczos(lambda v: v, 10, lean="gpu", basis_device="cpu", dtype=torch.float64)
    assert lean_work_bytes(10, 2) == 40 and lean_work_bytes(10, 2, "streamed") == 20
    assert lean_step_bytes(10, 4) == 120


def test_a_lean_run_without_an_out_parameter_copies_each_product():
    ev = _spectrum(300, 1)
    H = _matrix(ev, 1)
    r = lanczos_module.lanczos(lambda v: H @ v, 300, dtype=torch.float64, tol=1e-8, k=1, lean=True,
                               basis_device="cpu", generator=torch.Generator().manual_seed(2))
    ref = lanczos_module.lanczos(lambda v: H @ v, 300, dtype=torch.float64, tol=1e-8, k=1,
                                 generator=torch.Generator().manual_seed(2))
    assert r.converged and r.matvecs == ref.matvecs
    assert abs(r.top(1)[0][0] - 3.0) < 1e-8 and abs(r.bottom(1)[0][0] + 2.0) < 1e-8


@pytest.mark.parametrize("mode", [True, "streamed"])
@pytest.mark.parametrize("seed", range(2))
def test_a_capped_lean_run_restarts_with_the_guarantees_of_a_resident_one(seed, mode):
    # the offloaded route's restart test (test_capped_partial.py) with the lean basis: partial throughout, the
    # same extremes and matvecs, ||V^T V - I|| small
    ev = _spectrum(1500, seed)
    H = _matrix(ev, seed)
    kw = {"dtype": torch.float64, "tol": 1e-6, "max_basis": 25, "max_iter": 3000, "k": 2, "risk": None}
    mv = Product(H)
    lean = lanczos_module.lanczos(mv, 1500, generator=torch.Generator().manual_seed(seed), keep_basis=True,
                                  lean=mode, basis_device="cpu", **kw)
    res = lanczos_module.lanczos(lambda v: H @ v, 1500, generator=torch.Generator().manual_seed(seed), **kw)
    assert lean.restarts >= 8 and lean.converged and len(set(mv.outs)) == 2
    assert lean.reorth_regime == res.reorth_regime == "partial until the cap and after it (thick restart)"
    assert abs(lean.matvecs - res.matvecs) <= 2
    assert abs(lean.top(1)[0][0] - 3.0) < 1e-5 and abs(lean.bottom(1)[0][0] + 2.0) < 1e-5
    V = lean.basis.double()
    assert float(torch.linalg.matrix_norm(V @ V.T - torch.eye(V.shape[0], dtype=torch.float64), 2)) < 1e-7


def test_the_plan_counts_lean_working_vectors_only_where_asked_and_refuses_a_bad_value():
    GiB = 2**30
    sim = {"dim": 200_000_000, "itemsize": 4, "batch_sizes": [8], "graph_bytes_per_sample": GiB / 4,
           "host_bytes": 1024 * GiB, "largest_param_bytes": 64 * 2**20, "gradient_samples": False,
           "available_bytes": 200 * GiB, "host_vectors": True}
    v = sim["dim"] * 4
    host = plan_memory(**sim, overrides={"vectors": ("host", "user")})
    lean = plan_memory(**sim, overrides={"vectors": ("host", "user"), "working_vectors": ("device", "user")})
    assert host.working_vectors == "host" and host.items["lean_work"] == 0
    assert lean.working_vectors == "device" and lean.sources["working_vectors"] == "user"
    assert lean.items["lean_work"] == 2 * v and lean.items["hvp_phase"] == host.items["hvp_phase"] + 2 * v
    assert lean.peak_bytes >= host.peak_bytes + 2 * v - 1
    device = plan_memory(**sim)  # device vectors: the setting has nothing to place
    assert device.vectors == "device" and device.working_vectors is None
    with pytest.raises(gp.ConfigurationError, match="working_vectors must be"):
        plan_memory(**sim, overrides={"working_vectors": ("gpu", "user")})


def test_the_plan_chooses_lean_vectors_where_it_moved_the_vectors_to_the_host_and_they_fit():
    # the 1.1B Llama in fp32 (benchmarks/results/scale_r30a_llama_1b_fp32_host_h200.json): a training peak that
    # leaves room for the lean run's three d-vectors but not for device vectors
    sim = {"dim": 1104218112, "itemsize": 4, "batch_sizes": [4], "graph_bytes_per_sample": 6568241164.0,
           "allocated_bytes": 17735664640, "available_bytes": 131584834560, "host_bytes": 132 * 10**9,
           "largest_param_bytes": 32000 * 2048 * 4, "gradient_samples": False, "host_vectors": True,
           "basis_vectors": 11, "bounded_basis": True}
    forced = plan_memory(**sim, train_peak_bytes=23282894848, overrides={"working_vectors": ("device", "user")})
    need = forced.peak_bytes

    def at(budget, **kw):  # the training peak whose 1.5x leaves ``budget`` (the lean plan takes it whole)
        return plan_memory(**sim, train_peak_bytes=int((budget + sim["allocated_bytes"]) / 1.5) + 1, **kw)

    roomy = at(need + 2**30)
    assert roomy.vectors == "host" and roomy.sources["vectors"] == "plan"
    assert roomy.working_vectors == "device" and roomy.sources["working_vectors"] == "plan"
    assert roomy.fits and roomy.peak_bytes <= roomy.budget_bytes and roomy.items["lean_work"] == 2 * sim["dim"] * 4
    assert roomy.samples_kept == 0  # the room goes to the lean vectors, not to a kept graph
    # a GiB short of it: the products read their inputs from the host rows, one d-vector less beside them
    tight = at(need - 2**30)
    assert tight.vectors == "host" and tight.working_vectors == "streamed" and tight.fits
    assert tight.items["lean_work"] == sim["dim"] * 4 and tight.peak_bytes < need
    streamed = plan_memory(**sim, train_peak_bytes=23282894848, overrides={"working_vectors": ("streamed", "user")})
    tighter = at(streamed.peak_bytes - 2**30)
    assert tighter.vectors == "host" and tighter.working_vectors == "host"
    assert tighter.items["lean_work"] == 0 and tighter.peak_bytes < streamed.peak_bytes
    # vectors put on the host by the user stay there whole; an explicit choice of the working vectors stands
    assert at(need + 2**30, overrides={"vectors": ("host", "user")}).working_vectors == "host"
    kept = at(need + 2**30, overrides={"working_vectors": ("host", "user")})
    assert kept.working_vectors == "host" and kept.sources["working_vectors"] == "user"
    # the measured training peak: lean, planned within 1.5x (measured 1.44x after the first step's fourth d-vector
    # went, twentieth round); the host placement's own plan keeps the headroom
    real = plan_memory(**sim, train_peak_bytes=23282894848)
    assert real.working_vectors == "device" and real.budget_source == "training peak"
    assert (real.peak_bytes + sim["allocated_bytes"]) / 23282894848 <= 1.5
    assert real.budget_bytes == int(1.5 * 23282894848 - sim["allocated_bytes"])
    assert tighter.budget_bytes == int((1.5 * (int((streamed.peak_bytes - 2**30 + sim["allocated_bytes"]) / 1.5) + 1)
                                        - sim["allocated_bytes"]) * HEADROOM)
    # free device memory is a hard limit: it keeps the headroom for the lean plan too
    hard = plan_memory(**dict(sim, available_bytes=need + 2**30), train_peak_bytes=23282894848)
    assert hard.working_vectors == "streamed"
    harder = plan_memory(**dict(sim, available_bytes=streamed.peak_bytes + 2**30), train_peak_bytes=23282894848)
    assert harder.working_vectors == "host"
    assert plan_memory(**dict(sim, available_bytes=int((need + 2**30) / HEADROOM)),
                       train_peak_bytes=10**12).working_vectors == "device"


class _Land:
    def __init__(self, device, vector_device, working):
        self.device, self.vector_device = torch.device(device), vector_device
        self.plan = type("Plan", (), {"working_vectors": working})()


def test_lanczos_placement_follows_the_plan():
    assert lanczos_placement(_Land("cuda", "cpu", "device")) == {"device": torch.device("cuda"),
                                                                  "basis_device": "cpu", "lean": True}
    assert lanczos_placement(_Land("cuda", "cpu", "host"), None)["device"] == "cpu"
    assert lanczos_placement(_Land("cuda", None, None), "cpu") == {"device": torch.device("cuda"),
                                                                    "basis_device": "cpu", "lean": False}


def test_a_host_vector_landscape_whose_plan_asks_runs_its_spectrum_lean(monkeypatch):
    model, loss, batches, _ = make_case("tanh_mlp")
    calls = []
    real = lanczos_module.lanczos
    spectrum_module = importlib.import_module("geomprobe.metrics.spectrum")
    monkeypatch.setattr(spectrum_module, "lanczos", lambda *a, **k: calls.append(k.get("lean")) or real(*a, **k))
    budget = MemoryBudget(warn=False, gradient_samples=False,
                          overrides={"working_vectors": ("device", "user")})
    lean = gp.Landscape(model, loss, batches, memory=budget, vector_device="cpu")
    host = gp.Landscape(model, loss, batches, memory=MemoryBudget(warn=False, gradient_samples=False),
                        vector_device="cpu")
    assert lean.plan.working_vectors == "device" and host.plan.working_vectors == "host"
    a = spectrum(lean, tol=1e-8, k=2)
    b = spectrum(host, tol=1e-8, k=2)
    assert calls == [True, False]
    assert a["lambda_max"] == pytest.approx(b["lambda_max"], rel=1e-9)
    assert a["lambda_min"] == pytest.approx(b["lambda_min"], rel=1e-9, abs=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["device", "streamed"])
def test_on_a_gpu_a_lean_spectrum_holds_its_d_vectors_and_gives_the_host_runs_values(mode):
    # device inputs: two working vectors beside each product; streamed: each product reads its input from the host
    # row, the output alone beside it (at most w, the newest and the previous vector between products)
    model, x, y = _gpu_mlp(512)
    budget = MemoryBudget(warn=False, gradient_samples=False, overrides={"working_vectors": (mode, "user")})
    lean = gp.Landscape(model, nn.MSELoss(), (x, y), memory=budget, vector_device="cpu")
    host = gp.Landscape(model, nn.MSELoss(), (x, y), memory=MemoryBudget(warn=False, gradient_samples=False),
                        vector_device="cpu")
    assert lanczos_placement(lean)["lean"] == (True if mode == "device" else "streamed")
    _lean_as_host_on_gpu(lean, host, vectors=4 if mode == "device" else 3)


def _gpu_mlp(width: int):
    """Eight linear layers of ``width`` on the GPU and a batch of 64 for an MSE loss."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(8)]).cuda()
    return model, torch.randn(64, width, device="cuda"), torch.randn(64, width, device="cuda")


def _lean_as_host_on_gpu(lean, host, vectors: int = 4) -> None:
    """The lean run's spectrum against the host placement's, and its device memory: two working vectors, a third
    between products (the previous row, or a Ritz accumulator at the end) and the products' own temporaries,
    below ``vectors`` d-vectors (four; three for streamed inputs) beside the graphs (those kept, and one rebuilt
    for a product where the plan rebuilds them), and nothing of length d left afterwards."""
    b = spectrum(host, tol=1e-4, max_iter=30)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    a = spectrum(lean, tol=1e-4, max_iter=30)
    peak = torch.cuda.max_memory_allocated() - base
    assert a["lambda_max"] == pytest.approx(b["lambda_max"], rel=1e-4)
    assert peak < lean.graph_bytes + lean.plan.items["graph_rebuilt"] + vectors * lean.dim * 4
    assert torch.cuda.memory_allocated() - base < lean.dim * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_plan_that_moves_the_vectors_to_the_host_chooses_lean_where_it_fits():
    model, x, y = _gpu_mlp(1024)
    v = sum(p.numel() for p in model.parameters()) * 4
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    chosen = None
    for k in np.arange(2.0, 12.0, 0.5):  # caps from tight to roomy: the first whose plan is lean
        land = gp.Landscape(model, nn.MSELoss(), (x, y), memory=MemoryBudget(
            warn=False, gradient_samples=False, cap_bytes=int(base + k * v)))
        if land.plan.vectors == "device":
            break
        if land.plan.working_vectors == "device":
            chosen = land
            break
        del land
    assert chosen is not None, "no cap gave a lean plan between host vectors and device vectors"
    plan = chosen.plan
    assert plan.vectors == "host" and plan.sources["working_vectors"] == "plan" and plan.fits
    assert plan.peak_bytes <= plan.budget_bytes
    # the same cap with the host placement asked for: the same Lanczos run with its vectors on the host
    host = gp.Landscape(model, nn.MSELoss(), (x, y), memory=MemoryBudget(
        warn=False, gradient_samples=False, cap_bytes=int(base + k * v),
        overrides={"working_vectors": ("host", "user")}))
    assert host.plan.vectors == "host" and host.plan.working_vectors == "host"
    _lean_as_host_on_gpu(chosen, host)


def test_a_lean_whole_basis_pass_holds_one_streamed_row_on_the_device_at_a_time(monkeypatch):
    """A lean basis's rows come to the device one at a time for a whole-basis pass; a first step's two passes
    (CGS2) must free each pass's last row before the next pass brings its first (the 1.1B Llama's lean run peaked at
    four d-vectors in its first step, 1.52x its training step, where three fit), nor hold one piece while the next is
    copied within a pass. On the CPU a row "on the device"
    is the stored row itself, so the copies are made here and counted while alive; the result is the plain pass's."""
    torch.manual_seed(0)
    d = 64
    basis = LanczosBasis(d, torch.float64, "cpu", lean=True)
    Q = torch.linalg.qr(torch.randn(d, 3, dtype=torch.float64))[0]
    for i in range(3):
        basis.append(Q[:, i].clone())
    basis.rows_readable()
    alive: set[int] = set()
    most = [0]

    def counted(row: torch.Tensor) -> torch.Tensor:
        alive.add(id(row))
        most[0] = max(most[0], len(alive))
        weakref.finalize(row, alive.discard, id(row))
        return row

    monkeypatch.setattr(LanczosBasis, "_on_compute", lambda self, rows, device: counted(rows.clone()))
    w = torch.randn(d, dtype=torch.float64)
    w0 = w.clone()
    w, c = basis.reorthogonalize(w, passes=2)
    assert most[0] == 1
    assert torch.allclose(w, w0 - Q @ (Q.T @ w0), atol=1e-12)
    assert torch.allclose(c, Q.T @ w0, atol=1e-12)
    assert float((Q.T @ w).abs().max()) < 1e-13


def test_the_1b_llama_in_bf16_plans_streamed_inputs_within_its_training_peaks_one_and_a_half():
    # measured (benchmarks/results/scale_r48_llama_1b_bf16_lean10_fixed_h200.json): with both lean vectors on the
    # device it peaked at 1.63x its training step; the plan now reads each product's input from its host row
    sim = {"dim": 1104218112, "itemsize": 2, "batch_sizes": [4], "graph_bytes_per_sample": 2772003084.0,
           "allocated_bytes": 8906114048, "available_bytes": 140399705088, "host_bytes": 133240119296,
           "largest_param_bytes": 32000 * 2048 * 2, "gradient_samples": False, "host_vectors": True,
           "basis_vectors": 11, "bounded_basis": True}
    plan = plan_memory(**sim, train_peak_bytes=11117696000)
    assert plan.vectors == "host" and plan.working_vectors == "streamed" and plan.fits
    assert (plan.peak_bytes + sim["allocated_bytes"]) / 11117696000 <= 1.5
    device = plan_memory(**sim, train_peak_bytes=11117696000, overrides={"working_vectors": ("device", "user")})
    assert not device.fits and device.peak_bytes > plan.peak_bytes  # its product: two d-vectors and the graph
    assert plan.peak_bytes == plan.items["device_vectors_fixed"] + 3 * sim["dim"] * 2  # streamed: the step's three
