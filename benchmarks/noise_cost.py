"""Seconds the ``noise`` metric spends outside its gradients (issue 16), on the CPU or a CUDA device, JSON out.

The metric's own work is measured without the noise of the gradients' timing: the P gradient samples are made
once, kept, and replayed to the metric from memory (``metric_replay_s``: everything but the gradients, both
passes' statistics, the tail indices, the rest), beside the seconds of one pass of real gradients
(``grad_pass_s``). ``collect_s`` and ``tails_s`` split the replayed work into the streaming statistics
(``collect_noise``) and the tail indices run one after the other. ``metric_s`` is the real metric, gradients
included, ``outside_s = metric_s - passes x grad_pass_s`` its time outside them, noisier (two timings of the
gradients), and with the tail indices beside the second pass as the metric runs them. Ratios:
``replay_over_gradients = metric_replay_s / (passes x grad_pass_s)`` and ``metric_over_gradients``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/noise_cost.py --model gpt2-mid --out cpu.json
    PYTHONPATH=. python benchmarks/noise_cost.py --model gpt2-124m --dtype bf16 --device cuda --out h200.json

Run it with ``PYTHONPATH`` at another checkout to measure that one (options it lacks are left out).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import DTYPES, build, lm_loss, token_batches
from timing import environment

import geomprobe as gp
from geomprobe.stats import gradient_noise

# the module (geomprobe.metrics exports the metric function under the same name)
noise_module = importlib.import_module("geomprobe.metrics.noise")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Replay:
    """The gradient samples of ``src``, made once and given again on every pass (its ``len``, batch size, source
    and method too), so a pass over them costs no gradients."""

    def __init__(self, src, rows: list[torch.Tensor]):
        self.rows = rows
        self.source, self.method, self.fallback_reason = src.source, src.method, src.fallback_reason
        self.batch_size = src.batch_size

    def __len__(self) -> int:
        return sum(r.shape[0] for r in self.rows)

    def __iter__(self):
        return iter(self.rows)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-mid", help="a case of benchmarks/scale.py (gpt2-tiny, gpt2-mid, gpt2-124m, ...)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--noise-batches", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="replayed runs (the median is reported)")
    ap.add_argument("--real", type=int, default=1, help="runs of the real metric, gradients included (0: none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    model, vocab, b, t = build(args.model, DTYPES[args.dtype], device)
    batch = token_batches(vocab, b, t, 1, device, seed=1)[0]
    noise_batches = token_batches(vocab, b, t, args.noise_batches, device, seed=2)
    land = gp.Landscape(model, lm_loss, [batch], mode="eval")
    res: dict = {"environment": environment(args.device), "args": vars(args), "dim": land.dim,
                 "blocks": len(land.blocks), "runs": []}
    src = noise_module.gradient_source(land, noise_batches, min_samples=1, max_samples=args.noise_batches)
    timed(lambda: next(iter(src)), device)  # warm-up: the first gradient pays for lazy initialisations
    grad_s, rows = timed(lambda: [r.clone() for r in src], device)
    replay = Replay(src, rows)
    new_api = "moments" in inspect.signature(gradient_noise.collect_noise).parameters
    lean = {"moments": False, "coordinate_variance": False} if new_api else {}
    print(json.dumps({"grad_pass_s": grad_s, "dim": land.dim, "lean_collect": new_api}), flush=True)

    real_gradient_source = noise_module.gradient_source
    for rep in range(args.repeats):
        row: dict = {}
        noise_module.gradient_source = lambda *a, **k: replay
        try:
            row["metric_replay_s"], out = timed(lambda: noise_module.noise(land, noise_data=noise_batches), device)
        finally:
            noise_module.gradient_source = real_gradient_source
        row["passes"] = out["passes"]
        row["collect_s"], stats = timed(lambda: gradient_noise.collect_noise(
            replay, land.blocks, generator=torch.Generator().manual_seed(0), device=land.device, **lean), device)
        t0 = time.perf_counter()
        noise_module.noise_tail_indices(stats.sub, partitions=16, seed=0)
        noise_module._block_tails(stats, 16, 0)
        row["tails_s"] = time.perf_counter() - t0
        del stats
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
    med = {k: float(np.median([r[k] for r in res["runs"]])) for k in res["runs"][0]}
    passes = med["passes"]
    res.update(grad_pass_s=grad_s, median=med,
               replay_over_gradients=med["metric_replay_s"] / (passes * grad_s))
    rows.clear()  # the kept samples' memory back before the real runs (replay.rows is this list)
    for _ in range(args.real):
        s, out = timed(lambda: noise_module.noise(land, noise_data=noise_batches), device)
        res.setdefault("metric_s", []).append(s)
    if args.real:
        m = float(np.median(res["metric_s"]))
        res.update(outside_s=m - passes * grad_s, metric_over_gradients=m / (passes * grad_s))
    summary = {k: res.get(k) for k in ("dim", "grad_pass_s", "replay_over_gradients", "outside_s",
                                       "metric_over_gradients")}
    print(json.dumps({**summary, "median": med}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
