"""Nothing of a Landscape or a probe outlives its last user reference: no reference cycle keeps a graph, a
gradient or a vector alive until Python's cyclic garbage collector happens to run (it runs by counts of
objects, never by bytes: on a GPU a 3.6 GB graph of the memory plan's measuring forward stayed allocated
through the next training step).

Every check runs with the collector disabled (``gc.disable()``, restored after) and compares with no
``gc.collect()`` in between:

- every storage allocated while the Landscape lived (a dispatch mode sees each operation, the double
  backward's included, and keeps a weak reference to each new storage) is freed once it is closed and
  dropped; a probe keeps exactly its warm start's Ritz vectors, on purpose;
- the Landscape itself (a weak reference) is gone;
- the live tensor elements that are not parameters, as the collector's object list counts them, are back
  at the baseline.
"""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import geomprobe as gp
from geomprobe.engine.attention_plan import measure_graph
from geomprobe.errors import ConfigurationError
from geomprobe.probe import geometry_probe
from geomprobe.probe.allowance import Deadline, OverAllowance
from geomprobe.probe.progress import count_hvps


class Allocations(TorchDispatchMode):
    """Weak references to every storage an operation allocates inside (not views of its inputs, not writes
    into them): :meth:`alive` lists the ones still allocated, with the operation that made each."""

    def __init__(self) -> None:
        super().__init__()
        self._made: list[tuple[StorageWeakRef, int, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and _storage_ptr(t) not in inputs:
                s = t.untyped_storage()
                if s.nbytes():
                    self._made.append((StorageWeakRef(s), s.nbytes(), str(func), s.data_ptr()))
        return out

    def alive(self, besides: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, str]]:
        """(bytes, operation) of each storage allocated inside and not freed yet, but for those at ``besides``."""
        return [(n, op) for ref, n, op, ptr in self._made if not ref.expired() and ptr not in besides]

    def alive_pointers(self) -> set[int]:
        return {ptr for ref, _, _, ptr in self._made if not ref.expired()}

    def alive_bytes(self) -> int:
        return sum(n for n, _ in self.alive())


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def live_elements() -> int:
    """Elements of the live tensors that are not parameters, as the collector's object list holds them."""
    # type(), not isinstance(): the latter asks objects for __class__, which some deprecated ones warn about
    return sum(o.numel() for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and not issubclass(type(o), nn.Parameter))


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off inside (after one collection, so that only what happens inside
    counts), restored as found afterwards."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------------------------------------- models
class Attention(nn.Module):
    """A causal self-attention block on torch's scaled_dot_product_attention and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(a.transpose(1, 2).reshape(n, t, 8).mean(1))


def mlp_problem() -> tuple[nn.Module, nn.Module, list]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = torch.randn(20, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (20,), generator=g)
    return model, nn.CrossEntropyLoss(), [(X[:12], y[:12]), (X[12:], y[12:])]


def attention_problem() -> tuple[nn.Module, nn.Module, list]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = Attention().double()
    X, y = torch.randn(8, 5, 8, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), [(X[:5], y[:5]), (X[5:], y[5:])]


def llama_problem() -> tuple[nn.Module, Callable, list]:
    """A 2-layer Llama with torch's attention, the model the leak was first seen on (at 1B, on a GPU)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss_fn(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    return model, loss_fn, [{"input_ids": ids}]


PROBLEMS = {"mlp": mlp_problem, "attention": attention_problem, "llama": llama_problem}


def use(land: gp.Landscape, vectors: int = 3) -> None:
    """What a metric does: a block of products, one product, the record."""
    V = torch.randn(vectors, land.dim, dtype=land.dtype, generator=torch.Generator().manual_seed(2))
    land.hvp(V)
    land.hvp(V[0])
    land.info()


def landscape_life(problem: str, **options) -> tuple[Allocations, weakref.ref, int]:
    """Build a Landscape on ``problem``, use it, close and drop it with the collector off; returns what it
    allocated, a weak reference to it and the live elements beyond those before it was built."""
    model, loss_fn, batches = PROBLEMS[problem]()
    # once before measuring, as measured: lazy imports and first-call caches (of torch's dispatch modes too)
    # are not the Landscape's
    with Allocations():
        warm = gp.Landscape(model, loss_fn, batches, **options)
        use(warm)
    warm.close()
    del warm
    with collector_off():
        base = live_elements()
        allocations = Allocations()
        with allocations:
            land = gp.Landscape(model, loss_fn, batches, **options)
            use(land)
        assert land.plan is None or options.get("memory") is not None or land.plan.graph_source is None \
            or land.plan.graph_source.startswith("measured"), land.plan.graph_source
        land.close()
        ref = weakref.ref(land)
        del land
        return allocations, ref, live_elements() - base


# ---------------------------------------------------------------------------------------------- Landscape
@pytest.mark.parametrize("problem", ["mlp", "attention", "llama"])
@pytest.mark.parametrize("vector_device", [None, "cpu"], ids=["device", "host"])
def test_a_closed_landscape_frees_everything_without_the_collector(problem, vector_device):
    options = {} if vector_device is None else {"vector_device": vector_device}
    allocations, ref, extra = landscape_life(problem, **options)
    assert ref() is None, "the Landscape is kept alive by a reference cycle"
    assert allocations.alive() == [], "storages allocated by the Landscape outlive it"
    assert extra == 0
    assert len(allocations._made) > 20  # the dispatch mode saw the forward and the products


@pytest.mark.parametrize("vector_device", [None, "cpu"], ids=["device", "host"])
@pytest.mark.parametrize("options", [{"graph_budget_bytes": 1}, {"micro_batch_size": 3}, {"memory": None},
                                     {"mode": "train"}, {"recompute_attention": True}],
                         ids=["rebuilt-graphs", "micro-batches", "no-plan", "train", "recomputing-attention"])
def test_every_build_route_frees_everything(options, vector_device):
    if vector_device is not None:
        options = {**options, "vector_device": vector_device}
    allocations, ref, extra = landscape_life("attention", **options)
    assert ref() is None and allocations.alive() == [] and extra == 0


def test_finite_differences_free_everything():
    allocations, ref, extra = landscape_life("mlp", hvp_method="finite-difference")
    assert ref() is None and allocations.alive() == [] and extra == 0


def test_a_landscape_dropped_without_close_frees_everything():
    model, loss_fn, batches = mlp_problem()
    for vector_device in (None, "cpu"):
        with collector_off():
            allocations = Allocations()
            with allocations:
                land = gp.Landscape(model, loss_fn, batches, vector_device=vector_device)
                use(land)
            assert allocations.alive_bytes() > 0  # its graphs and gradient, while it lives
            ref = weakref.ref(land)
            del land
            assert ref() is None and allocations.alive() == []


def test_the_measuring_forward_keeps_nothing():
    """The memory plan's measuring forward (one sample's first-order graph, 3.6 GB on a Llama-1B) is freed
    when it returns: its root capture referred to itself through its hooks' bound method."""
    model, loss_fn, batches = llama_problem()
    land = gp.Landscape(model, loss_fn, batches, memory=None)
    measure_graph(land, True, False)  # warm-up
    with collector_off():
        allocations = Allocations()
        with allocations:
            per_sample, source, _ = measure_graph(land, True, False)
        assert per_sample > 0 and source.startswith("measured on 1 of 4")
        assert len(allocations._made) > 20
        assert allocations.alive() == []


def test_a_failed_product_frees_everything():
    """A product that fails (the loss raises while a graph is rebuilt) and is caught: once the exception is
    dropped, nothing of its frames is kept in a cycle."""
    model, loss_fn, batches = mlp_problem()
    for vector_device in (None, "cpu"):
        calls = [0]

        def failing(model, batch, calls=calls):
            calls[0] += 1
            if calls[0] > len(batches):
                raise RuntimeError("the loss failed")
            return loss_fn(model(batch[0]), batch[1])

        with collector_off():
            allocations = Allocations()
            with allocations:
                land = gp.Landscape(model, failing, batches, graph_budget_bytes=1, memory=None,
                                    vector_device=vector_device)
                with pytest.raises(RuntimeError, match="the loss failed"):
                    land.hvp(torch.ones(land.dim, dtype=land.dtype))
            ref = weakref.ref(land)
            land.close()
            del land
            assert ref() is None and allocations.alive() == []


def test_a_failed_build_frees_everything():
    model, loss_fn, batches = mlp_problem()
    X, y = batches[1]
    bad = [batches[0], (torch.full_like(X, float("nan")), y)]  # the first graph is built, the second fails
    with collector_off():
        allocations = Allocations()
        with allocations, pytest.raises(gp.NonFiniteLossError):
            gp.Landscape(model, loss_fn, bad)
        assert allocations.alive() == []


def test_close_twice_is_harmless_and_a_closed_landscape_says_so():
    model, loss_fn, batches = mlp_problem()
    land = gp.Landscape(model, loss_fn, batches)
    v = torch.ones(land.dim, dtype=land.dtype)
    hv = land.hvp(v)
    land.results["kept"] = torch.zeros(land.dim)
    grad, loss = land.grad, land.loss
    land.close()
    land.close()
    assert land.results == {}
    assert land.loss == loss and torch.equal(land.grad, grad) and land.info()["hvps"] == 1
    for call in (lambda: land.hvp(v), lambda: land.matvec(v), lambda: land.hvp(v[None].repeat(2, 1))):
        with pytest.raises(ConfigurationError, match="this Landscape was closed; build a new one") as e:
            call()
        assert str(e.value).count("\n") == 0
    again = gp.Landscape(model, loss_fn, batches)
    assert torch.allclose(again.hvp(v), hv, rtol=1e-12, atol=1e-14)
    with again:
        pass
    with pytest.raises(ConfigurationError, match="closed"):
        again.hvp(v)


def test_a_context_manager_landscape_frees_everything():
    model, loss_fn, batches = attention_problem()
    with collector_off():
        allocations = Allocations()
        with allocations, gp.Landscape(model, loss_fn, batches, vector_device="cpu") as land:
            use(land)
        ref = weakref.ref(land)
        del land
        assert ref() is None and allocations.alive() == []


# ---------------------------------------------------------------------------------------------- probe wrappers
def test_progress_and_deadline_wrappers_hold_the_landscape_weakly():
    """The probe counts HVPs and watches its deadline by wrapping ``land.hvp``; the wrappers chain, count and
    check, and a Landscape wrapped by both is still freed as soon as it is dropped, closed or not."""
    model, loss_fn, batches = mlp_problem()
    for close in (True, False):
        with collector_off():
            allocations = Allocations()
            counted: list[int] = []
            clock = iter(range(1000)).__next__
            deadline = Deadline(at=10**6, allowance=10**6, clock=clock, budgets=())
            with allocations:
                land = gp.Landscape(model, loss_fn, batches)
                count_hvps(land, counted.append)
                deadline.watch(land)
                use(land)
            assert counted == [3, 1] and land.hvps == 4 and not deadline.cut
            deadline.at = -1.0  # past: the next product is refused before it starts, through both wrappers
            with pytest.raises(OverAllowance):
                land.hvp(torch.ones(land.dim, dtype=land.dtype))
            assert counted == [3, 1] and land.hvps == 4
            if close:
                land.close()
                assert "hvp" not in vars(land)  # close() takes its wrappers off
            ref = weakref.ref(land)
            del land
            assert ref() is None and allocations.alive() == []


def test_a_wrapped_hvp_called_after_its_landscape_is_gone_says_so():
    model, loss_fn, batches = mlp_problem()
    land = gp.Landscape(model, loss_fn, batches)
    count_hvps(land, lambda n: None)
    hvp = land.hvp
    del land
    with pytest.raises(ConfigurationError, match="Landscape whose hvp\\(\\) this wrapper calls no longer exists"):
        hvp(torch.ones(3))


# ---------------------------------------------------------------------------------------------- GeometryProbe
@pytest.mark.parametrize("vector_device", [None, "cpu"], ids=["device", "host"])
def test_a_probe_keeps_only_its_warm_start(monkeypatch, vector_device):
    """One ``GeometryProbe`` probe (progress followed, a metric taking the last update, spectrum with its warm
    start): afterwards its Landscape is gone and of everything it allocated only the warm start's vectors
    remain (this probe's two extreme Ritz vectors, 2 d float64 numbers on the host, kept on purpose), besides
    the numbers of the record; the previous probe's vectors, which the start is moved on along, stay as that
    probe left them (not copied)."""
    built: list[weakref.ref] = []

    class Watched(gp.Landscape):
        def __init__(self, *args, **kwargs):
            built.append(weakref.ref(self))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(geometry_probe, "Landscape", Watched)
    model, loss_fn, batches = mlp_problem()
    X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list = []
    probe = gp.GeometryProbe(model, loss_fn, batches, metrics=["spectrum", "rmed", "direction"],
                             schedule=gp.every(1), progress=events.append, summary=False,
                             vector_device=vector_device, warm_start=True)  # warm even when certified
    probe.attach(opt, probe_now=False)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()  # probes after each step: the second one warm
    dim = sum(p.numel() for p in model.parameters())
    before = (probe.warm.top, probe.warm.bottom)
    with collector_off():
        allocations = Allocations()
        with allocations:
            record = probe.probe(2)
        assert "errors" not in record and record["spectrum"]["warm"] is True and record["direction"]
        assert [r() for r in built] == [None] * 3
        alive = allocations.alive()
        warm = probe.warm
        # the Ritz vectors kept for the next start; the ones before them, which moving the start on reads, are
        # the previous probe's own
        assert sorted(n for n, _ in alive) == [dim * 8] * 2, alive
        assert warm.top.shape == warm.bottom.shape == (1, dim) and warm.top.device.type == "cpu"
        assert sorted(warm.previous) == ["bottom", "top"]
        assert [warm.previous[e].data_ptr() for e in ("top", "bottom")] == [t.data_ptr() for t in before]
        assert allocations.alive_pointers() == {t.untyped_storage().data_ptr() for t in (warm.top, warm.bottom)}
    assert any(e.kind == "advance" for e in events)
    probe.close(final_probe=False)


# ---------------------------------------------------------------------------------------------- sharded (gloo)
SHARDED_CASES = ("exact", "exact_host", "exact_failing_hvp", "finite_difference", "failing_build")


@pytest.fixture(scope="module")
def sharded_ranks(tmp_path_factory) -> list[dict]:
    """Two gloo ranks (tests/no_cycles_worker.py): each rank's record of what every sharded Landscape it built
    left allocated once closed and dropped with the collector off."""
    from test_distributed import run_two_ranks

    out = tmp_path_factory.mktemp("no_cycles_ranks")
    run_two_ranks(Path(__file__).with_name("no_cycles_worker.py"), out, fsdp=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_a_sharded_landscape_frees_everything_without_the_collector(sharded_ranks, case):
    """On each route, and after a failure agreed by both ranks (rank 1's loss raising inside a product,
    rank 1's data giving a non-finite loss at the build): the rank that failed kept the exception in a
    local, a cycle with its frame, and host vectors' partial sums walked the graph with a closure that
    referred to itself."""
    for rank, result in enumerate(sharded_ranks):
        got = result[case]
        assert got["allocations"] > 20, (rank, got)  # the dispatch mode saw the Landscape's work
        assert not got["landscape_alive"], (rank, got)
        assert got["alive_bytes"] == 0, (rank, got["alive"])
    if case.startswith("failing") or case.endswith("failing_hvp"):
        assert all("raised" in r[case] for r in sharded_ranks), "every rank raises when one fails"
    else:
        assert all("raised" not in r[case] for r in sharded_ranks)
    if case != "failing_build":  # closed twice, then asked for a product: one clear message on every rank
        assert all(r[case]["after_close"] == "this Landscape was closed; build a new one to measure again"
                   for r in sharded_ranks)


def test_a_sharded_probe_keeps_nothing(sharded_ranks):
    """A GeometryProbe probe of the FSDP2 model: its Landscapes are gone and nothing it allocated remains (a
    sharded spectrum takes no warm start, so no Ritz vector is kept either)."""
    for rank, result in enumerate(sharded_ranks):
        got = result["probe"]
        assert got["errors"] is None and got["warm"] is False, (rank, got)
        assert got["allocations"] > 100, (rank, got)
        assert got["landscapes_alive"] == 0 and got["alive_besides_warm"] == [] and got["warm_kept"] == 0, (rank, got)
