"""Scale: every named statistic on 100M-1B-parameter language models on one GPU (issue 16).

Random-init Hugging Face models built from configs (no downloads): GPT-2 124M and 355M (8 x 512 tokens),
a Llama-style 1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 32000, MLP 8192; 4 x 512), in fp32 and
bf16 weights; and a 10M-parameter MLP on the CPU. Per model and dtype, measured side by side in one process:

* gradient and HVP seconds (median of repeats) and their ratio;
* the AdamW training step's seconds and peak memory (everything resident: weights, gradients, optimizer state);
* one GeometryProbe probe with the chosen metric set under default settings (the probe's own memory plan):
  its seconds and peak memory, the peak over the training step's, and per metric the HVPs, seconds, seconds
  inside HVPs and the rest (``outside``: the probe's own work; the ``noise`` metric's time goes to gradients,
  which are counted apart).

``trajectory`` trains GPT-2 with AdamW and probes ``spectrum`` along the way, cold and warm (from the previous
probe's Ritz vectors moved on along their last step, and with the plain start of earlier versions unless
``--no-plain``) at each probe point, and ``overhead`` measures the probe's overhead on training wall time at the
default schedule.

    python benchmarks/scale.py models --models gpt2-124m --dtypes fp32,bf16 --metrics full --out r.json
    python benchmarks/scale.py models --models gpt2-tiny --device cpu --metrics full      # smoke run
    python benchmarks/scale.py trajectory --model gpt2-124m --steps 400 --every 40 --which largest --out t.json
    python benchmarks/scale.py trajectory --model gpt2-tiny --device cpu --dtypes fp32 --steps 20 --every 1 --risk none
    python benchmarks/scale.py overhead --model gpt2-124m --dtypes bf16 --steps 4000 --out o.json
    python benchmarks/scale.py overhead --model gpt2-tiny --device cpu --dtypes fp32 --steps 3000   # smoke run

``overhead`` reports each probe that ran in the loop with its predicted and measured seconds, the skips, the
training seconds and the overhead; the default schedule's budget defers the first probe until its predicted
cost fits in 5 % of the training time so far (a few thousand GPT-2 124M steps).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_history import MemoryHistory  # noqa: E402
from scale_setup import (  # noqa: E402,F401  (re-exported: other benchmarks import them from here)
    DTYPES,
    FULL,
    MLP,
    CallTimers,
    HVPClock,
    build,
    hvp_clock_lines,
    lm_loss,
    median_time,
    peak_of,
    profile_rows_of,
    span_gaps,
    stream_sync,
    token_batches,
)
from timing import environment, strict_fp32, sync  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe.engine.landscape import Landscape  # noqa: E402
from geomprobe.linalg.pinned_blocks import ahead_stats  # noqa: E402
from geomprobe.linalg.pinned_memory import pool_stats  # noqa: E402


def pinned_counts(before: dict | None = None) -> dict:
    """Page-locked memory work so far (the exact-size pool's blocks mapped and reused, the blocks allocated ahead
    and their seconds), or since ``before``."""
    now = {**{f"pool_{k}": v for k, v in pool_stats().items() if isinstance(v, (int, float))},
           **{f"ahead_{k}": v for k, v in ahead_stats().items()}}
    return now if before is None else {k: v - before.get(k, 0) for k, v in now.items()}


def measure_model(name: str, dtype_name: str, metrics: tuple[str, ...], device, out_dir: str,
                  noise_batches: int, peak_ratio: float = 1.5, metric_options: dict | None = None,
                  profile_rows: int = 0, repeat: int = 1, memory_history: bool = False,
                  time_calls: Sequence[str] = ()) -> dict:
    """One model's figures (module docstring) from one probe; with ``repeat`` > 1, that many probes in the same
    process, a training step before each later one (the steady state of a probe in a loop: page-locked memory
    cached, spectrum warm-started), each later probe summarized in ``res["later_probes"]``."""
    dtype = DTYPES[dtype_name]
    if name == "mlp-10m":
        with torch.random.fork_rng(devices=[]):  # fixed weights: runs of two versions take the same steps
            torch.manual_seed(0)
            model = MLP().to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(256, 784, generator=g).to(device, dtype), torch.randint(0, 10, (256,), generator=g).to(device))
        ce = torch.nn.CrossEntropyLoss()

        def loss_fn(model, b):
            return ce(model(b[0]), b[1])

        noise = [(torch.randn(256, 784, generator=g).to(device, dtype), torch.randint(0, 10, (256,), generator=g).to(device))
                 for _ in range(noise_batches)]
    else:
        model, vocab, b, t = build(name, dtype, device)
        batch = token_batches(vocab, b, t, 1, device, seed=1)[0]
        noise = token_batches(vocab, b, t, noise_batches, device, seed=2)
        loss_fn = lm_loss
    d = sum(p.numel() for p in model.parameters())
    cuda = torch.device(device).type == "cuda"
    res: dict = {"allocated_at_start_bytes": torch.cuda.memory_allocated() if cuda else None, "model": name, "dtype": dtype_name, "params": d, "peak_ratio": peak_ratio, "batch": list(batch["input_ids"].shape if isinstance(batch, dict) else batch[0].shape)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    train_step()  # AdamW state exists from here on, as in a training loop
    res["train_step_s"] = median_time(train_step, device, repeats=3)
    _, res["train_peak_bytes"] = peak_of(train_step, device)
    opt.zero_grad(set_to_none=True)

    def grad():
        torch.autograd.grad(loss_fn(model, batch), params)

    res["grad_s"] = median_time(grad, device)
    # the product alone: no Lanczos runs here, so the plan holds no basis (it warned of a 301-vector one)
    land = Landscape(model, loss_fn, [batch], mode="eval", memory=gp.engine.memory_plan.MemoryBudget(basis_vectors=0))
    v = torch.randn(land.dim, generator=torch.Generator(device=land.device).manual_seed(0) if land.device.type == "cuda"
                    else torch.Generator().manual_seed(0), device=land.device, dtype=land.dtype)
    res["hvp_s"] = median_time(lambda: land.hvp(v), device)
    res["hvp_over_grad"] = res["hvp_s"] / res["grad_s"]
    land.close()
    del land, v
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()

    run_dir = os.path.join(out_dir, f"run-{name}-{dtype_name}")
    chosen = {m: dict((metric_options or {}).get(m, {})) for m in metrics}
    probe = gp.GeometryProbe(model, loss_fn, probe_data=[batch], metrics=chosen, noise_data=noise,
                             schedule=gp.every(10**9), run_dir=run_dir, force=True,
                             peak_ratio=peak_ratio, progress=hvp_clock_lines(time.perf_counter()))
    probe.attach(opt, probe_now=False)
    per_metric: dict[str, dict] = {}
    run_metric = probe._run_metric

    def timed_metric(mname, land, opts):
        if not per_metric and land.plan is not None:  # the plan before any HVP: a killed case still says it
            keys = ("vectors", "basis_device", "max_basis", "micro_batch_size", "samples_kept", "chunk_size",
                    "budget_bytes", "peak_bytes")
            print(json.dumps({"plan": {k: getattr(land.plan, k, None) for k in keys},
                              "attention": land.plan.attention}, default=str), flush=True)
        sync(device)
        h0, c0, b0, t0 = clock.seconds, clock.calls, clock.build_seconds, time.perf_counter()
        out = run_metric(mname, land, opts)
        sync(device)
        per_metric[mname] = {"seconds": time.perf_counter() - t0, "hvp_seconds": clock.seconds - h0,
                             "build_seconds": clock.build_seconds - b0,
                             "hvp_calls": clock.calls - c0, "hvps": out.get("hvps"),
                             "shared_hvps": out.get("shared_hvps")}
        # one line per finished metric, so a run stopped by a time limit still says where its time went
        print(json.dumps({"metric": mname, **per_metric[mname]}, default=str), flush=True)
        return out

    probe._run_metric = timed_metric
    if cuda:
        # no collection here: what the HVP timing's Landscape left allocated is what a user's loop would carry
        res["allocated_before_probe_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    train_step()  # the interval a probe in a loop reads the training peak from (it plans within 1.5x of it)
    prof = cProfile.Profile() if profile_rows else None
    history = MemoryHistory(device) if memory_history and cuda and repeat == 1 else contextlib.nullcontext()
    with HVPClock(device) as clock, history, CallTimers(time_calls) as timers:
        if prof is not None:
            prof.enable()
        pinned = pinned_counts()
        t_start = time.perf_counter()
        seconds, _ = peak_of(lambda: probe.probe(1), device, reset=False)
        t_end = time.perf_counter()
        if prof is not None:
            prof.disable()
    res["pinned"] = pinned_counts(pinned)
    res["gaps_ms"] = span_gaps(clock.spans, t_start, t_end)
    res["calls_ms"] = timers.report()
    if isinstance(history, MemoryHistory):
        res["memory_at_peak"] = history.summary()
    if prof is not None:  # HVPs synchronize at both ends (HVPClock): what is left is the probe's own work
        res["profile"] = profile_rows_of(prof, profile_rows)
    record = probe.records[-1]
    peak = int(record["cost"]["peak_mib"] * 2**20) if record["cost"].get("peak_mib") else 0  # the probe's own
    for mname, m in per_metric.items():
        # outside HVPs and gradients: a graph (re)build inside the metric is a gradient
        m["outside_seconds"] = m["seconds"] - m["hvp_seconds"] - m["build_seconds"]
        m["outside_share"] = m["outside_seconds"] / m["seconds"] if m["seconds"] > 0 else None
        m["converged"] = record.get(mname, {}).get("converged") if isinstance(record.get(mname), dict) else None
    res.update(
        probe_seconds=seconds, probe_peak_bytes=peak,
        probe_over_train_peak=peak / res["train_peak_bytes"] if res["train_peak_bytes"] else None,
        # a copy of the metrics: later probes (--repeat) refill per_metric
        probe_hvps=record["cost"]["hvps"], probe_hvp_seconds=clock.seconds, metrics=dict(per_metric),
        errors=record.get("errors"), cost=record["cost"], train_peak_read_by_probe_mib=record["cost"].get("train_peak_mib"),
        spectrum={k: record["spectrum"].get(k) for k in ("lambda_max", "lambda_max_err", "lambda_min",
                                                          "lambda_min_err", "converged", "hvps", "steps",
                                                          "reorthogonalizations", "reorth_regime",
                                                          "hvp_asymmetry")}
        if isinstance(record.get("spectrum"), dict) else None,
    )
    grad_like = per_metric.get("noise", {}).get("seconds", 0.0)  # gradients, not the probe's own work
    total_hvp_grad = clock.seconds + grad_like + clock.build_seconds
    res["build_seconds"] = clock.build_seconds
    res["outside_share"] = (seconds - total_hvp_grad) / seconds if seconds > 0 else None
    res["outside_share_counting_builds"] = (seconds - clock.seconds - grad_like) / seconds if seconds > 0 else None
    res["later_probes"] = []
    for i in range(1, repeat):
        train_step()  # new parameters, as along a trajectory; the probe warm-starts from the last one's vectors
        per_metric.clear()
        last_prof = cProfile.Profile() if profile_rows and i == repeat - 1 else None  # the steady probe's costs
        history = MemoryHistory(device) if memory_history and cuda and i == repeat - 1 else contextlib.nullcontext()
        with HVPClock(device) as clock, history, CallTimers(time_calls) as timers:
            if last_prof is not None:
                last_prof.enable()
            pinned = pinned_counts()
            t_start = time.perf_counter()
            seconds, _ = peak_of(lambda: probe.probe(1 + i), device, reset=False)
            t_end = time.perf_counter()
            if last_prof is not None:
                last_prof.disable()
        pinned = pinned_counts(pinned)
        if isinstance(history, MemoryHistory):
            res["memory_at_peak"] = history.summary()
        if last_prof is not None:
            res["later_profile"] = profile_rows_of(last_prof, profile_rows)
        record = probe.records[-1]
        later = {"probe_seconds": seconds, "probe_hvps": record["cost"]["hvps"], "probe_hvp_seconds": clock.seconds,
                 "peak_mib": record["cost"].get("peak_mib"), "errors": record.get("errors"), "metrics": {},
                 "pinned": pinned, "gaps_ms": span_gaps(clock.spans, t_start, t_end),
                 "calls_ms": timers.report()}
        for mname, m in per_metric.items():
            out = m["seconds"] - m["hvp_seconds"] - m["build_seconds"]
            later["metrics"][mname] = {**m, "outside_seconds": out,
                                       "outside_share": out / m["seconds"] if m["seconds"] > 0 else None}
        if isinstance(record.get("spectrum"), dict):
            later["spectrum"] = {k: record["spectrum"].get(k) for k in ("lambda_max", "converged", "hvps", "steps",
                                                                        "reorth_regime")}
        print(json.dumps({"later_probe": i, **later}, default=str), flush=True)
        res["later_probes"].append(later)
    probe.close()
    del probe, opt, model
    return res


# ---------------------------------------------------------------------------------------------- trajectory
def trajectory(name: str, dtype_name: str, steps: int, every: int, device, out_dir: str, tol: float,
               which: str = "both", risk: float | None = 1e-2, plain: bool = True, first: int = 0) -> dict:
    """Spectrum cold and warm at each probe point of an AdamW run from step ``first`` on (the steps before it train
    without probes: a later stretch of the trajectory; ``risk``: the extremes' certificate, None
    for residual bounds only; the warm start is forced, whatever WarmStart's policy would choose). ``warm``
    is the default start (the kept Ritz vectors moved on along their last step by the fitted gains),
    ``plain`` (unless ``plain=False``) the start of earlier versions, ``WarmStart(extrapolate=False)``, from
    its own kept vectors. ``missed``: probes where a start's extreme lies inside the cold run's (by more than
    its bound and rounding): the cold run found an eigenvalue that the warm one did not."""
    from geomprobe.linalg.vectors import default_generator
    from geomprobe.metrics.spectrum import spectrum
    from geomprobe.probe.warm_start import WarmStart

    dtype = DTYPES[dtype_name]
    model, vocab, b, t = build(name, dtype, device)
    data = token_batches(vocab, b, t, 64, device, seed=3)
    probe_batch = token_batches(vocab, b, t, 1, device, seed=1)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    points = []
    # measure the warm starts themselves, also where the probe's policy would start cold
    starts = {"warm": WarmStart(certified=True)}
    if plain:
        starts["plain"] = WarmStart(certified=True, extrapolate=False)
    rounding = 16 * torch.finfo(torch.float32 if dtype.itemsize < 4 else dtype).eps

    def missed(run: dict, cold: dict) -> int:  # at the requested end(s) only: the other is not converged
        slack = rounding * max(abs(cold["lambda_max"]), abs(cold["lambda_min"]))
        top = which != "smallest" and cold["lambda_max"] - run["lambda_max"] > run["lambda_max_err"] + slack
        bottom = which != "largest" and run["lambda_min"] - cold["lambda_min"] > run["lambda_min_err"] + slack
        return int(top) + int(bottom)

    for step in range(steps + 1):
        if step >= first and (step - first) % every == 0:
            land = Landscape(model, lm_loss, [probe_batch], mode="eval")
            runs, hvps = {}, {}
            for i, (key, ws) in enumerate(starts.items()):  # the first probe: cold, then warm
                h0 = land.hvps
                # a seed of its own for each: a first (cold) run must not be the other's cached run, which
                # would leave this start without vectors
                runs[key] = spectrum(land, tol=tol, seed=step + 500_000 * i, warm=ws, which=which, risk=risk)
                hvps[key] = land.hvps - h0
            h0 = land.hvps
            cold = spectrum(land, tol=tol, generator=default_generator(10**6 + step), which=which, risk=risk)
            cold_hvps = land.hvps - h0
            land.close()
            warm = runs["warm"]
            point = {"step": step, "warm_started": warm.get("warm"), "warm_hvps": hvps["warm"], "cold_hvps": cold_hvps,
                     "lambda_max": cold["lambda_max"], "lambda_max_err": cold["lambda_max_err"],
                     "warm_lambda_max": warm["lambda_max"], "warm_lambda_max_err": warm["lambda_max_err"],
                     "lambda_min": cold["lambda_min"], "lambda_min_err": cold["lambda_min_err"],
                     "warm_lambda_min": warm["lambda_min"], "warm_lambda_min_err": warm["lambda_min_err"],
                     "cold_converged": cold["converged"], "warm_converged": warm["converged"],
                     "warm_missed": missed(warm, cold), "gains": dict(starts["warm"].gain)}
            if plain:
                point.update(plain_hvps=hvps["plain"], plain_converged=runs["plain"]["converged"],
                             plain_missed=missed(runs["plain"], cold))
            points.append(point)
            print(json.dumps(points[-1]), flush=True)
        if step < steps:
            opt.zero_grad(set_to_none=True)
            lm_loss(model, data[step % len(data)]).backward()
            opt.step()
    warm_pts = [p for p in points if p["warm_started"]]
    n = max(len(warm_pts), 1)
    summary = {"probes": len(warm_pts),
               "cold_mean_hvps": sum(p["cold_hvps"] for p in warm_pts) / n,
               "warm_mean_hvps": sum(p["warm_hvps"] for p in warm_pts) / n,
               "warm_missed": sum(p["warm_missed"] for p in points)}
    summary["ratio"] = summary["cold_mean_hvps"] / summary["warm_mean_hvps"] if summary["warm_mean_hvps"] else None
    if plain:
        summary["plain_mean_hvps"] = sum(p["plain_hvps"] for p in warm_pts) / n
        summary["plain_ratio"] = (summary["cold_mean_hvps"] / summary["plain_mean_hvps"]
                                  if summary["plain_mean_hvps"] else None)
        summary["plain_missed"] = sum(p["plain_missed"] for p in points)
    print(json.dumps(summary), flush=True)
    return {"model": name, "dtype": dtype_name, "tol": tol, "which": which, "risk": risk, "points": points,
            "summary": summary}


WARMUP_STEPS = 50  # untimed steps before the loop without the probe (the probed loop's are in its long run)
MARK_EVERY = 500  # steps between the overhead loops' synchronized time marks


def overhead(name: str, dtype_name: str, steps: int, device, out_dir: str, metrics: list[str] | None = None,
             baseline: bool = True, baseline_steps: int | None = None) -> dict:
    """Training wall time with and without a GeometryProbe at its default schedule (``every(100) |
    budget(0.05)``) and default metrics unless ``metrics`` (``"spectrum:max_iter=40"`` forms) are given.

    Reports the probes that ran inside the training loop, each with its step, the seconds the probe predicted
    before it ran (``cost.predicted_seconds``: the plan in gradients times the timed training step,
    ``geomprobe/probe/probe_cost.py``) and the seconds it took; the skips; the training seconds (the loop's wall
    time less the probe seconds in it, and the loop without a probe when ``baseline``); the overhead of the loop
    with the probe over the loop without, and apart from it the final probe ``close()`` runs after the loop.
    The data are 64 token batches cycled, so any number of steps runs in constant memory. ``baseline_steps``:
    a shorter loop without the probe (the overhead then compares seconds per step), since a budget lets the
    first probe in only after ~20x its cost of training, so the loop with the probe must be long; it runs once
    before and once after the loop with the probe, and the baseline is their mean pace. Each loop also reports
    its pace per ``MARK_EVERY`` steps (``ms_per_step_by_interval``).
    """
    out: dict = {"model": name, "dtype": dtype_name, "steps": steps, "metrics": metrics or "default"}
    # the loop without the probe runs before and after the one with it: a GPU's clocks drift over a long run
    # (round31: the probed loop ran its steps 9 % slower than the short loop before it, before its first
    # probe, with a hook measured at 0.03 ms a step), so the two short loops bracket the long one
    for attached, key in ((False, "without"), (True, "with_probe"), (False, "without_after")) if baseline else (
            (True, "with_probe"),):
        dtype = DTYPES[dtype_name]
        model, vocab, b, t = build(name, dtype, device)
        data = token_batches(vocab, b, t, 64, device, seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        n_steps = steps if attached or not baseline_steps else int(baseline_steps)

        def train_step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            lm_loss(model, data[i % len(data)]).backward()
            opt.step()

        # both loops start warm: the first steps (the allocator's growth, the kernels' first launches) took ~2.4 s,
        # which over a 400-step baseline made its steps 36.7 ms against the probed loop's 30.8 and the overhead
        # negative (results/overhead_gpt2_124m_bf16_12k_r25_h200.json); the probe is attached after them
        for step in range(WARMUP_STEPS):
            train_step(step)
        probe = None
        if attached:
            options = {"metrics": metrics} if metrics else {}
            probe = gp.GeometryProbe(model, lm_loss, probe_data=[data[0]], run_dir=os.path.join(out_dir, "overhead"),
                                     force=True, **options)
            probe.attach(opt)
        sync(device)
        t0 = time.perf_counter()
        marks = [(0, 0.0)]  # (step, seconds): the steps' pace along the loop, synchronized every MARK_EVERY steps
        for step in range(n_steps):
            train_step(step)
            if (step + 1) % MARK_EVERY == 0:
                sync(device)
                marks.append((step + 1, time.perf_counter() - t0))
            if probe is not None and probe.records and probe.records[-1]["step"] == step + 1:
                r = probe.records[-1]
                print(f"probe at step {r['step']}: predicted {r['cost']['predicted_seconds']} s, "
                      f"took {r['cost']['seconds']:.2f} s ({r['cost']['hvps']} HVPs, "
                      f"{r['cost'].get('one_time_seconds', 0.0):.2f} s compiling, cut: {r['cost'].get('cut')})",
                      flush=True)
        sync(device)
        wall = time.perf_counter() - t0
        out[key] = {"wall_s": wall, "steps": n_steps,
                    "ms_per_step_by_interval": [[b, round(1e3 * (tb - ta) / (b - a), 3)]
                                                for (a, ta), (b, tb) in zip(marks, marks[1:])]}
        if probe is not None:
            ran = [{"step": r["step"], "predicted_seconds": r["cost"]["predicted_seconds"],
                    "seconds": r["cost"]["seconds"], "hvps": r["cost"]["hvps"], "wall_s": r["wall"],
                    "one_time_seconds": r["cost"].get("one_time_seconds", 0.0), "cut": r["cost"].get("cut")}
                   for r in probe.records]
            probe_s = sum(r["seconds"] for r in ran)
            out[key].update(probes=len(ran), probe_seconds=probe_s, training_seconds=wall - probe_s,
                            probe_share=probe_s / wall if wall > 0 else None, per_probe=ran,
                            skips=probe.skips.to_dict(), prediction=probe.probe_cost.to_dict())
            before = len(probe.records)
            t1 = time.perf_counter()
            probe.close()
            sync(device)
            final = probe.records[before:]
            out[key]["close"] = {"seconds": time.perf_counter() - t1,
                                 "final_probe": ({"step": final[0]["step"],
                                                  "predicted_seconds": final[0]["cost"]["predicted_seconds"],
                                                  "seconds": final[0]["cost"]["seconds"],
                                                  "hvps": final[0]["cost"]["hvps"]} if final else None)}
        del model, opt, probe
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    w = out["with_probe"]
    if baseline:
        # the loops without the probe, per step: before and after the long loop with it
        per_step = (out["without"]["wall_s"] + out["without_after"]["wall_s"]) / (
            out["without"]["steps"] + out["without_after"]["steps"])
        out["ms_per_step_without"] = [1e3 * out[k]["wall_s"] / out[k]["steps"] for k in ("without", "without_after")]
        out["training_seconds"] = per_step * steps
        out["overhead"] = w["wall_s"] / out["training_seconds"] - 1
        out["overhead_with_close"] = (w["wall_s"] + w["close"]["seconds"]) / out["training_seconds"] - 1
    else:
        out["training_seconds"] = w["training_seconds"]
    # the budget's own measure: probe seconds over the loop's wall time (what budget(0.05) bounds)
    out["probe_share"] = w["probe_share"]
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["models", "trajectory", "overhead"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="gpt2-124m")
    ap.add_argument("--cases", default=None, help="name:dtype[:m1+m2...[:peak_ratio]],...; overrides --models/--dtypes")
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--metrics", default="full", help="'full' or a comma-separated list")
    ap.add_argument("--noise-batches", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--first", type=int, default=0, help="trajectory: the first probed step (train before it)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--which", default="both", choices=["both", "largest", "smallest"], help="trajectory: the ends")
    ap.add_argument("--metric-options", default=None,
                    help='models: JSON of options per metric, e.g. \'{"spectrum": {"max_iter": 40}}\'')
    ap.add_argument("--probe-metrics", default=None,
                    help="overhead: the probe's metrics, comma-separated ('spectrum:max_iter=40'); default: its defaults")
    ap.add_argument("--no-baseline", action="store_true", help="overhead: skip the run without a probe")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="overhead: steps of the loop without a probe (default: --steps)")
    ap.add_argument("--risk", default="1e-2", help="trajectory: the certificate's risk, or 'none' (residual bounds)")
    ap.add_argument("--no-plain", action="store_true",
                    help="trajectory: skip the plain warm start of earlier versions (WarmStart(extrapolate=False))")
    ap.add_argument("--profile", type=int, default=0, help="models: list this many cProfile rows of the probe")
    ap.add_argument("--repeat", type=int, default=1,
                    help="models: probes per model in one process, a training step before each later one")
    ap.add_argument("--pin", default="on", choices=["on", "off"],
                    help="an offloaded Lanczos basis in page-locked (on, the default) or pageable (off) host memory")
    ap.add_argument("--prefetch", default="auto", choices=["auto", "on", "off"],
                    help="whether a host basis faults in its next row beside the product (auto: where a core is free)")
    ap.add_argument("--working", default="plan", choices=["plan", "host", "device", "streamed"],
                    help="host-vector plans: Lanczos' working vectors on the host, or on the device with the basis in "
                         "host memory (lean); plan: as the memory plan decides")
    ap.add_argument("--memory-history", action="store_true",
                    help="models: what is live at the last probe's peak, by where it was allocated (CUDA)")
    ap.add_argument("--time-calls", default="", metavar="MODULE:ATTR,...",
                    help="models: host seconds and calls of these geomprobe functions in each probe, e.g. "
                         "linalg.lanczos:start_basis,linalg.sketched_gram:SketchedGram.measure")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=JSON",
                    help="set a geomprobe module constant before running (A/B runs), e.g. "
                         "linalg.sketched_gram.POOLED=false")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for item in args.set:
        where, value = item.split("=", 1)
        mod, name = where.rsplit(".", 1)
        setattr(importlib.import_module(f"geomprobe.{mod}"), name, json.loads(value))
    if args.working != "plan":
        plan_memory = gp.engine.landscape_plan.plan_memory

        def with_working(**kw):
            return plan_memory(**{**kw, "overrides": {**(kw.get("overrides") or {}),
                                                      "working_vectors": (args.working, "benchmark")}})

        gp.engine.landscape_plan.plan_memory = with_working
    strict_fp32()
    gp.linalg.host_blocks.PREFETCH = {"auto": None, "on": True, "off": False}[args.prefetch]
    gp.linalg.krylov_basis.LanczosBasis.PIN = args.pin == "on"
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
    doc = {"environment": environment(args.device), "args": vars(args), "results": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=2, default=str)

    metrics = FULL if args.metrics == "full" else tuple(args.metrics.split(","))
    if args.what == "models":
        # --cases name:dtype[:metric+metric...], or every --models x --dtypes pair with --metrics
        cases = [c.split(":") for c in args.cases.split(",")] if args.cases else [
            [n, dt] for n in args.models.split(",") for dt in args.dtypes.split(",")]
        for case in cases:
            name, dt = case[0], case[1]
            metrics = tuple(case[2].split("+")) if len(case) > 2 else metrics
            ratio = float(case[3]) if len(case) > 3 else gp.engine.memory_plan.DEFAULT_PEAK_RATIO
            if True:
                try:
                    r = measure_model(name, dt, metrics, args.device, out_dir, args.noise_batches, ratio,
                                      json.loads(args.metric_options) if args.metric_options else None,
                                      profile_rows=args.profile, repeat=args.repeat,
                                      memory_history=args.memory_history,
                                      time_calls=[c for c in args.time_calls.split(",") if c])
                except Exception as e:  # keep the other models' figures
                    r = {"model": name, "dtype": dt, "failed": f"{type(e).__name__}: {e}",
                         "trace": traceback.format_exc()[-2000:]}
                doc["results"].append(r)
                save()
                brief = {k: r.get(k) for k in ("model", "dtype", "params", "peak_ratio", "hvp_over_grad", "probe_seconds",
                                                "probe_over_train_peak", "outside_share", "probe_hvps", "failed")}
                print(json.dumps(brief, default=str), flush=True)
                gc.collect()  # the next case starts from nothing, whatever this one left behind
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()
    elif args.what == "trajectory":
        doc["results"].append(trajectory(args.model, args.dtypes.split(",")[0], args.steps, args.every, args.device,
                                         out_dir, args.tol, args.which,
                                         None if args.risk == "none" else float(args.risk), plain=not args.no_plain,
                                         first=args.first))
    else:
        doc["results"].append(overhead(args.model, args.dtypes.split(",")[0], args.steps, args.device, out_dir,
                                       args.probe_metrics.split(",") if args.probe_metrics else None,
                                       baseline=not args.no_baseline, baseline_steps=args.baseline_steps))
    save()
    print(json.dumps(doc["results"], default=str)[-3000:])


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
