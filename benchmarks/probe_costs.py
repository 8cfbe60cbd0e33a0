"""Where a GeometryProbe's time goes outside its HVPs and gradients (issue 16), measured on the CPU as shares.

For one model, one ``GeometryProbe.probe()`` per metric alone and one with the full set (``--metrics``), each
on a fresh probe after one AdamW step (so ``precond`` has optimizer state). Per metric: seconds, seconds inside
``Landscape.hvp`` (wrapped as ``scale.py``'s HVPClock does), gradient seconds (per-example and minibatch
gradients of ``noise``/``isotropy``, full gradients), forward seconds (losses at other parameters, first-order
graph builds outside an HVP) and the rest. Per probe: the Landscape's build (its first-order graphs, the
memory plan and the plan's measuring forward, also shown alone), warm-start bookkeeping, the run log's
writing, and the record building left over. Timers do not nest: time inside an HVP is the HVP's, whatever
runs inside it. With ``--profile`` a second, cProfile'd probe attributes "the rest" to functions (the
profiler is switched off inside HVPs and gradients, so only the probe's own work is listed).
``--probes 2`` runs a second probe on the same GeometryProbe (after another step): what a probe in a
training loop pays once a previous probe exists (warm starts, the plan's measured graph size).

    python benchmarks/probe_costs.py --model gpt2-tiny --out r.json
    python benchmarks/probe_costs.py --model gpt2-mid --metrics spectrum,trace --profile
    python benchmarks/probe_costs.py --model mlp-10m --metrics spectrum --probes 2

Prints one JSON line (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from typing import Self

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import FULL, MLP, build, lm_loss, token_batches
from timing import environment

import geomprobe as gp
from geomprobe.engine import persample
from geomprobe.engine.landscape import Landscape
from geomprobe.probe import geometry_probe as gp_module
from geomprobe.probe import warm_start

# the categories that are the measurement itself; everything else is the probe's own overhead
WORK = ("hvp", "grad", "forward")
NESTED = ("plan_forward",)


class Clocks:
    """Exclusive timers patched onto the library: the outermost timed call owns the time (an HVP that rebuilds
    a graph is HVP time, not forward time). ``profiler``: switched off inside the WORK categories."""

    def __init__(self, profiler: cProfile.Profile | None = None):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.active: str | None = None
        self.profiler = profiler
        self._undo: list = []

    def _enter(self, cat: str) -> tuple[bool, float]:
        if cat in NESTED:  # a part of the Landscape's build, shown apart as well
            return True, time.perf_counter()
        if self.active is not None:
            return False, 0.0
        self.active = cat
        if self.profiler is not None and cat in WORK:
            self.profiler.disable()
        return True, time.perf_counter()

    def _exit(self, cat: str, owner: bool, t0: float) -> None:
        if not owner:
            return
        self.seconds[cat] = self.seconds.get(cat, 0.0) + time.perf_counter() - t0
        self.calls[cat] = self.calls.get(cat, 0) + 1
        if cat in NESTED:
            return
        self.active = None
        if self.profiler is not None and cat in WORK:
            self.profiler.enable()

    def wrap(self, owner_obj, attr: str, cat: str) -> None:
        orig = getattr(owner_obj, attr)
        clocks = self

        def timed(*a, **k):
            owner, t0 = clocks._enter(cat)
            try:
                return orig(*a, **k)
            finally:
                clocks._exit(cat, owner, t0)

        setattr(owner_obj, attr, timed)
        self._undo.append((owner_obj, attr, orig))

    def wrap_iter(self, cls, cat: str) -> None:
        """Time each ``next()`` of ``cls.__iter__`` (a gradient per step), not the consumer's work between."""
        orig = cls.__iter__
        clocks = self

        def timed_iter(obj):
            it = orig(obj)
            while True:
                owner, t0 = clocks._enter(cat)
                try:
                    row = next(it)
                except StopIteration:
                    clocks._exit(cat, owner, t0)
                    return
                clocks._exit(cat, owner, t0)
                yield row

        cls.__iter__ = timed_iter
        self._undo.append((cls, "__iter__", orig))

    def __enter__(self) -> Self:
        self.wrap(Landscape, "hvp", "hvp")
        self.wrap(Landscape, "_full_grad", "grad")
        self.wrap(persample.PerExampleGradients, "_chunk", "grad")
        self.wrap_iter(persample.MinibatchGradients, "grad")
        self.wrap(Landscape, "loss_on", "forward")  # outside an HVP or gradient: forward passes of a metric
        self.wrap(Landscape, "_measure_graph_per_sample", "plan_forward")
        self.wrap(Landscape, "__init__", "landscape")
        self.wrap(warm_start.WarmStart, "start", "warm_start")
        self.wrap(warm_start.WarmStart, "keep", "warm_start")
        self.wrap(gp_module, "write_pending", "record_write")
        return self

    def __exit__(self, *exc) -> None:
        for obj, attr, orig in reversed(self._undo):
            setattr(obj, attr, orig)
        self._undo.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def case(name: str, noise_batches: int):
    """(model, loss_fn, probe batch, noise batches) for a named CPU case."""
    if name == "mlp-10m":
        torch.manual_seed(0)
        model = MLP()
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g))
        ce = torch.nn.CrossEntropyLoss()

        def loss_fn(model, b):
            return ce(model(b[0]), b[1])

        noise = [(torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g))
                 for _ in range(noise_batches)]
        return model, loss_fn, batch, noise
    model, vocab, b, t = build(name, torch.float32, "cpu")
    return model, lm_loss, token_batches(vocab, b, t, 1, "cpu", seed=1)[0], token_batches(vocab, b, t, noise_batches, "cpu", seed=2)


