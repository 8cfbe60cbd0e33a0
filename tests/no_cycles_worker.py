"""One rank of the 2-rank check in test_no_cycles.py that nothing of a sharded Landscape (an FSDP2 model,
gloo on CPU) outlives it: launched by torchrun,

    python -m torch.distributed.run --nproc_per_node=2 tests/no_cycles_worker.py OUT_DIR

Each rank builds Landscapes of the float64 MLP of fsdp_problems.py on its own shard of the data, on each route
(exact, exact with host vectors, exact with every graph rebuilt and a failure on rank 1 in a product, finite
differences, and a build that fails on rank 1), uses, closes and drops them with Python's garbage collector
off, runs a GeometryProbe probe likewise, and saves to ``OUT_DIR/rank{r}.json`` what remained allocated of
what each allocated.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
from fsdp_problems import end_worker, sharded_case
from test_no_cycles import Allocations, collector_off


def _settle() -> None:
    """Let gloo's worker thread let go of the last collective's tensors: it drops its reference to a finished
    work only when it takes the next one, so a scalar of the probe's last agreement could still be held for a
    moment after ``wait()`` returned (seen once in eight runs: one 8-byte tensor alive on both ranks). A barrier
    is a next collective; its own tensor is allocated outside the recording."""
    import torch.distributed as dist

    dist.barrier()


def _life(mesh, rank: int, options: dict, fail: str | None = None) -> dict:
    """One Landscape's life with the collector off: what it left allocated, whether it is still alive and
    what it raised. ``fail``: ``"hvp"`` makes rank 1's loss raise once the graphs are built (every HVP
    rebuilds them), ``"build"`` gives rank 1 NaN data."""
    import geomprobe as gp

    model, loss_fn, batches = sharded_case("mlp", mesh, rank)
    built = [False]

    def loss(model, batch):
        if fail == "hvp" and rank == 1 and built[0]:
            raise RuntimeError("rank 1's loss failed")
        return loss_fn(model(batch[0]), batch[1])

    if fail == "build" and rank == 1:
        batches = [(torch.full_like(x, float("nan")), t) for x, t in batches]

    def run(record: dict) -> gp.Landscape | None:
        built[0] = False
        try:
            land = gp.Landscape(model, loss, batches, **options)
        except gp.GeomprobeError as e:
            record["raised"] = type(e).__name__
            return None
        built[0] = True
        V = torch.randn(2, land.local_dim, dtype=land.dtype, generator=torch.Generator().manual_seed(rank))
        try:
            land.hvp(V[0])
            land.hvp(V)
            land.info()
        except gp.GeomprobeError as e:
            record["raised"] = type(e).__name__
        land.close()
        land.close()  # twice: harmless
        try:
            land.hvp(V[0])
        except gp.ConfigurationError as e:
            record["after_close"] = str(e)
        return land

    run({})  # once before measuring: FSDP's lazy state and first-call caches are not the Landscape's
    gc.collect()
    out: dict = {}
    with collector_off():
        allocations = Allocations()
        with allocations:
            land = run(out)
        ref = weakref.ref(land) if land is not None else None
        del land
        _settle()
        out["landscape_alive"] = ref is not None and ref() is not None
        out["alive"] = allocations.alive()[:8]
        out["alive_bytes"] = allocations.alive_bytes()
        out["allocations"] = len(allocations._made)
    return out


def _probe_life(mesh, rank: int) -> dict:
    """The second GeometryProbe probe of the FSDP2 MLP (spectrum; a sharded Landscape takes no warm start, so
    the probe keeps no vector): whether its Landscapes are gone and which of the storages it allocated remain,
    besides any warm start's vectors."""
    import geomprobe as gp
    from geomprobe.probe import geometry_probe

    model, loss_fn, batches = sharded_case("mlp", mesh, rank)
    X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    built: list = []

    def watched(*args, **kwargs):
        land = gp.Landscape(*args, **kwargs)
        built.append(weakref.ref(land))
        return land

    original, geometry_probe.Landscape = geometry_probe.Landscape, watched
    try:
        probe = gp.GeometryProbe(model, loss_fn, batches, metrics={"spectrum": {"tol": 1e-6}},
                                 schedule=gp.every(1), hvp_method="autograd", progress=lambda event: None)
        probe.attach(opt)  # probes step 0, cold
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()  # probes step 1, warm
        out: dict = {}
        with collector_off():
            allocations = Allocations()
            with allocations:
                record = probe.probe(2)
            warm = probe.warm
            kept = {t.untyped_storage().data_ptr() for t in (warm.top, warm.bottom) if t is not None}
            out["errors"] = record.get("errors")
            out["warm"] = record["spectrum"]["warm"]
            _settle()
            out["landscapes_alive"] = sum(r() is not None for r in built)
            out["alive_besides_warm"] = allocations.alive(besides=kept)
            out["warm_kept"] = len(kept & allocations.alive_pointers())
            out["allocations"] = len(allocations._made)
        probe.close(final_probe=False)
    finally:
        geometry_probe.Landscape = original
    return out


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cases = {
        "exact": ({"hvp_method": "autograd"}, None),
        "exact_host": ({"hvp_method": "autograd", "vector_device": "cpu"}, None),
        "exact_failing_hvp": ({"hvp_method": "autograd", "graph_budget_bytes": 0}, "hvp"),
        "finite_difference": ({"hvp_method": "finite-difference"}, None),
        "failing_build": ({"hvp_method": "autograd"}, "build"),
    }
    result = {name: _life(mesh, rank, options, fail) for name, (options, fail) in cases.items()}
    result["probe"] = _probe_life(mesh, rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
