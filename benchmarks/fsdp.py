"""FSDP2 probing at scale: a Llama-style model sharded with ``fully_shard`` over the GPUs of one node.

    torchrun --nproc-per-node 2 benchmarks/fsdp.py --out benchmarks/results/fsdp_7b.json
    torchrun --nproc-per-node 2 benchmarks/fsdp.py --model 1b --out benchmarks/results/fsdp_1b.json
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/fsdp.py --tiny --out /tmp/fsdp_tiny.json

The model (``LlamaConfig``: 7b = hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 11008, vocab
32000; 1b = hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 5632) is built on the meta device,
sharded (one FSDP unit per decoder layer, then the root) and only then materialized, so no rank ever holds
a whole copy; weights are random (normal, std 0.02; norms 1), in bf16. Each rank gets ``--batch`` sequences of
``--seq`` random tokens. Measured, per GPU:

- one FSDP training step (forward, backward and AdamW step): seconds and peak memory; a gradient alone
  (forward and backward): seconds;
- for each HVP route (``autograd``: exact, whole parameters gathered once; ``finite-difference``: Richardson
  differences of FSDP's gradients): building the Landscape, seconds per HVP (and per HVP / gradient), the
  spectrum probe (lambda_max and lambda_min with their bounds, converged, seconds, HVPs) and the probe's
  peak memory divided by the training step's;
- the route ``hvp_method="auto"`` picks within 1.5x the training peak, with its reasons;
- ``--model 1b``: the same HVP with the data on one GPU (rank 0, an unsharded copy, both ranks' data)
  against two, the per-HVP speed-up.

``--vector-device cpu`` keeps every slice-sized vector (the gradient, HVP inputs and outputs, Lanczos' vectors
and basis) in host memory: the streamed HVP moves each parameter's piece to and from the device and forms its
output's partial sums on the host, so the GPU holds the training state, the whole parameters, the graph and
the pieces in flight only (the Lanczos
arithmetic then runs on the host, with ``--host-threads`` threads per rank). The peak per phase is in
``peak_bytes`` (``build``, ``hvp``, ``spectrum``; ``spectrum_so_far`` while it runs) and the host's peak
resident memory per rank in ``host_peak_rss_bytes``.

An out-of-memory error in any part is caught, recorded with the part's name, and the next part runs. Rank 0
writes the JSON (``--out``) and prints it. ``--tiny``: a 2-layer model of width 64 on CPU with gloo, in
float32, to check the script's logic anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geomprobe as gp
from geomprobe.engine.memory_plan import MemoryBudget
from geomprobe.linalg.vectors import default_generator
from geomprobe.metrics import spectrum

CONFIGS = {
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 11008, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 5632, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 256},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _host_rss() -> int:
    """This process's peak resident host memory so far (bytes; Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _attempt(results: dict, name: str, fn, device: torch.device):
    """Run one part; an out-of-memory error (or any other) is recorded under ``name`` and the run goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark records every failure and continues
        results.setdefault("errors", {})[name] = f"{'OutOfMemory' if _is_oom(e) else type(e).__name__}: {str(e)[:400]}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def build_model(size: str, device: torch.device, dtype: torch.dtype, mesh, seed: int):
    """A Llama model built on the meta device, sharded, then materialized and randomly initialized shard by
    shard (no whole copy on any rank)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIGS[size], max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    if mesh is not None:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.copy_(torch.randn(local.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02))
        # non-persistent buffers (the rotary frequencies) were left empty by to_empty: recompute them
        for m in model.modules():
            if type(m).__name__.endswith("RotaryEmbedding"):
                fresh = type(m)(m.config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    m._buffers[bname] = buf.to(device)
    return model


def loss_fn(model, batch):
    """Next-token cross entropy, mean over the batch's tokens (``batch["input_ids"]``: ``(n, seq)``)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half types: the loss in float32
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def train_step(model, batch, device, results) -> torch.optim.Optimizer:
    """Times a training step and a gradient; returns the optimizer, whose state stays allocated while the
    probe is measured, as it is in training."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the parameters stay where the probe measures

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    step()  # warm-up: optimizer state allocated, kernels chosen
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    results["train_step"] = {"what": "forward + backward + AdamW step (lr 0)", "seconds": time.perf_counter() - t0,
                             "peak_bytes": _peak(device)}
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_fn(model, batch).backward()
    _sync(device)
    results["gradient_seconds"] = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)
    gc.collect()
    return opt


