"""The memory plan: a pure planner checked with simulated memory figures, its use by the Landscape (same HVPs
as unplanned, to float64 precision) and by the probe (recorded, overridable, never fatal), and per-example
gradients within the plan's byte budget (same statistics as unchunked)."""

import json
import warnings

import pytest
import torch
from tolerances import FLOAT64_EXACT
from torch import nn

import geomprobe as gp
from geomprobe.engine.memory_plan import (
    HEADROOM,
    MIN_BOUNDED_BASIS,
    MemoryBudget,
    MemoryPlan,
    budget_bytes,
    persample_row_bytes,
    plan_memory,
    read_training_peak,
)
from geomprobe.engine.persample import PerExampleGradients
from geomprobe.metrics.noise import noise

GiB = 2**30
# A GPT-2-sized problem on a simulated GPU: 124M float32 parameters, 8 sequences of 1 GiB of graph each.
GPT2 = dict(dim=124_000_000, itemsize=4, batch_sizes=[8], graph_bytes_per_sample=GiB, host_bytes=512 * GiB)


def _plan(free_gib, **kw):
    return plan_memory(**{**GPT2, **kw}, available_bytes=int(free_gib * GiB), allocated_bytes=2 * GiB)


def test_the_plan_degrades_step_by_step_as_the_budget_shrinks():
    roomy, chunked, whole, split, smallest = (_plan(g) for g in (1000, 60, 30, 16, 4))
    assert (roomy.chunk_size, roomy.micro_batch_size, roomy.basis_device, roomy.max_basis) == (16, None, None, None)
    assert roomy.graph_budget_bytes is None and roomy.fits
    assert 1 < chunked.chunk_size < 16 and chunked.micro_batch_size is None and chunked.basis_device == "cpu"
    assert whole.chunk_size == 1 and whole.micro_batch_size is None and whole.basis_device == "cpu"
    assert split.micro_batch_size is not None and split.micro_batch_size < 8 and split.fits
    assert split.graph_budget_bytes is not None and split.items["graph_rebuilt"] > 0  # some graphs recomputed
    # nothing fits: the largest pieces within 10 % of the least need (the d-vectors, not the graphs, overflow)
    assert not smallest.fits and smallest.micro_batch_size in (1, 2) and smallest.chunk_size == 1
    for p in (roomy, chunked, whole, split):
        assert p.peak_bytes <= p.budget_bytes         # the plan's own arithmetic keeps within the budget


def test_planned_peaks_stay_within_every_budget_and_chunks_only_shrink():
    last = None
    for free in range(1024, 8, -8):
        p = _plan(free)
        assert p.budget_bytes == int(free * GiB * HEADROOM)
        phases = max(p.items["hvp_phase"], p.items["lanczos_phase"], p.items["persample_phase"])
        assert p.items["vector"] + p.items["graphs_kept"] + p.items["graph_rebuilt"] + phases == p.peak_bytes
        assert p.fits == (p.peak_bytes <= p.budget_bytes)
        if last is not None:
            # (pieces may grow as the budget shrinks: a full basis on the device can be worth splitting the
            # batch for, a basis in host memory is not; and smaller pieces make each vector cheaper)
            if (p.micro_batch_size, p.basis_device) == (last.micro_batch_size, last.basis_device):
                assert p.chunk_size <= last.chunk_size
            assert last.fits or not p.fits
        last = p


def test_a_bounded_basis_is_preferred_to_host_memory_when_the_kernel_offers_it():
    host = _plan(40)
    bounded = _plan(40, bounded_basis=True)
    assert host.basis_device == "cpu" and host.max_basis is None
    assert bounded.basis_device is None and MIN_BOUNDED_BASIS <= bounded.max_basis < bounded.basis_vectors
    assert bounded.items["basis_on_device"] == bounded.max_basis * GPT2["dim"] * 4
    assert bounded.peak_bytes <= bounded.budget_bytes
    # the host cannot hold the full basis either: bounded there, or the smallest plan with a clear warning
    tiny_host = _plan(14, host_bytes=40 * GiB, bounded_basis=True)
    assert tiny_host.basis_device == "cpu" and tiny_host.max_basis * GPT2["dim"] * 4 <= 20 * GiB
    no_room = _plan(14, host_bytes=4 * GiB)
    assert no_room.basis_device == "cpu" and any("lower the metrics' max_iter" in w for w in no_room.warnings)


