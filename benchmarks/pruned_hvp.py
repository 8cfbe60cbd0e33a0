"""Seconds per chunk of 16 Hessian columns with and without pruned outputs (issue 16, "full set in <= 2 minutes").

A chunk of one-hot vectors ``e_j`` (how ``rmed``, ``diagshare`` and ``precond`` read exact Hessian columns,
16 at a time in block order) has zero parts in every parameter block it does not touch. The pruned route
(``geomprobe/engine/pruned_outputs.py``) leaves those blocks' first-order gradients out of the double backward,
so autograd skips the nodes only they reach; the unpruned route is the same Landscape with ``part_mask``
answering None (every output kept, the code before the change). Per model, in one process:

* per block position (``--positions`` blocks spread over the parameter list, bottom to top): seconds of one
  ``land.hvp`` of 16 one-hot columns of that block (random coordinates; a block smaller than 16 is topped up
  from the next blocks, as the reads do), pruned and unpruned alternately (``--repeats`` each, medians), and
  the largest difference of their products (0.0: bit-identical);
* a dense block of 16 and a single dense vector, pruned and unpruned: what looking for zero parts costs where
  there are none (a single vector is never inspected), and the inspection alone (``part_mask`` of a chunk of
  columns and of the dense block, and the full scan ``nonzero_parts`` that the dense block is spared);
* ``rmed`` (``--rmed-hvps``, seed 0) on the Landscape, unpruned then pruned (``--rmed-repeats`` times,
  alternated; its stored columns cleared before each), its seconds and the seconds inside ``land.hvp``, with
  both results' whole-model figures (equal up to the rounding of batched rows).

Models: ``gpt2-cpu`` (a random-init Hugging Face GPT-2, 6 layers, width 256, 4 heads, vocab 1000, 4 x 64
tokens), ``gpt2-124m`` (8 x 512 tokens, ``benchmarks/scale.py``'s), ``mlp-deep`` (``--depth`` tanh layers of
width ``--width``, batch 256).

    OMP_NUM_THREADS=1 python benchmarks/pruned_hvp.py --models gpt2-cpu,mlp-deep --device cpu \\
        --out benchmarks/results/pruned_hvp_cpu.json
    python benchmarks/pruned_hvp.py --models gpt2-124m --dtype bf16 --positions 12 --out pruned_hvp_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import dump, environment, sync

import geomprobe.engine.landscape as landscape_module
from geomprobe.engine.landscape import Landscape
from geomprobe.engine.pruned_outputs import nonzero_parts, part_mask
from geomprobe.metrics.rmed import rmed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
CHUNK = 16


@contextlib.contextmanager
def unpruned():
    """The route before pruning: every first-order gradient is an output of the double backward."""
    real = landscape_module.part_mask
    landscape_module.part_mask = lambda land, V: None
    try:
        yield
    finally:
        landscape_module.part_mask = real


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def build(name: str, dtype: torch.dtype, device, depth: int, width: int) -> tuple[torch.nn.Module, object, list]:
    """(model, loss_fn, probe batches) for a named case; weights and data from fixed seeds."""
    g = torch.Generator().manual_seed(1)
    if name == "mlp-deep":
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = [torch.nn.Linear(width, width)]
        for _ in range(depth - 1):
            layers += [torch.nn.Tanh(), torch.nn.Linear(width, width)]
        model = torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(width, 10)).to(device, dtype)
        ce = torch.nn.CrossEntropyLoss()

        def loss_fn(model, b):
            return ce(model(b[0]), b[1])

        batch = (torch.randn(256, width, generator=g).to(device, dtype), torch.randint(0, 10, (256,), generator=g).to(device))
        return model, loss_fn, [batch]
    from transformers import GPT2Config, GPT2LMHeadModel

    if name == "gpt2-124m":
        config, b, t = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257), 8, 512
    elif name == "gpt2-cpu":
        config, b, t = GPT2Config(n_embd=256, n_layer=6, n_head=4, n_positions=64, vocab_size=1000,
                                  bos_token_id=0, eos_token_id=0), 4, 64
    else:
        raise SystemExit(f"unknown model {name!r}: gpt2-cpu, gpt2-124m or mlp-deep")
    config.attn_implementation = "sdpa"
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    batch = {"input_ids": torch.randint(0, config.vocab_size, (b, t), generator=g).to(device)}
    return model.to(device=device, dtype=dtype), lm_loss, [batch]


def columns(land: Landscape, start: int, g: torch.Generator) -> torch.Tensor:
    """16 one-hot rows: random coordinates of the block starting at ``start`` (and the next blocks', where it
    has fewer than 16), sorted as the reads sort them."""
    blocks = [b for b in land.blocks if b.stop > start]
    idx: list[int] = []
    for b in blocks:
        take = min(CHUNK - len(idx), b.size)
        idx += (b.start + torch.randperm(b.size, generator=g)[:take]).tolist()
        if len(idx) == CHUNK:
            break
    E = torch.zeros(len(idx), land.dim, dtype=land.dtype, device=land.device)
    E[torch.arange(len(idx)), torch.tensor(sorted(idx))] = 1
    return E


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def paired(land: Landscape, V: torch.Tensor, repeats: int, device) -> dict:
    """Median seconds of ``land.hvp(V)`` pruned and unpruned, alternated after one warm-up each, and the
    largest difference of the two products."""
    with unpruned():
        full = land.hvp(V)
    pruned = land.hvp(V)
    diff = float((pruned.double() - full.double()).abs().max())
    scale = float(full.double().abs().max())
    del full, pruned
    t_p, t_u = [], []
    for _ in range(repeats):
        t_p.append(timed(lambda: land.hvp(V), device))
        with unpruned():
            t_u.append(timed(lambda: land.hvp(V), device))
    p, u = statistics.median(t_p), statistics.median(t_u)
    return {"pruned_s": p, "unpruned_s": u, "speedup": u / p, "max_abs_diff": diff, "max_abs": scale}


def rmed_figures(out: dict) -> dict:
    return {k: out.get(k) for k in ("rmed", "rmed_err", "rmed_q99", "max", "median", "mode", "hvps")}


def rmed_run(land: Landscape, hvps: int, device, without_pruning: bool) -> dict:
    """One ``rmed`` on ``land`` (its stored columns cleared first): seconds, seconds inside ``land.hvp``, HVPs
    and the whole-model figures."""
    land.results.clear()  # no column read by another run
    inner, inside = land.hvp, [0.0]

    def clocked(v, out=None):
        sync(device)
        t0 = time.perf_counter()
        r = inner(v) if out is None else inner(v, out=out)
        sync(device)
        inside[0] += time.perf_counter() - t0
        return r

    land.hvp = clocked
    try:
        with unpruned() if without_pruning else contextlib.nullcontext():
            h0 = land.hvps
            sync(device)
            t0 = time.perf_counter()
            out = rmed(land, hvps=hvps, seed=0)
            sync(device)
            seconds = time.perf_counter() - t0
    finally:
        del land.hvp
    return {"seconds": seconds, "hvp_seconds": inside[0], "hvps": land.hvps - h0, **rmed_figures(out)}


def chunk_timings(name: str, land: Landscape, args, device) -> dict:
    """The per-position column chunks, the dense block, the single vector and the inspection alone."""
    res: dict = {}
    g = torch.Generator().manual_seed(0)
    n = len(land.blocks)
    at = sorted(set(np.linspace(0, n - 1, min(args.positions, n)).round().astype(int).tolist()))
    rows = []
    for i in at:
        b = land.blocks[i]
        row = {"block": i, "name": b.name, "size": b.size,
               **paired(land, columns(land, b.start, g), args.repeats, device)}
        print(f"{name} block {i:4d} {b.name:40s} pruned {row['pruned_s']:.3f} s  unpruned {row['unpruned_s']:.3f} s"
              f"  x{row['speedup']:.2f}  diff {row['max_abs_diff']:.1e}", flush=True)
        rows.append(row)
    res["columns"] = rows
    res["columns_mean_speedup"] = statistics.mean(r["unpruned_s"] for r in rows) / statistics.mean(
        r["pruned_s"] for r in rows)
    gen = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else torch.Generator().manual_seed(0)
    dense = torch.randn(CHUNK, land.dim, generator=gen, device=device, dtype=land.dtype)
    res["dense_block"] = paired(land, dense, args.repeats, device)
    res["single_vector"] = paired(land, dense[0], args.repeats, device)
    col = columns(land, land.blocks[n // 2].start, g)
    inspect: dict[str, list[float]] = {"columns": [], "dense": [], "dense_full_scan": []}
    for _ in range(max(3, args.repeats)):
        for kind, fn in (("columns", lambda: part_mask(land, col)), ("dense", lambda: part_mask(land, dense)),
                         ("dense_full_scan", lambda: nonzero_parts(dense, land.space.offsets))):
            inspect[kind].append(timed(fn, device))
    res["inspection_s"] = {k: statistics.median(t) for k, t in inspect.items()}
    print(f"{name} dense block x{res['dense_block']['speedup']:.3f}, single vector "
          f"x{res['single_vector']['speedup']:.3f}, inspection {res['inspection_s']}", flush=True)
    return res


def measure(name: str, args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model, loss_fn, batches = build(name, dtype, device, args.depth, args.width)
    land = Landscape(model, loss_fn, batches, mode="eval")
    res: dict = {"model": name, "dtype": args.dtype, "dim": land.dim, "parameters": len(land.params),
                 "chunk_size": land.chunk_size, "batch": [list(v.shape) for b in batches
                                                          for v in (b.values() if isinstance(b, dict) else b[:1])]}
    if args.positions > 0:
        res.update(chunk_timings(name, land, args, device))
    if args.rmed_hvps > 0:
        runs: dict[str, list[dict]] = {"unpruned": [], "pruned": []}
        for _ in range(args.rmed_repeats):  # alternated, so that a host's changing load falls on both
            for label in ("unpruned", "pruned"):
                runs[label].append(rmed_run(land, args.rmed_hvps, device, label == "unpruned"))
                print(f"{name} rmed {label}: {runs[label][-1]}", flush=True)
        for label, got in runs.items():
            res[f"rmed_{label}"] = {**got[-1], "seconds": statistics.median(r["seconds"] for r in got),
                                    "hvp_seconds": statistics.median(r["hvp_seconds"] for r in got),
                                    "all_seconds": [r["seconds"] for r in got]}
        res["rmed_speedup"] = res["rmed_unpruned"]["seconds"] / res["rmed_pruned"]["seconds"]
        res["rmed_hvp_speedup"] = res["rmed_unpruned"]["hvp_seconds"] / res["rmed_pruned"]["hvp_seconds"]
    land.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="gpt2-cpu,mlp-deep")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--positions", type=int, default=8, help="block positions timed, bottom to top; 0: rmed only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rmed-hvps", type=int, default=1024, help="rmed's budget; 0: no rmed timing")
    ap.add_argument("--rmed-repeats", type=int, default=1, help="rmed runs each way, alternated (medians)")
    ap.add_argument("--depth", type=int, default=16, help="mlp-deep: hidden layers")
    ap.add_argument("--width", type=int, default=512, help="mlp-deep: width")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"environment": environment(args.device), "args": vars(args), "models": []}
    for name in args.models.split(","):
        out["models"].append(measure(name.strip(), args))
        if args.out:  # what a run stopped by a time limit has measured so far
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)
    dump(out, args.out)


if __name__ == "__main__":
    main()