def _allocated(device: torch.device) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _landscape_options(route: str, args, results) -> dict:
    """The Landscape's memory settings on this route: ``--plan`` lets the exact route's memory plan choose
    micro-batches, kept graphs and the basis within ``--peak-ratio`` x the training peak; ``--micro-batch``,
    ``--graph-budget`` and ``--chunk`` fix them."""
    opts: dict = {"hvp_method": route, "memory": None}
    if args.plan and route == "autograd":
        train = results.get("train_step", {}).get("peak_bytes")
        opts["memory"] = MemoryBudget(train_peak_bytes=train, peak_ratio=args.peak_ratio, bounded_basis=True,
                                      basis_vectors=args.max_iter + 1)
    if args.micro_batch:
        opts["micro_batch_size"] = args.micro_batch
    if args.graph_budget is not None:
        opts["graph_budget_bytes"] = int(args.graph_budget * 2**30)
    if args.chunk:
        opts["chunk_size"] = args.chunk
    if args.vector_device:
        opts["vector_device"] = args.vector_device
    if args.recompute_attention and route == "autograd":
        opts["recompute_attention"] = True
    return opts


def measure_route(model, batch, route: str, device, args, results, save) -> None:
    """Build, time HVPs and run the spectrum probe on one route; the peak memory of each phase separately
    (``peak_bytes``: build, HVPs, spectrum), and ``save()`` after each, so that a run stopped by its time
    limit keeps what it measured."""
    out = results.setdefault("routes", {}).setdefault(route, {})
    opts = _landscape_options(route, args, results)
    out["options"] = {k: (v.__dict__ if isinstance(v, MemoryBudget) else v) for k, v in opts.items()}
    peaks = out.setdefault("peak_bytes", {})
    _reset_peak(device)
    t0 = time.perf_counter()
    land = gp.Landscape(model, loss_fn, [batch], **opts)
    _sync(device)
    out["build_seconds"] = time.perf_counter() - t0
    peaks["build"], out["allocated_after_build"] = _peak(device), _allocated(device)
    rss = out.setdefault("host_peak_rss_bytes", {})
    rss["build"] = _host_rss()
    out["info"] = land.info()
    if land.plan is not None:
        out["plan"] = land.plan.to_dict()
    save()
    try:
        v = land.vector_space.gaussian(default_generator(1), land.dtype, getattr(land, "vector_device", land.device))
        _reset_peak(device)
        land.hvp(v)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.hvps):
            land.hvp(v)
        _sync(device)
        out["hvp_seconds"] = (time.perf_counter() - t0) / args.hvps
        peaks["hvp"] = _peak(device)
        rss["hvp"] = _host_rss()
        del v
        if results.get("gradient_seconds"):
            out["hvp_over_gradient"] = out["hvp_seconds"] / results["gradient_seconds"]
        if land.hvp_errors:
            out["hvp_error_rel"] = land.hvp_errors[-1]
        out["info"] = land.info()
        save()
        if args.skip_spectrum:
            return
        _reset_peak(device)
        t0 = time.perf_counter()
        # a 7B slice is 5.9 GB in bf16: the basis lives on the host and is capped (thick restart beyond it),
        # unless --plan lets the memory plan place it
        basis_device = args.basis_device if device.type == "cuda" else None
        max_basis = args.max_basis
        if args.plan and land.plan is not None:
            basis_device, max_basis = land.plan.basis_device, land.plan.max_basis or args.max_basis
        out["basis"] = {"device": basis_device or "model's", "max_basis": max_basis}
        _report_progress(land, out, t0, save, device)
        s = spectrum(land, tol=args.tol, max_iter=args.max_iter, max_basis=max_basis, basis_device=basis_device)
        _sync(device)
        peaks["spectrum"] = _peak(device)
        peaks.pop("spectrum_so_far", None)
        rss["spectrum"] = _host_rss()
        out["spectrum"] = {k: s[k] for k in ("lambda_max", "lambda_max_err", "lambda_min", "lambda_min_err",
                                              "converged", "steps", "hvps", "restarts") if k in s}
        out["spectrum"]["hvp_error"] = s.get("hvp_error")
        out["spectrum"]["seconds"] = time.perf_counter() - t0
        out["probe_seconds"] = out["build_seconds"] + out["spectrum"]["seconds"]
        out["info"] = land.info()
    finally:
        land.close()
        del land
        gc.collect()
        train = results.get("train_step", {}).get("peak_bytes")
        known = [p for p in peaks.values() if p]
        if known and train:
            out["peak_over_train"] = {k: p / train for k, p in peaks.items() if p}
            out["max_peak_over_train"] = max(known) / train
        save()