def test_the_budget_comes_from_the_tightest_known_limit():
    assert budget_bytes(available_bytes=None) == (None, "no limit")
    b, src = budget_bytes(available_bytes=100 * GiB, allocated_bytes=10 * GiB, train_peak_bytes=20 * GiB)
    assert src == "training peak" and b == int((1.5 * 20 - 10) * GiB * HEADROOM)
    b, src = budget_bytes(available_bytes=5 * GiB, allocated_bytes=10 * GiB, train_peak_bytes=20 * GiB)
    assert src == "free memory" and b == int(5 * GiB * HEADROOM)
    b, src = budget_bytes(available_bytes=100 * GiB, allocated_bytes=10 * GiB, train_peak_bytes=20 * GiB,
                          peak_ratio=3.0, cap_bytes=12 * GiB)
    assert src == "memory cap" and b == int(2 * GiB * HEADROOM)
    with pytest.raises(gp.ConfigurationError, match="peak_ratio must be > 0"):
        budget_bytes(available_bytes=None, peak_ratio=0)


def test_no_limit_plans_the_defaults():
    p = plan_memory(**{**GPT2, "graph_bytes_per_sample": None}, available_bytes=None)
    assert (p.budget_bytes, p.budget_source, p.fits) == (None, "no limit", True)
    assert (p.chunk_size, p.micro_batch_size, p.basis_device, p.max_basis, p.persample_bytes) == (16, None, None, None, None)


def test_an_impossible_budget_gives_the_smallest_plan_and_says_what_to_do():
    p = plan_memory(**GPT2, available_bytes=100 * GiB, allocated_bytes=10 * GiB, cap_bytes=8 * GiB)
    assert not p.fits and p.chunk_size == 1 and p.micro_batch_size in (1, 2)
    assert "already used up" in " ".join(p.warnings)
    assert "runs with the smallest plan" in p.warnings[0] and "memory_cap" in p.warnings[0]
    json.dumps(p.to_dict())  # JSON-ready, warnings included


def test_when_vectors_not_graphs_overflow_the_batch_is_not_cut_to_single_samples():
    # a graph of 1 MiB per sample beside 400 MiB vectors: splitting would save little and recompute much
    p = plan_memory(dim=10**8, itemsize=4, batch_sizes=[64], graph_bytes_per_sample=2**20,
                    available_bytes=2 * GiB)
    assert not p.fits and p.chunk_size == 1
    assert p.micro_batch_size is None or p.micro_batch_size >= 16
    graph_bound = plan_memory(dim=10**6, itemsize=4, batch_sizes=[64], graph_bytes_per_sample=GiB,
                              available_bytes=2 * GiB)
    assert not graph_bound.fits and graph_bound.micro_batch_size == 1


def test_explicit_settings_win_and_are_recorded_as_such():
    p = _plan(14, overrides={"chunk_size": (4, "user"), "micro_batch_size": (2, "oom-ladder"),
                             "basis_device": ("cpu", "user")})
    assert (p.chunk_size, p.micro_batch_size, p.basis_device) == (4, 2, "cpu")
    assert p.sources["chunk_size"] == "user" and p.sources["micro_batch_size"] == "oom-ladder"
    assert p.sources["max_basis"] == "plan"
    with pytest.raises(gp.ConfigurationError, match="chunk_size must be >= 1"):
        _plan(14, overrides={"chunk_size": (0, "user")})
    with pytest.raises(gp.ConfigurationError, match="non-empty batches"):
        plan_memory(dim=10, itemsize=4, batch_sizes=[], graph_bytes_per_sample=1.0, available_bytes=None)


# ---------------------------------------------------------------------------------------------- Landscape
def _problem(n=24):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, nn.CrossEntropyLoss(), (torch.randn(n, 5, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (n,), generator=g))


