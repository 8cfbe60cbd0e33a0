"""One rank of the 2-rank gloo checks in test_distributed.py, launched by torchrun; also the shared problem.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py OUT_DIR

Each rank measures its own shard of the 23 probe samples (rank 0: batches of 8 and 5, rank 1: one of 10)
and saves what it got to ``OUT_DIR/rank{r}.pt``; the test compares these with one process on the union.
The noise metrics use a larger set of 64 examples (rank 0: 37 in two batches, rank 1: 27).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

N_SAMPLES = 23
SHARDS = ([(0, 8), (8, 13)], [(13, 23)])  # rank -> list of (start, stop) batches: 13 and 10 samples
HVP_VECTORS = 5
PROBE_STEPS = 4  # training steps under the probe; the schedule probes every 2
N_NOISE = 64  # the noise metrics need P >= 32 (isotropy) samples and >= 20 noise norms (Hill)
NOISE_SHARDS = ([(0, 20), (20, 37)], [(37, 64)])
# name -> (metric, keyword arguments): held rows, two chunked passes, and a max_samples cap that falls on rank 1
NOISE_CASES = {
    "noise": ("noise", {"min_samples": 32, "chunk_size": 8}),
    "noise_chunked": ("noise", {"min_samples": 32, "chunk_size": 8, "max_elements": 2000}),
    "noise_capped": ("noise", {"min_samples": 32, "max_samples": 50}),
    "isotropy": ("isotropy", {"chunk_size": 8, "lanczos_tol": 1e-10}),
    "isotropy_chunked": ("isotropy", {"u_min": None, "max_elements": 2000}),
}


def make_problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The model (float64), its loss and the full probe data, identical in every process."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(N_SAMPLES, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def hvp_vectors(dim: int) -> torch.Tensor:
    return torch.randn(HVP_VECTORS, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _landscape_results(model, loss_fn, batches) -> dict:
    import geomprobe as gp
    from geomprobe.metrics import spectrum

    land = gp.Landscape(model, loss_fn, batches)
    V = hvp_vectors(land.dim)
    out = {
        "n_samples": land.n_samples,
        "loss": land.loss,
        "grad": land.grad.clone(),
        "hvp": land.hvp(V),
        "hvp_single": land.hvp(V[0]),
        "spectrum": spectrum(land, k=2, tol=1e-10),
    }
    # last: finite differences move the parameters (and restore them), which retires `land`
    out["hvp_fd"] = gp.Landscape(model, loss_fn, batches, hvp_method="finite-difference").hvp(V[0])
    return out


def make_noise_problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """The noise metrics' problem: the same model on ``N_NOISE`` examples and an Adam with state, identical
    in every process (a step with lr = 0 fills its second moments and leaves the parameters as they were)."""
    model, loss_fn, _, _ = make_problem()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N_NOISE, 5, dtype=torch.float64, generator=g)
    y = (X[:, 0] > -1.0).long() * 2  # mostly one class: a mean gradient that stands out of the noise
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    loss_fn(model(X), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, loss_fn, X, y, opt


def noise_results(model, loss_fn, batches, opt) -> dict:
    """Every case of ``NOISE_CASES`` on a Landscape of ``batches`` (distributed when a group is initialized)."""
    import geomprobe as gp
    from geomprobe.metrics import isotropy, noise

    land = gp.Landscape(model, loss_fn, batches)
    metrics = {"noise": lambda **kw: noise(land, **kw), "isotropy": lambda **kw: isotropy(land, optimizer=opt, **kw)}
    return {name: metrics[metric](**kw) for name, (metric, kw) in NOISE_CASES.items()}


def _sharded_parameter_error() -> str:
    """The error a Landscape gives for a DTensor (sharded) parameter, or why it could not be tried."""
    import geomprobe as gp

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
    except ImportError as e:  # pragma: no cover - torch builds without DTensor
        return f"skipped: {e}"
    model, loss_fn, X, y = make_problem()
    mesh = init_device_mesh("cpu", (2,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    try:
        gp.Landscape(model, loss_fn, (X, y))
    except gp.ConfigurationError as e:
        return str(e)
    return "no error"


def _fully_sharded_error() -> str:
    """What a Landscape of a model under FSDP2 (``fully_shard``) is, or why it could not be tried (FSDP2 is
    measured since issue 17; tests/test_fsdp.py checks what it measures)."""
    import geomprobe as gp

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch builds without FSDP2
        return f"skipped: {e}"
    model, loss_fn, X, y = make_problem()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    return type(gp.Landscape(model, loss_fn, (X, y))).__name__


def _failure_on_one_rank(model, loss_fn, batches, rank: int) -> str:
    """What each rank raises when rank 1's shard has a NaN: its own error there, a stand-in on rank 0."""
    import geomprobe as gp

    if rank == 1:
        batches = [(torch.full_like(x, float("nan")), t) for x, t in batches]
    try:
        gp.Landscape(model, loss_fn, batches)
    except gp.GeomprobeError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _probe_records(model, loss_fn, batches, run_dir: str) -> list[dict]:
    """A GeometryProbe under DDP training, probing every 2 steps; every rank passes the same run_dir."""
    import geomprobe as gp

    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with gp.GeometryProbe(ddp, loss_fn, batches, metrics={"spectrum": {"tol": 1e-8}},
                          schedule=gp.every(2), run_dir=run_dir) as probe:
        probe.attach(opt)
        for _ in range(PROBE_STEPS):
            opt.zero_grad()
            loss_fn(ddp(X), y).backward()
            opt.step()
    return probe.records


def _phase(rank: int, name: str) -> None:
    """Say on stderr which part a rank is in, so that a rank killed by a signal shows where it died."""
    print(f"[rank {rank}] {name}", file=sys.stderr, flush=True)


def main(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, loss_fn, X, y = make_problem()
    batches = [(X[a:b], y[a:b]) for a, b in SHARDS[rank]]
    _phase(rank, "landscape")
    result = _landscape_results(model, loss_fn, batches)
    _phase(rank, "failure on one rank")
    result["failure"] = _failure_on_one_rank(model, loss_fn, batches, rank)
    _phase(rank, "noise")
    nmodel, nloss, NX, Ny, opt = make_noise_problem()
    result["noise"] = noise_results(nmodel, nloss, [(NX[a:b], Ny[a:b]) for a, b in NOISE_SHARDS[rank]], opt)
    _phase(rank, "probe under DDP")
    result["records"] = json.loads(json.dumps(_probe_records(model, loss_fn, batches, f"{out_dir}/run")))
    _phase(rank, "sharded parameters")
    result["sharded_error"] = _sharded_parameter_error()
    result["fsdp_error"] = _fully_sharded_error()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _phase(rank, "saved")
    dist.barrier()
    dist.destroy_process_group()
    _phase(rank, "done")
    # Skip interpreter teardown: the checks are saved, and static destructors of the communication threads
    # are not what this test is about (some sandboxes abort in them).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