def _profile_rows(profiler: cProfile.Profile, top: int) -> list[dict]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({fn})",
                     "calls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: -r["tottime"])
    return rows[:top]


def measure(name: str, metrics: tuple[str, ...], noise_batches: int, probes: int, profile: int, tmp: str) -> dict:
    """One fresh GeometryProbe with ``metrics``, ``probes`` probes (each after one AdamW step), timed apart."""
    model, loss_fn, batch, noise = case(name, noise_batches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    probe = gp.GeometryProbe(model, loss_fn, probe_data=[batch], metrics=list(metrics), noise_data=noise,
                             schedule=gp.every(10**9), run_dir=os.path.join(tmp, "run-" + "+".join(metrics)), force=True)
    probe.attach(opt, probe_now=False)
    per_metric: dict[str, dict] = {}
    run_metric = probe._run_metric

    def timed_metric(mname, land, opts):
        before, t0 = clocks.snapshot(), time.perf_counter()
        out = run_metric(mname, land, opts)
        spent = time.perf_counter() - t0
        after = clocks.snapshot()
        m = {"seconds": spent, "hvps": out.get("hvps")}
        for cat in WORK:
            m[f"{cat}_seconds"] = after.get(cat, 0.0) - before.get(cat, 0.0)
        m["rest_seconds"] = spent - sum(m[f"{c}_seconds"] for c in WORK)
        m["rest_share"] = m["rest_seconds"] / spent if spent > 0 else None
        per_metric[mname] = m
        return out

    probe._run_metric = timed_metric
    results = []
    for k in range(probes):
        train_step()
        per_metric = {}
        profiler = cProfile.Profile() if profile and k == probes - 1 else None
        with Clocks() as clocks:
            t0 = time.perf_counter()
            record = probe.probe(k + 1)
            total = time.perf_counter() - t0
        s = clocks.seconds
        metric_seconds = sum(m["seconds"] for m in per_metric.values())
        work = sum(s.get(c, 0.0) for c in WORK)
        landscape = s.get("landscape", 0.0)
        res = {
            "probe": k + 1, "seconds": total, "hvps": record["cost"]["hvps"],
            "hvp_seconds": s.get("hvp", 0.0), "grad_seconds": s.get("grad", 0.0), "forward_seconds": s.get("forward", 0.0),
            "outside_seconds": total - work - landscape, "outside_share": (total - work - landscape) / total,
            # the Landscape's first-order graph build is a gradient too: the share with it counted as overhead
            "outside_share_with_build": (total - work) / total,
            "probe_level": {
                "landscape_build": landscape,
                "plan_measuring_forward": s.get("plan_forward", 0.0),
                "warm_start": s.get("warm_start", 0.0),
                "record_write": s.get("record_write", 0.0),
                "record_building_rest": total - landscape - metric_seconds - s.get("record_write", 0.0),
            },
            "metrics": per_metric, "errors": record.get("errors"),
        }
        if profiler is not None:  # a second, profiled probe at the same parameters: the rest by function
            per_metric = {}
            with Clocks(profiler) as clocks:
                profiler.enable()
                probe.probe(k + 1)
                profiler.disable()
            res["profile_rest_top"] = _profile_rows(profiler, profile)
        results.append(res)
    probe.close(final_probe=False)
    return {"metrics": list(metrics), "params": sum(p.numel() for p in model.parameters()), "probes": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-tiny", help="gpt2-tiny, gpt2-mid, mlp-10m (or any scale.py case)")
    ap.add_argument("--metrics", default="full", help="'full' or a comma-separated list; each alone, then together")
    ap.add_argument("--no-alone", action="store_true", help="only the set together")
    ap.add_argument("--noise-batches", type=int, default=64)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="list this many functions of the rest (cProfile)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    metrics = FULL if args.metrics == "full" else tuple(args.metrics.split(","))
    runs = [] if args.no_alone or len(metrics) == 1 else [(m,) for m in metrics]
    runs.append(metrics)
    doc = {"environment": environment("cpu"), "model": args.model, "args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for ms in runs:
            doc["runs"].append(measure(args.model, ms, args.noise_batches, args.probes, args.profile, tmp))
    line = json.dumps(doc, default=str)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
