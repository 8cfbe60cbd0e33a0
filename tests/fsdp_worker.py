"""One rank of the 2-rank FSDP2 checks in test_fsdp.py, launched by torchrun (the problems: fsdp_problems.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR

Each rank shards a float64 model with ``fully_shard`` (every layer, then the root) over a 1-D gloo mesh,
takes its own unequal shard of the probe data (rank 0: batches of 8 and 5 samples, rank 1: one of 10) and
saves what it measured, with the global ranges of its slice, to ``OUT_DIR/rank{r}.pt``. The test assembles
the slices into whole vectors and compares them with one process on the union of the data.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from fsdp_problems import (
    N_SAMPLES,
    PROBE_STEPS,
    SHARDS,
    AllocationLog,
    end_worker,
    hvp_vectors,
    make_problem,
    shard_model,
    sharded_case,
)
from memory_peak import peak_host_bytes
from torch import nn


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Everything of the user's that a probe must leave as found, copied."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    return {
        "params": [local(p).detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else local(p.grad).clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "opt": [{k: local(v).clone() if torch.is_tensor(v) else v for k, v in st.items()} for st in opt.state.values()],
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def _same(a: dict, b: dict) -> dict:
    eq = lambda x, y: (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return {
        "params": all(eq(x, y) for x, y in zip(a["params"], b["params"])),
        "grads": all(eq(x, y) for x, y in zip(a["grads"], b["grads"])) and a["grad_ids"] == b["grad_ids"],
        "buffers": all(eq(x, y) for x, y in zip(a["buffers"], b["buffers"])),
        "opt": all(x.keys() == y.keys() and all(eq(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
                   for x, y in zip(a["opt"], b["opt"])),
        "rng": torch.equal(a["rng"], b["rng"]),
        "training": a["training"] == b["training"],
    }


def _landscape_results(kind: str, mesh, rank: int) -> dict:
    import geomprobe as gp
    from geomprobe.linalg.vectors import default_generator
    from geomprobe.metrics import spectrum

    model, loss_fn, X, y = make_problem(kind)
    model = shard_model(model, mesh)
    batches = [(X[a:b], y[a:b]) for a, b in SHARDS[rank]]
    # a training step first, so that .grad and the optimizer's state hold something to protect
    # (one forward per rank and step: FSDP's collectives need the same number of passes on every rank)
    Xr, yr = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn(model(Xr), yr).backward()
    opt.step()
    loss_fn(model(Xr), yr).backward()  # .grad set again, after the step
    model.train()
    before = _snapshot(model, opt)
    # the parameters measured (after the step), whole, for the one-process reference
    whole = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    with torch.no_grad():
        model(Xr)  # an evaluation forward leaves the root unit gathered; a Landscape starts from the shards

    land = gp.Landscape(model, loss_fn, batches, hvp_method="autograd")
    V = hvp_vectors(land.dim)
    out = {
        "whole": whole, "type": type(land).__name__, "dim": land.dim, "ranges": land.layout.ranges, "n_samples": land.n_samples,
        "loss": land.loss, "grad": land.grad.clone(), "hvp": land.hvp(land.layout.local_of(V)),
        "hvp_single": land.hvp(land.layout.local_of(V[0])),
        "random": land.vector_space.gaussian(default_generator(11), torch.float64),
        "spectrum": spectrum(land, k=2, tol=1e-10), "info": land.info(),
    }
    out["out"] = _written_into_out(land, land.layout.local_of(V), out["hvp"], out["hvp_single"])
    land.close()
    # a selection (params=): the others stand in whole as constants
    sub = gp.Landscape(model, loss_fn, batches, hvp_method="autograd", params="*weight")
    Vs = hvp_vectors(sub.dim)
    out["sub"] = {"ranges": sub.layout.ranges, "hvp": sub.hvp(sub.layout.local_of(Vs)), "dim": sub.dim,
                  "hvp_single": sub.hvp(sub.layout.local_of(Vs[0]))}  # streamed
    sub.close()
    fd = gp.Landscape(model, loss_fn, batches, hvp_method="finite-difference")
    out["fd_loss"], out["fd_grad"] = fd.loss, fd.grad.clone()
    out["fd_hvp"] = fd.hvp(fd.layout.local_of(V[0]))
    out["fd_err"] = fd.hvp_errors[-1]
    out["fd_spectrum"] = spectrum(fd, k=1, tol=1e-6)
    v0 = fd.layout.local_of(V[0])
    buf = torch.full_like(v0, float("nan"))
    out["fd_out"] = fd.hvp(v0, out=buf) is buf and torch.equal(buf, out["fd_hvp"])
    auto = gp.Landscape(model, loss_fn, batches, hvp_method="auto")
    out["auto_route"] = auto.info()["sharded"]
    auto.close()
    out["state"] = _same(before, _snapshot(model, opt))
    return out


def _written_into_out(land, V: torch.Tensor, block: torch.Tensor, single: torch.Tensor) -> dict:
    """hvp(v, out=buf) on the whole-block and the streamed route: buf returned, the bits of hvp(v); a buffer
    of the wrong shape refused on every rank before any collective (the next product still runs)."""
    from geomprobe.errors import ConfigurationError

    res = {}
    for name, v, want in (("block", V, block), ("streamed", V[0], single)):
        buf = torch.full_like(v, float("nan"))
        res[name] = land.hvp(v, out=buf) is buf and torch.equal(buf, want)
    try:
        land.hvp(V[0], out=torch.empty(3, dtype=V.dtype))
    except ConfigurationError as e:
        res["refused"] = str(e)
    res["after"] = torch.equal(land.hvp(V[0]), single)
    return res


def _stream_results(mesh, rank: int) -> dict:
    """The streamed exact HVP (one vector at a time, parameter by parameter) against the whole-block route of
    the same Landscape settings: kept graphs, graphs rebuilt per HVP, a parameter with no gradient on rank 1;
    and the largest tensor created during an HVP on each route."""
    import geomprobe as gp

    out = {}
    for kind in ("mlp", "block", "gated", "wide"):
        if kind == "wide":  # parameters outnumber any activation: a whole vector would stand out
            model, loss_fn, _, y = make_problem("mlp")
            X = torch.randn(N_SAMPLES, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            model = shard_model(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)).double(), mesh)
            batches = [(X[a:b], y[a:b]) for a, b in SHARDS[rank]]
        else:
            model, loss_fn, batches = sharded_case(kind, mesh, rank)
        r = {}
        for name, opts in (("block", {"chunk_size": 16}), ("stream", {"chunk_size": 1}),
                           ("rebuilt", {"chunk_size": 1, "graph_budget_bytes": 1})):
            land = gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, **opts)
            V = land.layout.local_of(hvp_vectors(land.dim))
            with AllocationLog() as two:
                hv = land.hvp(V[:2])
            with AllocationLog() as one:
                h1 = land.hvp(V[2])
            r[name] = {"hvp": torch.cat([hv, h1[None]]), "grad": land.grad.clone(), "loss": land.loss,
                       "largest_two": two.largest, "largest_one": one.largest, "ops": sorted(one.ops),
                       "rebuilds": land.graph_rebuilds, "info": land.info(),
                       "no_gradient": [n for n, g in zip(land.param_names, land._graphs[0] or []) if g is None],
                       "kept_as": sorted({type(g).__name__ for g in land._graphs[0] or [] if g is not None})}
            land.close()
        r.update(ranges=land.layout.ranges, dim=land.dim, local_dim=land.local_dim,
                 largest_param=max(p.numel() for p in land.params))
        out[kind] = r
    return out


@contextlib.contextmanager
def injected(owner: type, name: str, fails, where: str, active: bool):
    """Inside, ``owner.name`` (a method) raises ``RuntimeError("injected fault <where>")`` on the call whose
    arguments ``fails(*args)`` picks, when ``active`` (this rank is the faulty one); put back after."""
    original = getattr(owner, name)

    def failing(self, *args):
        if fails(*args):
            raise RuntimeError(f"injected fault {where}")
        return original(self, *args)

    if active:
        setattr(owner, name, failing)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _midway_fault(mesh, rank: int) -> dict:
    """Rank 1 fails inside the double backward, after some of the pass's collectives: every rank must raise
    for that HVP, none may wait in a collective, and the next HVP must be right."""
    import geomprobe as gp
    from geomprobe.engine import sharded_stream

    model, loss_fn, batches = sharded_case("block", mesh, rank)
    land = gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, chunk_size=1)
    v = land.layout.local_of(hvp_vectors(land.dim)[0])
    out = {}
    # parameter 5 is used after others: gathers have happened on both ranks
    with injected(sharded_stream.StreamPass, "_input", lambda i, grad: i == 5, "inside the double backward",
                  rank == 1):
        try:
            land.hvp(v)
            out["error"] = "no error"
        except gp.GeomprobeError as e:
            out["error"] = str(e)
    out["after"] = land.hvp(v)
    out["leaves_clean"] = all(p.grad is None for p in land.params)
    fresh = gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, chunk_size=1)
    out["fresh"] = fresh.hvp(v)
    return out


def _build_and_host_results(mesh, rank: int) -> dict:
    """The streamed build (chunk 1: each parameter's gradient reduce-scattered as autograd finishes it) against
    the whole-gradient build (chunk 16), and vectors in host memory (``vector_device="cpu"``) against the
    device: gradient slices, HVPs and spectra; and what the build's hooks saw. (On CPU the host is the
    device: the mode is forced and recorded, and its code path runs, but both live in the same memory.)"""
    import geomprobe as gp
    from geomprobe.metrics import spectrum

    out = {}
    for kind in ("mlp", "block", "gated"):
        model, loss_fn, batches = sharded_case(kind, mesh, rank)
        r = {}
        for name, opts in (("streamed", {"chunk_size": 1}), ("whole", {"chunk_size": 16}),
                           ("host", {"chunk_size": 1, "vector_device": "cpu"}),
                           ("host_rebuilt", {"chunk_size": 1, "vector_device": "cpu", "graph_budget_bytes": 1})):
            land = gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, **opts)
            V = land.layout.local_of(hvp_vectors(land.dim))
            res = {"grad": land.grad.clone(), "loss": land.loss, "hvp": land.hvp(V),
                   "hvp_single": land.hvp(V[0]), "info": land.info(), "rebuilds": land.graph_rebuilds,
                   "kept_as": sorted({type(g).__name__ for g in land._graphs[0] or [] if g is not None})}
            if name in ("streamed", "host"):
                res["spectrum"] = spectrum(land, k=2, tol=1e-6)
                res["grad_device"] = str(land.grad.device)
                res["vector_device"] = str(land.vector_device)
            r[name] = res
            land.close()
        r.update(ranges=land.layout.ranges, dim=land.dim,
                 largest_param_bytes=max(p.numel() * p.element_size() for p in land.params))
        out[kind] = r
    try:
        gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, vector_device="cuda:7")
        out["bad_device"] = "no error"
    except gp.ConfigurationError as e:
        out["bad_device"] = str(e)
    return out


def _build_memory(mesh, rank: int) -> dict:
    """The host memory a build holds at its peak, streamed (chunk 1) and with whole gradients (chunk 16), on an
    MLP whose parameters (3.2 MB in float64) dwarf its activations (4 samples per rank)."""
    import geomprobe as gp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 3)).double()
    model = shard_model(model, mesh)
    g = torch.Generator().manual_seed(7 + rank)
    batch = (torch.randn(4, 256, dtype=torch.float64, generator=g), torch.randint(0, 3, (4,), generator=g))
    out = {"dim": sum(p.numel() for p in model.parameters())}
    for name, chunk in (("streamed", 1), ("whole", 16)):
        peak, land = peak_host_bytes(lambda c=chunk: gp.Landscape(model, nn.CrossEntropyLoss(), batch,
                                                                  hvp_method="autograd", memory=None, chunk_size=c))
        out[name] = {"peak": peak, "graph_bytes": land.graph_bytes, "info": land.info()}
        land.close()
        del land
        gc.collect()
    return out


def _build_fault(mesh, rank: int) -> dict:
    """Rank 1 fails inside the streamed build's backward after the pass has issued reduce-scatters: every rank
    must raise (none waits in a collective), the user's state must be bit-identical, and the next build must
    equal a build on a model that never saw the fault."""
    import geomprobe as gp
    from geomprobe.engine import sharded_stream

    model, loss_fn, batches = sharded_case("block", mesh, rank)
    Xr, yr = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn(model(Xr), yr).backward()
    opt.step()
    loss_fn(model(Xr), yr).backward()
    before = _snapshot(model, opt)
    seen = []

    def third(i, g):  # two gradients taken and reduce-scattered already (the schedule's first two)
        seen.append(i)
        return len(seen) == 3

    out = {}
    with injected(sharded_stream.BuildPass, "_take", third, "inside the build", rank == 1):
        try:
            gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, chunk_size=1)
            out["error"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads which error each rank raised
            out["error"] = f"{type(e).__name__}: {e}"
    out["state"] = _same(before, _snapshot(model, opt))
    out["whole"] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    land = gp.Landscape(model, loss_fn, batches, hvp_method="autograd", memory=None, chunk_size=1)
    v = land.layout.local_of(hvp_vectors(land.dim)[0])
    out["after"] = {"grad": land.grad.clone(), "hvp": land.hvp(v), "loss": land.loss, "ranges": land.layout.ranges}
    land.close()
    # inside a GeometryProbe: rank 1's build fails at the first probe; both ranks fail that probe, the user's
    # state is as found, training goes on and the next probe measures
    seen.clear()
    with injected(sharded_stream.BuildPass, "_take", third, "inside the build", rank == 1):
        probe = gp.GeometryProbe(model, loss_fn, batches, metrics={"spectrum": {"tol": 1e-6}}, schedule=gp.every(2),
                                 chunk_size=1, hvp_method="autograd")
        before = _snapshot(model, opt)
        probe.attach(opt)
    out["probe_state"] = _same(before, _snapshot(model, opt))
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(Xr), yr).backward()
        opt.step()
    probe.close()
    out["probe_records"] = json.loads(json.dumps(probe.records))
    return out


PLAN_CAP, PLAN_PER_SAMPLE = 15_000_000, 1e6


def _planned_results(mesh, rank: int) -> dict:
    """The MLP under a memory budget its whole graphs do not fit (a stated 1 MB of graph per sample within a
    15 MB cap): the exact route's plan cuts the batches into micro-batches, keeps what fits and rebuilds the
    rest at every HVP; the products must not change."""
    import geomprobe as gp
    from geomprobe.engine.memory_plan import MemoryBudget

    model, loss_fn, batches = sharded_case("mlp", mesh, rank)
    budget = MemoryBudget(cap_bytes=PLAN_CAP, graph_bytes_per_sample=PLAN_PER_SAMPLE)
    land = gp.Landscape(model, loss_fn, batches, hvp_method="auto", memory=budget)
    V = land.layout.local_of(hvp_vectors(land.dim))
    out = {"ranges": land.layout.ranges, "hvp": land.hvp(V), "grad": land.grad.clone(), "loss": land.loss,
           "plan": land.plan.to_dict(), "batch_sizes": land.batch_sizes, "rebuilds": land.graph_rebuilds,
           "kept": [g is not None for g in land._graphs], "info": land.info()}
    land.close()
    return out


def _float32_directions(mesh, rank: int) -> dict:
    """The transformer block in float32: the finite-difference HVP along the exact route's extreme Ritz vectors
    (directions concentrated where the curvature is) and a random one, with its reported error, and the exact
    products to compare with."""
    import geomprobe as gp
    from geomprobe.linalg.vectors import default_generator
    from geomprobe.metrics.spectrum import run_lanczos

    model, loss_fn, X, y = make_problem("block")
    model = shard_model(model.float(), mesh)
    batches = [(X[a:b].float(), y[a:b]) for a, b in SHARDS[rank]]
    exact = gp.Landscape(model, loss_fn, batches, hvp_method="autograd")
    r = run_lanczos(exact, k=1, tol=1e-5, keep_basis=True)
    rnd = exact.vector_space.gaussian(default_generator(5), torch.float32)
    V = torch.stack([r.ritz_vector(len(r.ritz_values) - 1), r.ritz_vector(0), rnd / exact.vector_space.norm(rnd)])
    out = {"ranges": exact.layout.ranges, "exact": exact.hvp(V).double(), "V": V.double()}
    exact.close()
    fd = gp.Landscape(model, loss_fn, batches, hvp_method="finite-difference")
    out["fd"] = torch.stack([fd.hvp(v) for v in V]).double()
    out["err"] = fd.hvp_errors[-3:]
    return out


def _probe_records(mesh, rank: int, run_dir: str, fault_rank: int) -> tuple[list[dict], list[float]]:
    """A GeometryProbe on the FSDP2 MLP under training; ``fault_rank``'s first probe fails inside its HVP."""
    import geomprobe as gp
    from geomprobe.engine.sharded_landscape import ShardedLandscape

    model, loss_fn, batches = sharded_case("mlp", mesh, rank)
    Xr = torch.cat([b[0] for b in batches])
    yr = torch.cat([b[1] for b in batches])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    original = ShardedLandscape._stream_backward

    def broken(self, *args):
        raise RuntimeError("injected fault in the HVP")

    losses = []
    if rank == fault_rank:
        ShardedLandscape._stream_backward = broken
    try:
        with gp.GeometryProbe(model, loss_fn, batches, metrics={"spectrum": {"tol": 1e-8}},
                              schedule=gp.every(2), run_dir=run_dir) as probe:
            probe.attach(opt)  # probes step 0: fails on fault_rank, so on every rank
            ShardedLandscape._stream_backward = original
            for _ in range(PROBE_STEPS):
                opt.zero_grad()
                loss = loss_fn(model(Xr), yr)
                loss.backward()
                opt.step()
                losses.append(float(loss))
    finally:
        ShardedLandscape._stream_backward = original
    return probe.records, losses