def _report_progress(land, out: dict, t0: float, save, device: torch.device, every: int = 10) -> None:
    """Every ``every`` HVPs of the spectrum phase: its HVPs and seconds so far in ``out["spectrum_progress"]``
    and the phase's peak memory so far (``peak_bytes["spectrum_so_far"]``), printed by rank 0 and saved, so
    that a run stopped by its time limit still says how far it got and what it held."""
    done = [0]

    def on_hvps(n: int) -> None:
        done[0] += n
        if done[0] % every == 0 or done[0] <= 2:
            out["spectrum_progress"] = {"hvps": done[0], "seconds": round(time.perf_counter() - t0, 2)}
            out["peak_bytes"]["spectrum_so_far"] = _peak(device)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(json.dumps({"spectrum_progress": out["spectrum_progress"]}), flush=True)
            save()

    gp.probe.progress.count_hvps(land, on_hvps)


def auto_route(model, batch, device, results) -> None:
    train = results.get("train_step", {}).get("peak_bytes")
    budget = MemoryBudget(train_peak_bytes=train, peak_ratio=1.5) if train else None
    land = gp.Landscape(model, loss_fn, [batch], hvp_method="auto", memory=budget or "auto")
    results["auto_route"] = land.info()["sharded"]
    land.close()


def one_gpu_hvp(size: str, batches: list[torch.Tensor], device, dtype, args, results) -> None:
    """Rank 0 alone: an unsharded copy of the model with every rank's data, the exact HVP's time."""
    model = build_model(size, device, dtype, None, seed=0)
    land = gp.Landscape(model, loss_fn, batches, memory=None, process_group=False)  # this rank alone
    v = torch.randn(land.dim, generator=torch.Generator(device=device).manual_seed(1), device=device, dtype=dtype)
    land.hvp(v)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.hvps):
        land.hvp(v)
    _sync(device)
    results["one_gpu"] = {"hvp_seconds": (time.perf_counter() - t0) / args.hvps, "peak_bytes": _peak(device),
                          "samples": sum(int(b["input_ids"].shape[0]) for b in batches)}
    land.close()
    del land, model
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["7b", "1b"], default="7b")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU with gloo (checks the logic)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--hvps", type=int, default=3, help="HVPs timed per route")
    ap.add_argument("--max-basis", type=int, default=8, help="Lanczos vectors stored (thick restart beyond)")
    ap.add_argument("--basis-device", default="cpu", help="where the Lanczos basis lives on GPU runs")
    ap.add_argument("--routes", default="autograd,finite-difference",
                    help="comma-separated; in bf16 finite differences are mostly rounding (RESULTS §8)")
    ap.add_argument("--plan", action="store_true",
                    help="exact route: let its memory plan choose micro-batches, kept graphs and the basis "
                         "within --peak-ratio x the training peak (default: no plan, whole batch, graph kept)")
    ap.add_argument("--peak-ratio", type=float, default=1.5)
    ap.add_argument("--micro-batch", type=int, default=None, help="samples per micro-batch (graph per piece)")
    ap.add_argument("--graph-budget", type=float, default=None,
                    help="GiB of first-order graphs kept; the others are rebuilt at every HVP")
    ap.add_argument("--chunk", type=int, default=1,
                    help="vectors per batched HVP; 1 (default): every HVP streamed, and the kept graph holds no "
                         "whole gradient (a d-vector); more keeps it, for whole blocks")
    ap.add_argument("--vector-device", default=None, choices=["cpu", "cuda"],
                    help="where slice-sized vectors live: cpu = host memory (the streamed HVP moves each "
                         "parameter's piece); default: the GPU, or the plan's choice with --plan")
    ap.add_argument("--recompute-attention", action="store_true",
                    help="exact route: recompute attention probabilities in the double backward instead of "
                         "keeping them in the graph (smaller graph, slower HVP)")
    ap.add_argument("--host-threads", type=int, default=None,
                    help="CPU threads per rank for host-memory vectors (default: the cores over the ranks)")
    ap.add_argument("--skip-spectrum", action="store_true", help="build and time HVPs only")
    ap.add_argument("--skip-auto", action="store_true", help="skip the auto route's decision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tiny = args.tiny
    dist.init_process_group("gloo" if tiny else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if tiny:
        device, dtype, size = torch.device("cpu"), torch.float32, "tiny"
        args.seq = min(args.seq, 32)
        torch.set_num_threads(1)
    else:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device, dtype, size = torch.device("cuda", local), torch.bfloat16, args.model
        if args.vector_device == "cpu" or args.host_threads:
            # torchrun starts every rank with one thread: Lanczos on host slices needs the cores
            torch.set_num_threads(args.host_threads or max(1, (os.cpu_count() or world) // world))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    results: dict = {"model": size, "world_size": world, "dtype": str(dtype), "batch_per_rank": [args.batch, args.seq],
                     "vector_device": args.vector_device or "model's", "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    vocab = CONFIGS[size]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(100 + rank)).to(device)
    batch = {"input_ids": ids}
    model = build_model(size, device, dtype, mesh, seed=rank)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    # the optimizer (and its state) lives on through the probe measurements, as in training
    opt = _attempt(results, "train_step", lambda: train_step(model, batch, device, results), device)
    def save() -> None:  # after each part, so a run stopped by a time limit keeps what it measured
        if rank == 0 and args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")

    save()
    for route in args.routes.split(","):
        _attempt(results, f"route {route}", lambda r=route: measure_route(model, batch, r, device, args, results, save),
                 device)
        save()
        if rank == 0:
            print(json.dumps({"route": route, **results.get("routes", {}).get(route, {})}, default=str)[:1500],
                  flush=True)
    if not args.skip_auto:
        _attempt(results, "auto_route", lambda: auto_route(model, batch, device, results), device)
        save()
    if size in ("1b", "tiny"):
        gathered = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(gathered, ids)
        gathered = [{"input_ids": g} for g in gathered]
        del opt  # frees the sharded model with its optimizer state before the one-GPU copy
        del model
        gc.collect()
        dist.barrier()
        if rank == 0:
            _attempt(results, "one_gpu", lambda: one_gpu_hvp(size, gathered, device, dtype, args, results), device)
            two = results.get("routes", {}).get("autograd", {}).get("hvp_seconds")
            if two and results.get("one_gpu"):
                results["hvp_speedup_two_over_one"] = results["one_gpu"]["hvp_seconds"] / two
        dist.barrier()
    if rank == 0:
        text = json.dumps(results, indent=2, default=str)
        print(text, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