def test_a_planned_landscape_gives_the_same_hvps_as_an_unplanned_one():
    model, loss_fn, batch = _problem(n=240)
    plain = gp.Landscape(model, loss_fn, batch, memory=None)
    assert plain.plan is None and plain.chunk_size == 16
    d = plain.dim
    # a cap that leaves room for about half the batch's graph and a few dozen vectors
    cap = int((plain.graph_bytes / 2 + 30 * d * 8) / HEADROOM)
    planned = gp.Landscape(model, loss_fn, batch, memory=MemoryBudget(cap_bytes=cap, basis_vectors=11))
    plan = planned.plan
    assert plan.budget_source == "memory cap" and plan.fits and plan.basis_vectors == 11
    assert planned.micro_batch_size is not None and planned.micro_batch_size < 240
    assert 1 <= planned.chunk_size < 16 and plan.graph_source.startswith("measured on")
    V = torch.randn(20, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = plain.hvp(V)
    assert torch.allclose(planned.hvp(V), ref, rtol=FLOAT64_EXACT, atol=FLOAT64_EXACT * float(ref.abs().max()))
    assert planned.graph_rebuilds > 0                 # graphs beyond the budget were recomputed
    assert abs(planned.loss - plain.loss) <= FLOAT64_EXACT and torch.allclose(planned.grad, plain.grad)


def test_a_landscape_takes_a_plan_whole_and_explicit_settings_beat_it():
    model, loss_fn, batch = _problem()
    p = plan_memory(dim=sum(q.numel() for q in model.parameters()), itemsize=8, batch_sizes=[24],
                    graph_bytes_per_sample=1.0, available_bytes=None,
                    overrides={"micro_batch_size": (5, "user"), "chunk_size": (3, "user")})
    land = gp.Landscape(model, loss_fn, batch, memory=p)
    assert land.plan is p and land.micro_batch_size == 5 and land.chunk_size == 3 and len(land.batches) == 5
    land = gp.Landscape(model, loss_fn, batch, memory=p, chunk_size=7)
    assert land.chunk_size == 7
    with pytest.raises(gp.ConfigurationError, match="memory must be 'auto', None"):
        gp.Landscape(model, loss_fn, batch, memory="lots")


# ---------------------------------------------------------------------------------------------- the probe
def _train(probe, model, batch, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    probe.close()


def test_the_probe_records_its_plan_in_every_record_and_the_run(tmp_path):
    model, loss_fn, batch = _problem()
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 10}}, schedule=gp.every(1),
                             run_dir=tmp_path / "run", chunk_size=4)
    _train(probe, model, batch, 2)
    run = gp.RunReader(tmp_path / "run")
    recs = run.records
    assert len(recs) == 3 and all("errors" not in r for r in recs)
    for r in recs:
        plan = r["cost"]["memory_plan"]
        assert plan["chunk_size"] == 4 and plan["sources"]["chunk_size"] == "user"
        assert plan["sources"]["micro_batch_size"] == "plan"
    assert recs[0]["cost"]["memory_plan"]["graph_source"].startswith("measured")
    assert recs[1]["cost"]["memory_plan"]["graph_source"] == "given"   # the first probe's measurement reused
    assert run.meta["probe"]["memory"]["first_plan"]["dim"] == recs[0]["cost"]["memory_plan"]["dim"]
    off = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 10}}, memory_plan=False)
    _train(off, model, batch, 0)
    assert off.records[0]["cost"]["memory_plan"] is None and off.records[0]["cost"]["chunk_size"] == 16


def test_an_impossible_cap_warns_and_training_continues(tmp_path):
    model, loss_fn, batch = _problem()
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 10}}, schedule=gp.every(1),
                             memory_cap=1)
    with pytest.warns(RuntimeWarning, match="smallest plan"):
        _train(probe, model, batch, 2)
    assert len(probe.records) == 3
    for r in probe.records:
        plan = r["cost"]["memory_plan"]
        assert plan["budget_source"] == "memory cap" and not plan["fits"]
        assert r["cost"]["chunk_size"] == 1 and r["cost"]["basis_device"] is None  # the CPU has no host to use
        assert r["cost"]["micro_batch_size"] == plan["micro_batch_size"] < 24
        assert 0 < r["spectrum"]["hvps"] <= 10    # the probe still measures (the CPU has the memory; warm starts may need fewer)