def _fd_probe_record(mesh, rank: int) -> dict:
    """One probe (at attach) of the FSDP2 MLP on the finite-difference route, kept in memory."""
    import geomprobe as gp

    model, loss_fn, batches = sharded_case("mlp", mesh, rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.GeometryProbe(model, loss_fn, batches, metrics={"spectrum": {"tol": 1e-6}},
                             schedule=gp.every(100), hvp_method="finite-difference")
    probe.attach(opt)
    probe.close()
    return probe.records[0]


def _refusal(mesh, rank: int) -> str:
    """What GeometryProbe says when asked for a metric that cannot yet take a sharded Landscape."""
    import geomprobe as gp

    model, loss_fn, X, y = make_problem("mlp")
    model = shard_model(model, mesh)
    try:
        gp.GeometryProbe(model, loss_fn, (X, y), metrics=["spectrum", "trace"])
    except gp.ConfigurationError as e:
        return str(e)
    return "no error"


def _agreed_failures(mesh, rank: int) -> dict:
    """What each rank raises when rank 1's probe data is NaN, on each route (its loss is not finite), and what
    a shard placement other than FSDP2's default gives."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    import geomprobe as gp

    model, loss_fn, batches = sharded_case("mlp", mesh, rank)
    if rank == 1:
        batches = [(torch.full_like(x, float("nan")), t) for x, t in batches]
    out = {}
    for route in ("autograd", "finite-difference"):
        try:
            gp.Landscape(model, loss_fn, batches, hvp_method=route)
            out[route] = "no error"
        except gp.GeomprobeError as e:
            out[route] = f"{type(e).__name__}: {e}"
    # the model still trains afterwards: FSDP's units were put back to their shards
    Xr, yr = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loss_fn(model(torch.nan_to_num(Xr)), yr).backward()
    out["sharded_after"] = all(hasattr(p, "to_local") for p in model.parameters())
    other = nn.Sequential(nn.Linear(4, 6)).double()  # even columns: FSDP2 shards dim 1 only evenly
    fully_shard(other, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    try:
        gp.Landscape(other, loss_fn, (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)))
        out["placement"] = "no error"
    except gp.ConfigurationError as e:
        out["placement"] = str(e)
    return out


def _phase(rank: int, name: str) -> None:
    print(f"[rank {rank}] {name} {time.perf_counter():.1f}", file=sys.stderr, flush=True)


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {}
    _phase(rank, "float32 directions")
    result["f32"] = _float32_directions(mesh, rank)
    for kind in os.environ.get("KINDS", "mlp,block").split(","):
        _phase(rank, f"landscape {kind}")
        result[kind] = _landscape_results(kind, mesh, rank)
        gc.collect()
    _phase(rank, "streamed HVP")
    result["stream"] = _stream_results(mesh, rank)
    result["planned"] = _planned_results(mesh, rank)
    result["midway"] = _midway_fault(mesh, rank)
    _phase(rank, "streamed build and host vectors")
    result["host"] = _build_and_host_results(mesh, rank)
    result["build_fault"] = _build_fault(mesh, rank)
    result["build_memory"] = _build_memory(mesh, rank)
    _phase(rank, "agreed failures")
    result["failures"] = _agreed_failures(mesh, rank)
    _phase(rank, "probe")
    records, losses = _probe_records(mesh, rank, f"{out_dir}/run", fault_rank=1)
    result["records"] = json.loads(json.dumps(records))
    result["losses"] = losses
    result["refusal"] = _refusal(mesh, rank)
    result["fd_record"] = json.loads(json.dumps(_fd_probe_record(mesh, rank)))
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _phase(rank, "saved")
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
