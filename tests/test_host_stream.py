"""Host vectors (engine/host_stream.py): HVPs streamed from and into host memory parameter by parameter equal the
device mode's to float64 rounding (kept and rebuilt graphs, several batches, micro-batches, a tiny GPT-2), the
user's parameters, buffers, ``.grad`` and hooks are as found (after a failure too), the memory plan takes the
mode when nothing else fits and records who chose it, and spectrum runs on host vectors with the same
eigenvalues. On the CPU host and device are one: the passes are the streamed ones, the copies no-ops."""

import copy
import sys

import pytest
import torch
from reference import make_case
from test_double_backward_check import DetachedSquare
from tolerances import FLOAT64_REL
from torch import nn

import geomprobe as gp
from geomprobe.engine import host_stream, landscape_plan
from geomprobe.engine.memory_plan import HEADROOM, MemoryBudget, MemoryPlan, plan_memory
from geomprobe.linalg import device_draw
from geomprobe.metrics import spectrum
from geomprobe.metrics.ritz_vectors import extreme_ritz
from geomprobe.probe.warm_start import WarmStart

STREAMED = 1e-12  # two routes to the same double backward, relative to the largest entry
GiB = 2**30


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = STREAMED) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def _vectors(land, k=3, seed=1):
    return torch.randn(k, land.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- products
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_bn", "transformer", "dropout_train"])
@pytest.mark.parametrize("budget", [None, 1], ids=["kept", "rebuilt"])
def test_host_hvps_equal_device_hvps(name, budget):
    model, loss, batches, mode = make_case(name)
    assert len(batches) > 1  # several probe batches: one streamed pass each, summed on the host
    device = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=budget)
    host = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=budget, vector_device="cpu")
    V = _vectors(device)
    got = host.hvp(V)
    assert got.device.type == "cpu" and got.dtype == torch.float64 and got.shape == V.shape
    assert _close(got, device.hvp(V))
    assert _close(host.hvp(V[0]), device.hvp(V[0]))  # a single vector too
    assert _close(host.hvp(V.T.contiguous().T[1]), device.hvp(V[1]))  # and one with gaps between its entries
    assert torch.equal(host.grad, device.grad) or _close(host.grad, device.grad)
    assert host.loss == device.loss and host.hvps == 5
    # a block goes one vector at a time: one pass per vector and probe batch
    assert host.host.stats["passes"] == 5 * len(host.batches)
    if budget == 1:
        # below one graph neither mode keeps any
        assert device.info()["graphs_kept"] == 0 and device.graph_rebuilds >= 1
        assert host.graph_rebuilds >= 1 and host.info()["graphs_kept"] == 0


def test_kept_graphs_hold_their_roots_not_their_gradients():
    model, loss, batches, _ = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, vector_device="cpu")
    assert all(isinstance(r, host_stream.Root) or r is None for g in land._graphs for r in g)
    assert land.grad.device.type == "cpu"


def test_micro_batches_and_a_tiny_gpt2_stream_the_same_products():
    model, loss, batches, _ = make_case("tanh_mlp")
    device = gp.Landscape(model, loss, batches)
    split = gp.Landscape(model, loss, batches, micro_batch_size=3, graph_budget_bytes=1, vector_device="cpu")
    V = _vectors(device, 2)
    assert len(split.batches) > len(batches) and _close(split.hvp(V), device.hvp(V))

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=8, n_layer=2, n_head=2, n_positions=16, vocab_size=11,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1))

    def lm_loss(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, 11), batch["input_ids"][:, 1:].reshape(-1))

    data = [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}]
    for budget in (None, 1):
        dev = gp.Landscape(gpt, lm_loss, data, graph_budget_bytes=budget)
        host = gp.Landscape(gpt, lm_loss, data, graph_budget_bytes=budget, vector_device="cpu")
        V = _vectors(dev, 2, seed=3)
        assert _close(host.hvp(V), dev.hvp(V))