def test_read_training_peak_is_cuda_only():
    assert read_training_peak("cpu") is None


# ---------------------------------------------------------------------------------------------- per-example
def test_per_example_chunks_fit_their_byte_budget_and_give_the_same_statistics():
    model, loss_fn, batch = _problem(n=64)
    land = gp.Landscape(model, loss_fn, batch, memory=None)
    row = persample_row_bytes(land.dim, 8, land.graph_bytes_per_sample)
    whole = PerExampleGradients(land, chunk_size=64)
    assert whole.chunk_size == 64
    budget = 3 * row + row // 2
    part = PerExampleGradients(land, chunk_size=64, max_bytes=budget)
    assert part.chunk_size == 3 and part.row_bytes == row
    blocks = list(part)
    assert max(b.shape[0] for b in blocks) * row <= budget and sum(b.shape[0] for b in blocks) == 64
    assert torch.equal(torch.cat(blocks), whole.matrix()) or torch.allclose(
        torch.cat(blocks), whole.matrix(), rtol=FLOAT64_EXACT, atol=FLOAT64_EXACT)
    assert PerExampleGradients(land, max_bytes=1).chunk_size == 1   # down to one example, never zero
    with pytest.raises(gp.ConfigurationError, match="max_bytes must be >= 1"):
        PerExampleGradients(land, max_bytes=0)

    # the noise metric on a Landscape whose plan allows 2 rows at a time: the same statistics as unchunked
    p = plan_memory(dim=land.dim, itemsize=8, batch_sizes=[64], graph_bytes_per_sample=land.graph_bytes_per_sample,
                    available_bytes=None, overrides={"persample_bytes": (2 * row, "user")})
    planned = gp.Landscape(model, loss_fn, batch, memory=p)
    assert PerExampleGradients(planned).chunk_size == 2
    a, b = noise(land, n_boot=20), noise(planned, n_boot=20)
    for key in ("trace_cov", "grad_norm_sq", "noise_scale", "snr", "alpha_pooled", "hill_alpha"):
        assert b[key] == pytest.approx(a[key], rel=FLOAT64_EXACT, abs=FLOAT64_EXACT), key


@pytest.mark.gpu
def test_on_a_gpu_the_plan_reads_free_memory_and_the_training_peak():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, loss_fn, batch = _problem()
    model = model.float().cuda()
    batch = (batch[0].float().cuda(), batch[1].cuda())
    land = gp.Landscape(model, loss_fn, batch)
    assert land.plan.available_bytes > 0 and land.plan.allocated_bytes > 0
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 10}}, schedule=gp.every(1))
    with warnings.catch_warnings():  # a model this small cannot keep within 1.5x its training peak: it may warn
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(probe, model, batch, 2)
    assert probe.records[0]["cost"]["train_peak_mib"] is None     # step 0: no training measured yet
    assert probe.records[1]["cost"]["train_peak_mib"] > 0
    assert probe.records[1]["cost"]["memory_plan"]["budget_source"] == "training peak"
    assert isinstance(land.plan, MemoryPlan)


def _tight_cap(n=240, vectors=30):
    """A cap that holds about half the graph of ``_problem(n)`` and ``vectors`` d-vectors (float64)."""
    model, loss_fn, batch = _problem(n)
    plain = gp.Landscape(model, loss_fn, batch, memory=None)
    return int((plain.graph_bytes / 2 + vectors * plain.dim * 8) / HEADROOM)


