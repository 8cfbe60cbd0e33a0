"""The converged Ritz vectors of selective orthogonalization (linalg/orthogonality.py) are d-vectors on the
compute device beside the basis: the memory plan counts them where its budget holds them
(``items["selective_work"]``), and where it does not, the metrics run Lanczos with ``selective=False``, which
takes whole-basis steps instead and keeps none, with the same answers."""

import sys
from types import SimpleNamespace

import pytest
import torch
from lanczos_helpers import outlier_run

import geomprobe as gp
from geomprobe.engine.memory_plan import HEADROOM, plan_memory
from geomprobe.engine.sharded_plan import plan_sharded_exact
from geomprobe.linalg.orthogonality import SELECTIVE_VECTORS
from geomprobe.metrics._common import plan_options, selective_fits

# a float32 model of 1M parameters with its basis of 51 vectors on the device and one HVP at a time: the
# Lanczos phase is the probe's largest, so the kept Ritz vectors decide its peak
CASE = {"dim": 1_000_000, "itemsize": 4, "batch_sizes": [8], "graph_bytes_per_sample": 2e6,
        "available_bytes": None, "basis_vectors": 51, "gradient_samples": False, "host_bytes": 10**10,
        "bounded_basis": True, "overrides": {"chunk_size": (1, "user")}}


def _under(cap: int, **kw):
    return plan_memory(**{**CASE, **kw}, cap_bytes=int(cap / HEADROOM) + 2)  # a budget of cap bytes, to the byte


def test_the_plan_counts_the_kept_ritz_vectors_where_they_fit():
    free = plan_memory(**CASE)
    v = free.items["vector"]
    assert free.basis_device is None and free.items["basis_on_device"] == 51 * v
    assert free.items["selective_work"] == SELECTIVE_VECTORS * v
    assert free.items["lanczos_phase"] == (free.items["hvp_phase"] + free.items["lanczos_work"]
                                           + free.items["basis_on_device"] + SELECTIVE_VECTORS * v)
    need = free.peak_bytes
    held = _under(need)
    assert held.items["selective_work"] == SELECTIVE_VECTORS * v and held.peak_bytes <= held.budget_bytes
    assert selective_fits(SimpleNamespace(plan=held))
    # four vectors less: the basis stays on the device, the Ritz vectors are not counted, and the plan's peak
    # is what the run will hold (before, the plan said 272 MB and a selective run held 288)
    tight = _under(need - SELECTIVE_VECTORS * v)
    assert tight.fits and tight.basis_device is None and tight.items["basis_on_device"] == 51 * v
    assert tight.items["selective_work"] == 0 and tight.peak_bytes <= tight.budget_bytes
    assert tight.peak_bytes == need - SELECTIVE_VECTORS * v
    assert not selective_fits(SimpleNamespace(plan=tight))
    assert plan_options(SimpleNamespace(plan=tight)) == {"delayed": False, "selective": False}


def test_half_precision_and_host_vectors_hold_none_on_the_device():
    # a half-precision product's asymmetry keeps its runs out of the selective regime: nothing is counted
    assert plan_memory(**{**CASE, "itemsize": 2}).items["selective_work"] == 0
    host = plan_memory(**{**CASE, "overrides": {"vectors": ("host", "user"), "chunk_size": (1, "user")}},
                       cap_bytes=10**9)
    assert host.vectors == "host" and host.items["selective_work"] == 0
    assert selective_fits(SimpleNamespace(plan=host))  # kept in host memory, beside the basis
    assert selective_fits(SimpleNamespace(plan=None))  # no plan, no budget: the device's memory is the limit
    assert selective_fits(SimpleNamespace(plan=SimpleNamespace(budget_bytes=None)))


def test_the_sharded_plan_counts_them_per_slice():
    GiB = 2**30
    kw = {"dim": 2 * 10**8, "local_dim": 10**8, "itemsize": 4, "whole_bytes": GiB, "batch_sizes": [4],
          "graph_bytes_per_sample": 10**7, "available_bytes": 40 * GiB, "host_bytes": 100 * GiB,
          "largest_param_bytes": 10**8}
    p = plan_sharded_exact(**kw)
    L = p.items["slice"]
    assert p.items["selective_work"] == SELECTIVE_VECTORS * L
    assert p.items["lanczos_phase"] >= p.items["lanczos_work"] + p.items["basis_on_device"] + SELECTIVE_VECTORS * L
    assert plan_sharded_exact(**{**kw, "itemsize": 2}).items["selective_work"] == 0


def test_without_room_the_run_keeps_no_ritz_vector_and_gives_the_same_answers(monkeypatch):
    eigs, held, kept = outlier_run(monkeypatch)
    assert kept and held.reorth_regime.startswith("selective from step")
    _, bare, kept = outlier_run(monkeypatch, selective=False)
    assert not kept  # not one Ritz vector held beside the basis
    assert bare.reorth_regime.startswith("whole-basis from step")
    assert "no room for the converged Ritz vectors" in bare.reorth_regime
    assert bare.converged and bare.reorthogonalizations > held.reorthogonalizations - 2
    assert bare.top(1)[0][0] == pytest.approx(100.0, rel=1e-6)
    assert bare.bottom(1)[0][0] == pytest.approx(held.bottom(1)[0][0], abs=1e-3)
    for r in (held, bare):  # each end's bound covers an eigenvalue (float32 products: their rounding added)
        for (value,), (err,) in (r.bottom(1), r.top(1)):
            assert float((eigs - value).abs().min()) <= err + 1e-5 * 100


def test_the_metrics_take_the_plans_word(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    land = gp.Landscape(model, torch.nn.functional.mse_loss, [(x, y)])
    land.plan = SimpleNamespace(budget_bytes=10**6, items={"selective_work": 0, "delayed_work": 0})
    seen = []
    spec = sys.modules["geomprobe.metrics.spectrum"]
    real = spec.lanczos
    monkeypatch.setattr(spec, "lanczos", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    out = spec.spectrum(land, tol=1e-6)
    assert seen and seen[0]["selective"] is False and seen[0]["delayed"] is False
    assert out["converged"]