def test_bf16_host_hvps_are_as_accurate_as_the_device_modes(monkeypatch):
    model, loss, batches, _ = make_case("tanh_mlp")
    exact = gp.Landscape(model, loss, batches)  # float64: the reference
    model = copy.deepcopy(model).to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    device = gp.Landscape(model, loss, batches)
    host = gp.Landscape(model, loss, batches, vector_device="cpu")
    host_plain = gp.Landscape(model, loss, batches, vector_device="cpu")
    V = _vectors(device, 2).to(torch.bfloat16)
    ref = exact.hvp(V.double())
    # the host mode adds each weight's contributions into its output as they come (bf16 sums in another order
    # than autograd's): not the device mode's bits, but as far from the float64 product
    err = lambda H: float((H.double() - ref).norm() / ref.norm())
    h, dv = host.hvp(V), device.hvp(V)
    assert err(h) < 2 * err(dv) + 2**-8 and err(h) < 0.05
    # without interception the passes are the device mode's double backward, summed in its order: same bits
    original = host_stream.HostStreamPass.__init__
    monkeypatch.setattr(host_stream.HostStreamPass, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "intercept": False}))
    assert torch.equal(host_plain.hvp(V), dv)


class _Squares(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5).double(), nn.Linear(5, 2).double()
        self.act = act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_constant_gradients_and_the_custom_function_check_stream_too():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64))
    model = _Squares(nn.ReLU())
    linear = lambda out, y: (out * y).mean()  # b.bias has a constant gradient: no root, zero Hessian rows
    device, host = gp.Landscape(model, linear, data), gp.Landscape(model, linear, data, vector_device="cpu")
    H = device.hvp(torch.eye(device.dim, dtype=torch.float64))
    assert _close(host.hvp(torch.eye(host.dim, dtype=torch.float64)), H) and H.abs().max() > 1e-2
    assert host.hvp(torch.eye(host.dim, dtype=torch.float64))[-2:].abs().max() == 0
    # the check of custom Functions (one HVP against differences) runs through the streamed passes too
    with pytest.raises(gp.UnsupportedOperationError, match="DetachedSquare"):
        gp.Landscape(_Squares(DetachedSquare.apply), nn.MSELoss(), data, vector_device="cpu")


# ---------------------------------------------------------------------------------------------- user state
def _user_state(model):
    return (copy.deepcopy(model.state_dict()), [p.grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], torch.get_rng_state(),
            [p._backward_hooks for p in model.parameters()])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_parameters_buffers_grad_and_hooks_are_as_found(mode):
    model, loss, batches, _ = make_case("cnn_bn")
    params = list(model.parameters())
    # one parameter with a .grad tensor, the others None; a post-accumulate-grad hook (as an optimizer stepping
    # inside backward registers) must never fire: the streamed passes run no gradient accumulator
    params[0].grad = torch.randn_like(params[0])
    fired = []
    handle = params[1].register_post_accumulate_grad_hook(lambda p: fired.append(p))
    before = _user_state(model)
    buffers = list(model.buffers())
    with gp.Landscape(model, loss, batches, mode=mode, vector_device="cpu", graph_budget_bytes=1) as land:
        land.hvp(_vectors(land, 2))
        spectrum(land, tol=1e-4, max_iter=20)
    sd, grads, values, rng, hooks = _user_state(model)
    assert all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert all(a is b for a, b in zip(grads, before[1]))  # the very .grad objects (and None where None)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(values, before[2]))
    assert torch.equal(rng, before[3]) and all(a is b for a, b in zip(buffers, model.buffers()))
    assert hooks == before[4] == [None] * len(params)  # no hook table left on the user's tensors
    assert fired == []
    handle.remove()


