"""The memory plan's choice of attention (geomprobe.engine.attention_plan): torch's math attention, which keeps
the (T x T) probabilities, or geomprobe's recomputing double backward. A pure rule checked on simulated plans,
then a small causal multi-head transformer under simulated budgets (a memory cap on the CPU): the choice, its
record, the measuring forwards it costs, and HVPs equal to the dense float64 Hessian's whichever attention."""

import json

import pytest
import torch
import torch.nn.functional as F
from reference import dense_hessian
from tolerances import FLOAT64_EXACT
from torch import nn

import geomprobe as gp
from geomprobe.engine import landscape_plan
from geomprobe.engine.attention_plan import choose_attention
from geomprobe.engine.landscape import Landscape
from geomprobe.engine.memory_plan import MemoryBudget, MemoryPlan, plan_memory

MiB = 2**20


class Transformer(nn.Module):
    """One causal self-attention layer of ``heads`` heads through ``F.scaled_dot_product_attention``, a residual,
    mean pooling and a classifier: 315 parameters, so the dense Hessian is cheap, and at 64 tokens the
    probabilities are most of the graph."""

    def __init__(self, d=8, heads=4, classes=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.proj(o.transpose(1, 2).reshape(B, T, d))
        return self.head(torch.tanh(h).mean(1))


def _problem(T=64, n=8):
    torch.manual_seed(0)
    model = Transformer().double()
    g = torch.Generator().manual_seed(1)
    return model, nn.CrossEntropyLoss(), (torch.randn(n, T, 8, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (n,), generator=g))


@pytest.fixture(scope="module")
def problem():
    model, loss_fn, batch = _problem()
    H = dense_hessian(model, loss_fn, [batch])
    per_sample = {r: Landscape(model, loss_fn, batch, memory=None, recompute_attention=r).graph_bytes_per_sample
                  for r in (False, True)}
    return model, loss_fn, batch, H, per_sample


@pytest.fixture
def forwards(monkeypatch):
    """Counts the memory plan's measuring forwards (and which attention each measured with)."""
    seen: list[bool] = []
    measure = Landscape._measure_graph_per_sample

    def counted(self, can_split, recompute=False):
        seen.append(recompute)
        return measure(self, can_split, recompute)

    monkeypatch.setattr(Landscape, "_measure_graph_per_sample", counted)
    return seen


def _budget(cap: float, **kw) -> MemoryBudget:
    # basis_vectors: a short Lanczos basis, so that the graphs decide the plan
    return MemoryBudget(cap_bytes=int(cap), basis_vectors=11, gradient_samples=False, **kw)


def _check_hvps(land: Landscape, H: torch.Tensor) -> None:
    V = torch.randn(3, land.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = V @ H
    err = float((land.hvp(V) - ref).norm() / ref.norm())
    assert err < FLOAT64_EXACT, err


# ---------------------------------------------------------------------------------------------- the rule
def _plan(s: float, cap: float) -> MemoryPlan:
    return plan_memory(dim=10_000, itemsize=4, batch_sizes=[8], graph_bytes_per_sample=s, available_bytes=None,
                       cap_bytes=int(cap), basis_vectors=11, gradient_samples=False, host_is_device=True)


def test_the_rule_on_simulated_plans():
    math_s, rec_s = 4 * MiB, 1 * MiB
    # torch's does not fit, the recomputing one does: the lower peak
    t, r = _plan(math_s, 6 * MiB), _plan(rec_s, 6 * MiB)
    assert not t.fits and r.fits and r.peak_bytes < t.peak_bytes
    assert choose_attention(t, r)[0] is True and "does not fit" in choose_attention(t, r)[1]
    # neither fits: still the lower planned peak; and with the figures swapped, torch's
    t, r = _plan(math_s, 2 * MiB), _plan(rec_s, 2 * MiB)
    assert not t.fits and not r.fits
    assert choose_attention(t, r)[0] is True and choose_attention(r, t)[0] is False
    # torch's fits by rebuilding graphs, the recomputing one keeps all of them
    t, r = _plan(math_s, 40 * MiB), _plan(rec_s, 40 * MiB)
    assert t.fits and t.samples_kept < 8 and r.samples_kept == 8
    recompute, reason = choose_attention(t, r)
    assert recompute and f"{t.samples_kept} of 8" in reason and "keeps 8" in reason
    # ... but not when recomputation keeps no more graphs (here: the same figure)
    assert choose_attention(t, _plan(math_s, 40 * MiB))[0] is False


def test_one_more_graph_kept_does_not_pay_for_slower_products():
    # GPT-2 355M fp32 on an H200 under the 1.5x plan (benchmarks/RESULTS.md section 6): in pieces of one sample
    # torch's attention keeps no graph and the recomputing one keeps one; products took 2.83 s with the
    # recomputing attention against 1.79 s with torch's and every graph rebuilt
    fig = dict(dim=354_823_168, itemsize=4, batch_sizes=[8], available_bytes=143_573_041_152,
               allocated_bytes=5_747_458_048, train_peak_bytes=18_921_759_744, host_bytes=132_929_122_304,
               basis_vectors=13, bounded_basis=True, gradient_samples=False, host_vectors=True,
               largest_param_bytes=50257 * 1024 * 4)
    t = plan_memory(**fig, graph_bytes_per_sample=3133884428.0)
    r = plan_memory(**fig, graph_bytes_per_sample=2027374988.0)
    assert t.fits and r.fits and t.micro_batch_size == r.micro_batch_size == 1
    assert (t.samples_kept, r.samples_kept) == (0, 1)
    recompute, reason = choose_attention(t, r)
    assert not recompute and "predicted 1.20x the time per HVP" in reason
    # at the same pieces, keeping every graph where torch's keeps none pays (8 x 2.1 x 1.36 < 8 x 2.1 + 8) ...
    same = {"micro_batch_size": (1, "user")}
    t = plan_memory(**fig, graph_bytes_per_sample=3133884428.0, overrides=same)
    r = plan_memory(**{**fig, "train_peak_bytes": 10**11}, graph_bytes_per_sample=2027374988.0, overrides=same)
    assert (t.samples_kept, r.samples_kept) == (0, 8) and choose_attention(t, r)[0] is True
    # ... and larger pieces win whatever the graphs kept
    whole = plan_memory(**{**fig, "train_peak_bytes": 10**11}, graph_bytes_per_sample=2027374988.0)
    assert whole.micro_batch_size is None and choose_attention(t, whole)[0] is True
    assert "micro-batches of 8" in choose_attention(t, whole)[1]


def test_the_plan_records_samples_kept():
    p = _plan(4 * MiB, 40 * MiB)
    pieces = p.micro_batch_size or 8
    assert p.items["graphs_kept"] == p.samples_kept * 4 * MiB + (p.samples_kept // pieces) * p.items["vector"]
    assert _plan(4 * MiB, 10**12).samples_kept == 8


# ---------------------------------------------------------------------------------------------- a Landscape
def test_a_tight_budget_chooses_recomputation_and_records_why(problem, forwards):
    model, loss_fn, batch, H, s = problem
    assert s[True] < s[False] / 4  # the probabilities dominate this graph
    land = Landscape(model, loss_fn, batch, memory=_budget(1.2 * s[False]))
    plan = land.plan
    assert land.recompute_attention and plan.attention["recompute"] and plan.fits
    assert "does not fit" in plan.attention["reason"] and plan.attention["other_plan"]["fits"] is False
    assert plan.attention["attention_calls"] == 1
    figures = plan.attention["graph_bytes_per_sample"]
    assert figures["math"] > 4 * figures["recompute"] > 0
    assert plan.graph_bytes_per_sample == figures["recompute"]
    assert forwards == [False, True]  # torch's figure, then the recomputing one, each on a slice
    assert "measured on 1 of 8 samples with recomputing attention" == plan.graph_source  # no batch norm: 1
    info = land.info()
    assert info["recompute_attention"] and info["attention"]["reason"] == plan.attention["reason"]
    json.dumps(plan.to_dict())  # the record is JSON-ready
    assert land.graph_bytes < 8 * s[False] / 4  # built with the recomputing attention
    _check_hvps(land, H)


def test_a_budget_torchs_attention_meets_only_by_rebuilding_graphs(problem, forwards):
    model, loss_fn, batch, H, s = problem
    land = Landscape(model, loss_fn, batch, memory=_budget(8 * s[False]))
    other = land.plan.attention["other_plan"]
    assert land.recompute_attention and land.plan.samples_kept == 8 and land.graph_rebuilds == 0
    assert other["fits"] and other["samples_kept"] < 8 and "rebuilding" in land.plan.attention["reason"]
    assert forwards == [False, True]
    _check_hvps(land, H)
    assert land.graph_rebuilds == 0


def test_a_roomy_budget_keeps_torchs_attention_with_one_measuring_forward(problem, forwards, monkeypatch):
    model, loss_fn, batch, H, _ = problem
    calls = []
    loss_on = Landscape.loss_on
    monkeypatch.setattr(Landscape, "loss_on", lambda self, b: calls.append(1) or loss_on(self, b))
    land = Landscape(model, loss_fn, batch, memory=_budget(10**9))
    assert not land.recompute_attention and land.plan.attention["reason"] == "torch's attention fits with every graph kept"
    assert forwards == [False] and len(calls) == 2  # the measuring forward and the build, as before
    assert land.plan.attention["graph_bytes_per_sample"]["recompute"] is None
    _check_hvps(land, H)
    # nothing limits memory (a device that reports no free memory, no cap, no training peak): nothing measured
    forwards.clear()
    monkeypatch.setattr(landscape_plan, "device_memory", lambda device: (None, 0))
    land = Landscape(model, loss_fn, batch, memory=MemoryBudget())
    assert land.plan.budget_bytes is None and forwards == [] and not land.recompute_attention
    assert land.attention["reason"] == "no memory limit: torch's attention"


def test_forced_attention_is_respected(problem, forwards):
    model, loss_fn, batch, H, s = problem
    with pytest.warns(RuntimeWarning, match="memory_cap leaves"):
        kept = Landscape(model, loss_fn, batch, memory=_budget(1.2 * s[False]), recompute_attention=False)
    assert not kept.recompute_attention and kept.plan.attention["reason"] == "requested" and not kept.plan.fits
    assert forwards == [False]
    _check_hvps(kept, H)
    forwards.clear()
    asked = Landscape(model, loss_fn, batch, memory=_budget(10**9), recompute_attention=True)
    assert asked.recompute_attention and asked.plan.attention["requested"] is True and forwards == [True]
    assert asked.plan.graph_bytes_per_sample < s[False] / 4
    _check_hvps(asked, H)
    # the recomputing attention needs the fast double backward: without it, torch's whatever was asked
    plain = Landscape(model, loss_fn, batch, memory=_budget(1.2 * s[False], warn=False), fast_double_backward=False,
                      recompute_attention=True)
    assert not plain.recompute_attention and "fast_double_backward=False" in plain.attention["reason"]
    for bad in ("yes", 1):
        with pytest.raises(gp.ConfigurationError, match="recompute_attention must be True, False or None"):
            Landscape(model, loss_fn, batch, recompute_attention=bad)


def test_given_figures_need_no_measuring_forward(problem, forwards):
    model, loss_fn, batch, _, s = problem
    first = Landscape(model, loss_fn, batch, memory=_budget(1.2 * s[False]))
    figures = first.plan_figures()
    assert figures["recompute_graph_bytes_per_sample"] == first.graph_bytes_per_sample  # the build's own
    assert figures["attention_calls"] == 1 and figures["graph_bytes_per_sample"] is not None
    forwards.clear()
    again = Landscape(model, loss_fn, batch, memory=_budget(1.2 * s[False], **figures))
    assert forwards == [] and again.recompute_attention and again.plan.graph_source == "given"
    # a plan given whole brings its attention
    whole = Landscape(model, loss_fn, batch, memory=again.plan)
    assert whole.recompute_attention and whole.attention["reason"] == "the given plan's choice"


def test_a_model_without_attention_is_unaffected(forwards):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
    plain = Landscape(model, nn.CrossEntropyLoss(), batch, memory=None)
    cap = 2 * plain.graph_bytes  # torch's plan rebuilds graphs here
    auto = Landscape(model, nn.CrossEntropyLoss(), batch, memory=_budget(cap))
    assert auto.plan.samples_kept < 64 and not auto.recompute_attention
    assert auto.plan.attention["reason"] == "no attention call that the recomputing double backward takes"
    assert forwards == [False]  # no second measuring forward
    forced = Landscape(model, nn.CrossEntropyLoss(), batch, memory=_budget(cap), recompute_attention=False)
    strip = ("attention", "graph_source", "available_bytes", "host_available_bytes", "graph_bytes_per_sample")
    assert ({k: v for k, v in auto.plan.to_dict().items() if k not in strip}
            == {k: v for k, v in forced.plan.to_dict().items() if k not in strip})
    H = dense_hessian(model, nn.CrossEntropyLoss(), [batch])
    _check_hvps(auto, H)


def test_calls_the_recomputing_attention_cannot_take_do_not_count(forwards):
    model, loss_fn, batch = _problem(T=16)
    model.train()
    land = Landscape(model, loss_fn, batch, memory=None)
    assert land.attention["attention_calls"] == 1
    # dropout inside attention: torch's path whatever the plan, so there is nothing to recompute
    orig = F.scaled_dot_product_attention

    def with_dropout(*a, **k):
        return orig(*a, **{**k, "dropout_p": 0.5})

    try:
        F.scaled_dot_product_attention = with_dropout
        with pytest.warns(RuntimeWarning, match="memory_cap leaves"):
            tight = Landscape(model, loss_fn, batch, mode="train", memory=_budget(land.graph_bytes / 2))
    finally:
        F.scaled_dot_product_attention = orig
    assert not tight.recompute_attention and tight.plan.attention["attention_calls"] == 0
    assert "no attention call" in tight.plan.attention["reason"] and forwards == [False]


# ---------------------------------------------------------------------------------------------- the probe
def test_the_probe_passes_the_choice_and_reuses_both_figures(problem, forwards, tmp_path):
    model, loss_fn, batch, _, s = problem
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 8}}, schedule=gp.every(1),
                             run_dir=tmp_path / "run", memory_cap=int(1.2 * s[False]))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same weights: the dense Hessian stays the truth
    probe.attach(opt)
    opt.step()
    probe.close()
    recs = gp.RunReader(tmp_path / "run").records
    assert len(recs) == 2 and all("errors" not in r for r in recs)
    for r in recs:
        att = r["cost"]["memory_plan"]["attention"]
        assert att["recompute"] and att["requested"] == "auto"
    assert forwards == [False, True]  # the first probe measured both; the second reused them
    assert recs[1]["cost"]["memory_plan"]["graph_source"] == "given"
    assert gp.RunReader(tmp_path / "run").meta["probe"]["memory"]["recompute_attention"] == "auto"
    forced = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"max_iter": 8}},
                              memory_cap=int(1.2 * s[False]), recompute_attention=False)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        forced.probe(0)
    assert forced.records[0]["cost"]["memory_plan"]["attention"]["recompute"] is False
    with pytest.raises(gp.ConfigurationError, match="recompute_attention"):
        gp.GeometryProbe(model, loss_fn, batch, recompute_attention="auto")