def test_the_safety_net_starts_from_the_planned_settings_and_is_recorded(monkeypatch):
    from geomprobe.engine import landscape

    model, loss_fn, batch = _problem(240)
    cap = _tight_cap()
    real = landscape.Landscape._build
    calls = {"n": 0}

    def oom_once(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(self)

    monkeypatch.setattr(landscape.Landscape, "_build", oom_once)
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 10}}, schedule=gp.every(1),
                             memory_cap=cap)
    with pytest.warns(RuntimeWarning, match="landscape failed"):
        _train(probe, model, batch, 1)
    first, second = probe.records
    planned = first["cost"]["memory_plan"]
    assert first["errors"]["landscape"].startswith("OutOfMemory") and planned["micro_batch_size"] < 240
    assert second["cost"]["micro_batch_size"] == planned["micro_batch_size"] // 2 and "errors" not in second
    assert second["cost"]["memory_plan"]["sources"]["micro_batch_size"] == "oom-ladder"
    assert second["cost"]["chunk_size"] == max(1, planned["chunk_size"] // 2)


def test_metrics_that_can_bound_their_basis_receive_the_plans_max_basis(monkeypatch):
    from geomprobe.metrics import registry

    seen = []

    def lanczos_like(land, basis_device=None, max_basis=None, max_iter=None):
        seen.append((basis_device, max_basis))
        return {"value": 1.0}

    monkeypatch.setitem(registry.REGISTRY, "bounded", registry.Metric("bounded", lanczos_like, "none"))
    model, loss_fn, batch = _problem(240)
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics=["bounded"], memory_cap=_tight_cap(vectors=80))
    _train(probe, model, batch, 0)
    plan = probe.records[0]["cost"]["memory_plan"]
    assert plan["bounded_basis"] and plan["fits"]
    assert seen == [(plan["basis_device"], plan["max_basis"])] and plan["max_basis"] >= MIN_BOUNDED_BASIS
    assert plan["basis_device"] is None and plan["max_basis"] < plan["basis_vectors"]
    assert plan["basis_vectors"] == 301
    # spectrum bounds its basis too (thick restart), so with it in the probe the plan may still bound it
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"bounded": {"max_iter": 10}, "spectrum": {"max_iter": 10}},
                             memory_cap=_tight_cap(vectors=80))
    _train(probe, model, batch, 0)
    plan = probe.records[0]["cost"]["memory_plan"]
    assert plan["bounded_basis"] and plan["basis_vectors"] == 11 and plan["fits"]
    assert seen[-1] == (None, None) == (plan["basis_device"], plan["max_basis"])


def test_a_basis_moves_to_host_memory_only_off_the_cpu():
    on_gpu = _plan(30)
    on_cpu = _plan(30, host_is_device=True)
    assert on_gpu.basis_device == "cpu" and on_cpu.basis_device is None
    assert not on_cpu.fits and "does not fit the budget;" in " ".join(on_cpu.warnings)
    assert _plan(30, host_is_device=True, basis_vectors=0).fits   # no Lanczos: nothing to store


def test_a_probe_without_gradient_sample_metrics_does_not_plan_for_them():
    # GPT-2 124M fp32 on an H200 (8 x 512 tokens, benchmarks/RESULTS.md §6): planning the per-example phase for a
    # spectrum-only probe made it the largest phase (13.75 GiB planned against 8.9 GiB measured)
    h200 = dict(dim=124439808, itemsize=4, batch_sizes=[8], graph_bytes_per_sample=1823571970.0,
                available_bytes=147739357184, allocated_bytes=1583239168, train_peak_bytes=8613979136,
                host_bytes=132957696000, basis_vectors=301, bounded_basis=True)
    with_rows, without = plan_memory(**h200), plan_memory(**h200, gradient_samples=False)
    assert without.persample_bytes is None and without.items["persample_phase"] == 0
    assert without.peak_bytes < 0.8 * with_rows.peak_bytes
    assert without.peak_bytes <= 1.1 * 8.9 * GiB  # within 10 % of the probe's measured own peak
    assert with_rows.items["persample_phase"] > without.items["lanczos_phase"]


def test_the_probe_plans_gradient_samples_only_for_metrics_that_stream_them():
    model, loss_fn, batch = _problem(n=64)  # noise needs >= 50 per-example gradients
    plans = {}
    for metrics in (["spectrum"], ["spectrum", "noise"]):
        probe = gp.GeometryProbe(model, loss_fn, batch, metrics=metrics, memory_cap=10 * GiB)
        _train(probe, model, batch, 0)
        plans[len(metrics)] = probe.records[0]["cost"]["memory_plan"]
    assert plans[1]["persample_bytes"] is None and plans[1]["items"]["persample_phase"] == 0
    assert plans[2]["persample_bytes"] is not None and plans[2]["items"]["persample_phase"] > 0