def test_a_failure_inside_the_double_backward_leaves_no_hook_behind(monkeypatch):
    model, loss, batches, _ = make_case("tanh_mlp")
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    grad_before = params[0].grad
    device = gp.Landscape(model, loss, batches)
    land = gp.Landscape(model, loss, batches, vector_device="cpu")
    v = _vectors(land, 1)[0]
    real = host_stream.HostStreamPass._add_partial  # a contribution taken at its producer, inside autograd
    calls = {"n": 0}

    def fail_second(self, i, x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure in the middle of the double backward")
        return real(self, i, x)

    monkeypatch.setattr(host_stream.HostStreamPass, "_add_partial", fail_second)
    with pytest.raises(RuntimeError, match="simulated failure"):
        land.hvp(v)
    monkeypatch.undo()
    assert calls["n"] == 2
    assert params[0].grad is grad_before and torch.equal(grad_before, torch.ones_like(grad_before))
    assert all(p.grad is None for p in params[1:]) and all(p._backward_hooks is None for p in params)
    # the roots' pre-hooks went too: a stale one would swap the failed pass's pieces into this one
    assert _close(land.hvp(v), device.hvp(v)) and _close(land.hvp(-2 * v), device.hvp(-2 * v))


def test_bad_settings_are_refused_clearly():
    model, loss, batches, _ = make_case("tanh_mlp")
    with pytest.raises(gp.ConfigurationError, match="neither 'cpu'"):
        gp.Landscape(model, loss, batches, vector_device="cuda:3")
    with pytest.raises(gp.ConfigurationError, match="vector_device must be"):
        gp.Landscape(model, loss, batches, vector_device="nowhere")
    with pytest.raises(gp.ConfigurationError, match="finite differences"):
        gp.Landscape(model, loss, batches, vector_device="cpu", hvp_method="finite-difference")
    with pytest.raises(gp.ConfigurationError, match="finite differences"):
        gp.GeometryProbe(model, loss, batches[0], vector_device="cpu", hvp_method="finite-difference")
    with pytest.raises(gp.ConfigurationError, match="vector_device must be"):
        gp.GeometryProbe(model, loss, batches[0], vector_device=3.5)
    land = gp.Landscape(model, loss, batches, vector_device="cpu")
    with pytest.raises(gp.ConfigurationError, match="hvp takes a vector"):
        land.hvp(torch.zeros(land.dim + 1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- the plan
# Figures of a model on a simulated GPU: 200M float32 parameters, 8 samples of 0.25 GiB of graph each.
SIM = {"dim": 200_000_000, "itemsize": 4, "batch_sizes": [8], "graph_bytes_per_sample": GiB / 4,
       "host_bytes": 1024 * GiB, "largest_param_bytes": 64 * 2**20, "gradient_samples": False}


def test_the_plan_takes_host_vectors_only_when_nothing_else_fits():
    v = SIM["dim"] * 4
    roomy = plan_memory(**SIM, available_bytes=200 * GiB, host_vectors=True)
    tight = plan_memory(**SIM, available_bytes=int(6 * GiB / HEADROOM), host_vectors=True)
    stuck = plan_memory(**SIM, available_bytes=int(6 * GiB / HEADROOM), host_vectors=False)
    assert roomy.vectors == "device" and roomy.fits and roomy.chunk_size > 1
    # device vectors need the gradient, the HVP's 3 and Lanczos' 4 d-vectors at least (6 GiB < 8 x 0.75 GiB)
    assert not stuck.fits and stuck.vectors == "device"
    assert tight.vectors == "host" and tight.fits and tight.peak_bytes <= tight.budget_bytes
    assert tight.sources["vectors"] == "plan" and tight.to_dict()["vectors"] == "host"
    assert tight.chunk_size == 1 and tight.basis_device == "cpu"
    # the budget has room for a lean run's working vectors beside every graph: the plan takes it
    assert tight.working_vectors == "device" and tight.sources["working_vectors"] == "plan"
    assert tight.items["lean_work"] == 2 * v
    # nothing of length d on the device: no flat gradient, no Lanczos vectors, no basis; pieces in flight only
    assert tight.items["device_vectors_fixed"] == 0 and tight.items["lanczos_work"] == 0
    assert tight.items["basis_on_device"] == 0 and tight.items["hvp_vectors"] == 2 * SIM["largest_param_bytes"]
    assert tight.items["graphs_kept"] == 8 * GiB // 4  # kept graphs hold their roots, not their gradients
    assert tight.peak_bytes - tight.items["lean_work"] < 2 * v + tight.items["graphs_kept"] + 8 * GiB // 4
    host_only = plan_memory(**SIM, available_bytes=int(6 * GiB / HEADROOM), host_vectors=True,
                            overrides={"working_vectors": ("host", "user")})
    assert host_only.vectors == "host" and host_only.working_vectors == "host" and host_only.items["lean_work"] == 0
    assert host_only.peak_bytes < 2 * v + host_only.items["graphs_kept"] + 8 * GiB // 4
    # a model on the CPU has no host to move vectors to
    on_cpu = plan_memory(**SIM, available_bytes=int(6 * GiB / HEADROOM), host_vectors=True, host_is_device=True)
    assert on_cpu.vectors == "device" and not on_cpu.fits


def test_host_vectors_keep_no_graph_below_one_and_rebuild_without_a_gradient():
    # the 1B Llama's figures on an H200 (benchmarks/RESULTS.md section 6, fourth round): bf16, 4 samples of
    # 3.63 GB of graph, the training step peaking at 11.1 GB with 8.9 GB resident: 1.5x leaves 7.75 GB
    GB, s = 10**9, 3.63e9
    llama = {"dim": 850_000_000, "itemsize": 2, "batch_sizes": [4], "graph_bytes_per_sample": s,
             "host_bytes": 100 * GB, "largest_param_bytes": 131_000_000, "gradient_samples": False,
             "available_bytes": 130 * GB, "allocated_bytes": int(8.9 * GB), "train_peak_bytes": int(11.1 * GB)}
    p = plan_memory(**llama, host_vectors=True)
    assert p.vectors == "host" and p.micro_batch_size == 1 and p.samples_kept == 0
    # one sample's graph rebuilt per pass (no gradient d-vector: its roots are taken as it forms) and the
    # double backward beside it: 2 s + 2 pieces, not the 3 s + v of keeping the first graph as well
    assert p.items["graphs_kept"] == 0 and p.items["graph_rebuilt"] == int(s)
    assert p.peak_bytes <= 2 * s + 2 * llama["largest_param_bytes"] + 1
    # the same figures with device vectors (basis in host memory) need several GB more
    dev = plan_memory(**llama, host_vectors=False)
    assert dev.vectors == "device" and dev.peak_bytes > p.peak_bytes + 5 * GB


@pytest.mark.parametrize("case", ["fp32", "bf16"])
def test_vectors_stay_on_the_device_where_rebuilding_every_graph_fits(case):
    # GPT-2 355M on an H200 under the 1.5x default (benchmarks/RESULTS.md section 6, seventeenth round's plans):
    # device vectors fit only with no graph kept, which the plan once refused (the first graph was always kept),
    # so it moved the vectors to the host: 3.9 s a product and 1.5-3.4 s of host arithmetic a step, where every
    # graph rebuilt costs 1.79 s a product (fp32) and nothing outside it
    fig = {"fp32": (4, 3133884428.0, 5747458048, 18921759744), "bf16": (2, 1669989388.0, 2908872704, 10736270336)}
    itemsize, s, allocated, train_peak = fig[case]
    gpt2 = {"dim": 354_823_168, "itemsize": itemsize, "batch_sizes": [8], "graph_bytes_per_sample": s,
            "available_bytes": 143_573_041_152, "allocated_bytes": allocated, "train_peak_bytes": train_peak,
            "host_bytes": 132_929_122_304, "basis_vectors": 13, "bounded_basis": True, "gradient_samples": False,
            "host_vectors": True, "largest_param_bytes": 50257 * 1024 * itemsize}
    p = plan_memory(**gpt2)
    assert p.vectors == "device" and p.fits and p.peak_bytes <= p.budget_bytes
    assert p.micro_batch_size == 1 and p.samples_kept == 0 and p.items["graphs_kept"] == 0
    assert p.items["graph_rebuilt"] == int(s) + p.items["vector"]  # one graph and its gradient at a time
    assert p.basis_device == "cpu"
    # the Landscape then keeps no graph either (the budget is below one), so the plan is what runs
    assert p.graph_budget_bytes is not None and p.graph_budget_bytes < s + p.items["vector"]


def test_an_explicit_vectors_setting_wins_and_is_recorded():
    forced = plan_memory(**SIM, available_bytes=200 * GiB, host_vectors=True, overrides={"vectors": ("host", "user")})
    assert forced.vectors == "host" and forced.sources["vectors"] == "user" and forced.chunk_size == 1
    kept = plan_memory(**SIM, available_bytes=int(6 * GiB / HEADROOM), host_vectors=True,
                       overrides={"vectors": ("device", "user")})
    assert kept.vectors == "device" and kept.sources["vectors"] == "user" and not kept.fits
    with pytest.raises(gp.ConfigurationError, match="vectors must be"):
        plan_memory(**SIM, available_bytes=None, overrides={"vectors": ("disk", "user")})


def _as_if_on_cuda(monkeypatch):
    """The Landscape's plan as for a model on CUDA in one process (the CPU is then the host)."""
    real = landscape_plan.plan_memory
    monkeypatch.setattr(landscape_plan, "host_vectors_possible", lambda land: True)
    monkeypatch.setattr(landscape_plan, "plan_memory", lambda **kw: real(**{**kw, "host_is_device": False}))


def _small_budget(land_dim: int) -> MemoryBudget:
    # 4 d-vectors of float64 and a negligible graph: device vectors need about 9, host vectors none
    return MemoryBudget(cap_bytes=int(4 * land_dim * 8 / HEADROOM), graph_bytes_per_sample=8.0, warn=False,
                        gradient_samples=False)


def test_a_landscape_under_a_small_budget_takes_host_vectors_and_records_it(monkeypatch):
    _as_if_on_cuda(monkeypatch)
    model, loss, batches, _ = make_case("tanh_mlp")
    ref = gp.Landscape(model, loss, batches, memory=None)
    land = gp.Landscape(model, loss, batches, memory=_small_budget(ref.dim))
    assert land.plan.vectors == "host" and land.plan.fits and land.host is not None
    assert land.vector_device == torch.device("cpu")
    assert land.info()["vectors"] == {"where": "host", "source": "plan"} and land.info()["vector_device"] == "cpu"
    V = _vectors(ref, 2)
    assert _close(land.hvp(V), ref.hvp(V))
    # the user's setting beats the plan, either way, and is recorded as theirs
    user = gp.Landscape(model, loss, batches, memory=MemoryBudget(warn=False), vector_device="cpu")
    assert user.host is not None and user.plan.vectors == "host" and user.plan.sources["vectors"] == "user"
    assert user.info()["vectors"] == {"where": "host", "source": "user"}
    budget = _small_budget(ref.dim)
    budget.overrides = {"vectors": ("device", "user")}
    device = gp.Landscape(model, loss, batches, memory=budget)
    assert device.host is None and device.plan.vectors == "device" and device.plan.sources["vectors"] == "user"
    assert device.info()["vectors"] == {"where": "device", "source": "user"}
    # a plan given whole brings its choice
    whole = gp.Landscape(model, loss, batches, memory=MemoryPlan(**land.plan.to_dict()))
    assert whole.host is not None and _close(whole.hvp(V), ref.hvp(V))
    # and on a plain CPU model the plan never takes them
    monkeypatch.undo()
    plain = gp.Landscape(model, loss, batches, memory=_small_budget(ref.dim))
    assert plain.host is None and plain.plan.vectors == "device"
    assert plain.info()["vectors"]["where"] == "device"


def test_the_probe_passes_vector_device_through_and_records_it(tmp_path):
    model, loss, batches, _ = make_case("tanh_mlp")
    batch = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    results = {}
    for vd in (None, "cpu"):
        probe = gp.GeometryProbe(model, loss, batch, metrics={"spectrum": {"tol": 1e-8}}, vector_device=vd,
                                 run_dir=str(tmp_path / str(vd)), warm_start=False)
        probe.step(0)
        probe.close()
        results[vd] = probe.records[0]
    host = results["cpu"]["cost"]["memory_plan"]
    assert host["vectors"] == "host" and host["sources"]["vectors"] == "user"
    assert results[None]["cost"]["memory_plan"]["vectors"] == "device"
    a, b = results[None]["spectrum"], results["cpu"]["spectrum"]
    assert abs(a["lambda_max"] - b["lambda_max"]) <= 1e-10 * abs(a["lambda_max"])
    assert abs(a["lambda_min"] - b["lambda_min"]) <= 1e-10 * abs(a["lambda_max"])


def test_the_safety_net_takes_host_vectors_after_the_basis_and_records_it(monkeypatch):
    from geomprobe.probe import oom_ladder

    monkeypatch.setattr(oom_ladder, "host_vectors_possible", lambda land: True)  # as for a CUDA model
    module = sys.modules["geomprobe.metrics.spectrum"]
    real, calls = module.lanczos, {"n": 0}

    def oom_once(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(module, "lanczos", oom_once)
    model, loss, batches, _ = make_case("tanh_mlp")
    batch = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    # micro-batches and the basis in host memory already: Lanczos running out of memory leaves host vectors
    probe = gp.GeometryProbe(model, loss, batch, metrics={"spectrum": {"tol": 1e-6}}, micro_batch_size=8,
                             basis_device="cpu", schedule=gp.every(1), warm_start=False)
    with pytest.warns(RuntimeWarning, match="spectrum failed"):
        probe.step(0)
    probe.step(1)
    first, second = probe.records
    assert first["errors"]["spectrum"].startswith("OutOfMemory") and "errors" not in second
    assert first["cost"]["memory_plan"]["vectors"] == "device"
    plan = second["cost"]["memory_plan"]
    assert plan["vectors"] == "host" and plan["sources"]["vectors"] == "oom-ladder"
    assert second["cost"]["micro_batch_size"] == 8  # not split further: this rung came first
    want = gp.metrics.spectrum(gp.Landscape(model, loss, batch), tol=1e-6)["lambda_max"]
    assert abs(second["spectrum"]["lambda_max"] - want) <= 1e-8 * abs(want)


# ---------------------------------------------------------------------------------------------- spectrum
@pytest.mark.parametrize("name", ["tanh_mlp", "transformer"])
def test_spectrum_on_host_vectors_equals_the_device_modes(name):
    model, loss, batches, mode = make_case(name)
    device = gp.Landscape(model, loss, batches, mode=mode)
    host = gp.Landscape(model, loss, batches, mode=mode, vector_device="cpu", graph_budget_bytes=1)
    a, b = spectrum(device, k=2, tol=1e-9), spectrum(host, k=2, tol=1e-9)
    scale = max(abs(a["lambda_max"]), abs(a["lambda_min"]))
    for key in ("top", "bottom"):
        assert all(abs(x - y) <= 1e-10 * scale for x, y in zip(a[key], b[key]))
    assert a["hvps"] == b["hvps"] and b["converged"]
    H = device.hvp(torch.eye(device.dim, dtype=torch.float64))
    eig = torch.linalg.eigvalsh((H + H.T) / 2)
    assert abs(b["lambda_max"] - float(eig[-1])) <= FLOAT64_REL * scale


def test_warm_starts_and_ritz_vectors_stay_on_the_host(monkeypatch):
    model, loss, batches, _ = make_case("tanh_mlp")
    seen = []
    module = sys.modules["geomprobe.metrics.spectrum"]
    real = module.lanczos

    def spy(*args, **kw):
        seen.append(torch.device(kw["device"]))
        return real(*args, **kw)

    monkeypatch.setattr(module, "lanczos", spy)
    host = gp.Landscape(model, loss, batches, vector_device="cpu")
    warm = WarmStart()
    cold = spectrum(host, tol=1e-8, warm=warm)
    again = spectrum(host, tol=1e-8, warm=warm)
    assert again["warm"] and not cold["warm"] and seen == [torch.device("cpu")] * 2
    assert warm.top.device.type == "cpu" and warm.bottom.device.type == "cpu"
    ritz = extreme_ritz(host, "top")
    assert ritz.vectors.device.type == "cpu" and abs(ritz.values[0] - again["lambda_max"]) <= 1e-6 * abs(ritz.values[0])


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_host_vectors_cross_the_bus_and_hold_no_d_vector(monkeypatch):
    # the start is drawn on the GPU a piece at a time; at this size one default piece is the whole vector, so
    # pieces of a sixteenth of it show that the draw holds one piece, not a d-vector
    monkeypatch.setattr(device_draw, "DRAW_PIECE", 1 << 17)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).cuda()
    x, y = torch.randn(64, 512, device="cuda"), torch.randn(64, 512, device="cuda")
    device = gp.Landscape(model, nn.MSELoss(), (x, y), memory=None)
    host = gp.Landscape(model, nn.MSELoss(), (x, y), memory=None, vector_device="cpu")
    v = torch.randn(device.dim, generator=torch.Generator().manual_seed(0))
    got = host.hvp(v)
    assert got.device.type == "cpu" and host.grad.device.type == "cpu"
    want = device.hvp(v.cuda())
    assert float((got - want.cpu()).abs().max()) <= 1e-3 * float(want.abs().max())
    on_device = host.hvp(v.cuda())  # a metric's device vector is answered on the device
    assert on_device.device.type == "cuda" and torch.allclose(on_device.cpu(), got, rtol=0, atol=1e-5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    spectrum(host, tol=1e-3, max_iter=10)
    # beyond the kept graph: the double backward's temporaries and a few pieces, far below one d-vector
    assert torch.cuda.max_memory_allocated() - base < host.graph_bytes + 4 * 512 * 512 * 4 + device.dim * 4 // 2
    assert device.dim > 16 * device_draw.DRAW_PIECE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_metrics_and_views_take_the_host_gradient_and_ritz_vectors():
    from geomprobe.metrics import registry
    from geomprobe.views.surface import line, plane

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).cuda().double()
    x, y = torch.randn(64, 16, device="cuda", dtype=torch.float64), torch.randint(0, 4, (64,), device="cuda")
    device = gp.Landscape(model, nn.CrossEntropyLoss(), (x, y), memory=None)
    host = gp.Landscape(model, nn.CrossEntropyLoss(), (x, y), memory=None, vector_device="cpu")
    u = torch.randn(device.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = registry.get("direction")(device, last_update=u, tol=1e-8)
    b = registry.get("direction")(host, last_update=u, tol=1e-8)
    for key in ("lambda_max", "grad_curvature", "update_curvature", "grad_top_share"):
        assert abs(a[key] - b[key]) <= 1e-8 * max(1.0, abs(a[key]))
    assert abs(line(device, "top", points=5)["curvature"] - line(host, "top", points=5)["curvature"]) <= 1e-8
    assert plane(host, "gradient", "top", points=(3, 3))["forwards"] > 0


def test_the_plans_measuring_forward_takes_one_sample_unless_batch_norm_and_drops_its_gradient():
    from geomprobe.engine.attention_plan import measure_graph

    for name, least in (("tanh_mlp", 1), ("cnn_bn", 2)):
        model, loss, batches, mode = make_case(name)
        land = gp.Landscape(model, loss, batches, mode=mode, memory=None)
        per_sample, source, _ = measure_graph(land, can_split=True, recompute=False)
        n = batches[0][0].shape[0]
        assert source.startswith(f"measured on {max(least, -(-n // 8))} of {n} samples") and per_sample > 0
    # the gradients of the measuring backward are handed to autograd as placeholders as they form
    model, loss, batches, mode = make_case("tanh_mlp")
    params = [p for p in model.parameters()]
    with host_stream.RootCapture(params) as cap:
        grads = torch.autograd.grad(loss(model(batches[0][0]), batches[0][1]), params, create_graph=True)
    assert all(g.stride() == (0,) * g.dim() for g in grads if g.dim())  # zero-stride: no values held
    assert all(r is not None for r in cap.roots)


def test_host_vectors_build_and_answer_without_whole_gradients_on_the_device():
    # Parameters far outnumber activations (d = 83k in float64 over 9 layers, 4 samples): a whole vector would
    # stand out, one layer's piece would not. On the CPU the host is the device, so the host-vector mode's own
    # host buffers (the gradient at the build, the output of an HVP) count too: it holds one d-vector where the
    # device mode holds at least two.
    from memory_peak import peak_host_bytes

    torch.manual_seed(0)
    layers = [nn.Linear(64, 96), nn.Tanh()] + [m for _ in range(7) for m in (nn.Linear(96, 96), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(96, 3)).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 64, dtype=torch.float64, generator=g), torch.randint(0, 3, (4,), generator=g))
    d_bytes = sum(p.numel() for p in model.parameters()) * 8
    peaks, lands = {}, {}
    for name, opts in (("device", {}), ("host", {"vector_device": "cpu"})):
        peaks[name], lands[name] = peak_host_bytes(
            lambda o=opts: gp.Landscape(model, nn.CrossEntropyLoss(), batch, memory=None, chunk_size=1,
                                        graph_budget_bytes=1, **o))  # every HVP rebuilds its graph
    # the build: the device mode's flat gradient and the gradients autograd returns together (2 d), the host
    # mode's host gradient and one parameter's gradient at a time (d and a piece)
    assert peaks["host"] < peaks["device"] - 0.8 * d_bytes
    assert peaks["host"] < 1.5 * d_bytes
    v = torch.randn(lands["host"].dim, dtype=torch.float64, generator=g)
    for name in ("device", "host"):
        peaks[name], out = peak_host_bytes(lambda n=name: lands[n].hvp(v))
    assert _close(out, lands["device"].hvp(v))
    # an HVP with its graph rebuilt: the device mode's per-parameter results copied into its output, the
    # rebuild's whole gradient and the double backward's partial sums (each weight's first contribution waits
    # in autograd's buffers for its second: ~0.84 d, docs/distributed.md), 2.0 d measured (3.0 d while the
    # results were flattened into a fresh vector and its row copied once more); the host mode's output and
    # pieces in flight, each contribution added into the output where it is produced: 1.26 d measured (1.99 d
    # with the partial sums left to autograd)
    assert peaks["host"] < peaks["device"] - 0.6 * d_bytes
    assert peaks["host"] < 1.5 * d_bytes


@pytest.mark.parametrize("case", ["fp32", "bf16"])
def test_the_host_vector_plan_covers_the_measured_peak_of_rebuilt_graphs_without_doubling_it(case):
    # the 1.1B Llama's default plans on an H200 (benchmarks/results/scale_r30a_llama_1b_*_host_h200.json): one
    # sample's graph rebuilt per HVP, host vectors; the probe peaked 6.85 GB (fp32) and 3.77 GB (bf16) above the
    # memory allocated before it. The plan once counted the rebuilt graph twice (13.7 and 5.8 GB)
    itemsize, s, allocated, train_peak, available, measured = {
        "fp32": (4, 6568241164.0, 17735664640, 23282894848, 131584834560, 24587209728 - 17735664640),
        "bf16": (2, 2772003084.0, 8906114048, 11116647424, 140399705088, 12670917632 - 8906114048)}[case]
    figures = dict(dim=1104218112, itemsize=itemsize, batch_sizes=[4], graph_bytes_per_sample=s,
                   allocated_bytes=allocated, train_peak_bytes=train_peak, available_bytes=available,
                   host_bytes=132 * 10**9, largest_param_bytes=32000 * 2048 * itemsize, gradient_samples=False,
                   host_vectors=True, basis_vectors=11, bounded_basis=True)
    p = plan_memory(**figures, overrides={"working_vectors": ("host", "user")})  # the host placement
    assert p.vectors == "host" and p.micro_batch_size == 1 and p.samples_kept == 0
    assert measured <= p.peak_bytes <= 1.5 * measured and p.fits
    # and with lean working vectors, in all: fp32 33.42 GB (scale_r45/r47_llama_1b_fp32_plan10*.json, after the
    # first step's fourth d-vector went; 35.40 GB before). (bf16: 18.14 GB, scale_r48, peaked in the Ritz pass's
    # float32 accumulators, with whole-basis passes holding four d-vectors: neither is left to plan)
    lean = plan_memory(**figures, overrides={"working_vectors": ("device", "user")})
    if case == "fp32":
        lean_measured = 33420954624 - allocated
        # (between products the lean vectors do not sit beside a rebuilt graph)
        assert lean.working_vectors == "device" and lean_measured <= lean.peak_bytes <= 1.2 * lean_measured
    # the plan's own choice: lean where it fits 1.5x the training peak whole (fp32: planned 1.47x), else lean with
    # each product's input read from its host row (bf16), else the host
    chosen = plan_memory(**figures)
    assert chosen.working_vectors == {"fp32": "device", "bf16": "streamed"}[case] and chosen.fits
    assert (chosen.peak_bytes + allocated) / train_peak <= 1.5
