"""Per-HVP and per-probe time with the probe data split across N devices, against one device with all of it.

Every rank builds the same model (seeded) and the same ``--samples`` probe samples, keeps its shard (rank r
takes samples r, r + N, ...), and times on it:
  build        Landscape construction: forward + first-order graph + the all-reduce of loss and gradient
  hvp          Landscape.hvp(v), one vector, all-reduced
  hvp_block    Landscape.hvp(V) with --k vectors (one all-reduce of the (k, d) block), per vector
  probe        build + spectrum with a fixed --lanczos-steps (so both layouts do the same number of HVPs)
Rank 0 then repeats the same timings with all samples on its own device (``process_group=False``) while the
other ranks wait: the 1-device baseline, on the same device type, in the same run.

    torchrun --nproc_per_node=2 benchmarks/distributed_hvp.py --device cuda --out benchmarks/results/distributed_hvp_h200x2.json
    python -m torch.distributed.run --nproc_per_node=2 benchmarks/distributed_hvp.py --device cpu --small --samples 32 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, median_seconds  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe.metrics import spectrum  # noqa: E402


def measure(model, loss_fn, batch, device, *, group, k: int, steps: int, repeats: int) -> dict:
    """Median seconds of build, one HVP, a k-block HVP per vector and a fixed-length probe."""
    def build():
        return gp.Landscape(model, loss_fn, batch, process_group=group)

    land = build()
    dim = land.dim
    g = torch.Generator().manual_seed(1)  # the same vectors on every rank, as the probe's own kernels draw
    v = torch.randn(dim, generator=g).to(device=device, dtype=land.dtype)
    V = torch.randn(k, dim, generator=g).to(device=device, dtype=land.dtype)

    def probe():
        with build() as fresh:
            # tol=0 never stops early: every layout does exactly `steps` HVPs
            spectrum(fresh, tol=0.0, max_iter=steps)

    return {
        "build_s": median_seconds(build, device, repeats=repeats),
        "hvp_s": median_seconds(lambda: land.hvp(v), device, repeats=repeats),
        "hvp_block_per_vector_s": median_seconds(lambda: land.hvp(V), device, repeats=repeats) / k,
        "probe_s": median_seconds(probe, device, repeats=repeats),
        "dim": dim,
        "local_samples": land.batch_sizes,
        "n_samples": land.n_samples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="resnet18", choices=["mlp", "resnet18", "transformer"])
    p.add_argument("--samples", type=int, default=256, help="probe samples over all ranks together")
    p.add_argument("--k", type=int, default=8, help="vectors in the block HVP")
    p.add_argument("--lanczos-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="shrink the model (CPU smoke runs)")
    p.add_argument("--no-baseline", action="store_true", help="skip rank 0's 1-device run on all samples")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if args.samples < world:
        raise SystemExit(f"--samples must be at least the number of ranks ({world}), got {args.samples}")

    torch.manual_seed(0)  # the model's initialization: identical on every rank
    model, loss_fn, (x, y) = models.make(args.model, args.samples, device, torch.Generator().manual_seed(0),
                                         small=args.small)
    model.eval()
    shard = (x[rank::world], y[rank::world])
    opts = dict(k=args.k, steps=args.lanczos_steps, repeats=args.repeats)
    split = measure(model, loss_fn, shard, device, group=None, **opts)
    dist.barrier()

    if rank == 0:
        result = {"environment": environment(device), "backend": backend, "world_size": world,
                  "model": args.model, "small": args.small, "samples": args.samples, **opts,
                  f"split_{world}": split}
        if not args.no_baseline:
            one = measure(model, loss_fn, (x, y), device, group=False, **opts)
            result["one_device"] = one
            result["speedup"] = {key: one[key] / split[key] for key in
                                 ("build_s", "hvp_s", "hvp_block_per_vector_s", "probe_s")}
        dump(result, args.out)
    dist.barrier()  # the other ranks wait for the baseline, so no rank exits while a collective is pending
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
