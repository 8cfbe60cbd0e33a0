"""Where a default-settings probe's seconds go in a training loop (issue 16: the overhead and the time outside
HVPs under the 1.5x memory plan).

A GeometryProbe with its defaults (``spectrum``, the memory plan within 1.5x of the training step's peak) is
attached to an AdamW loop; after a few training steps it probes ``--probes`` times in a row, each probe timed
in parts, device-synchronized: the Landscape's build (the gradient with its first-order graphs, the plan's
graph measurement inside it), the HVPs (first and later ones apart: the first call of a shape may compile
kernels) and the rest. The first probe's host profile (cProfile, cumulative seconds) lists where the rest goes.
One JSON document on stdout and in ``--out``.

    python benchmarks/profile_probe.py --model gpt2-124m --dtype bf16 --out p.json    # an H200
    python benchmarks/profile_probe.py --model gpt2-tiny --dtype fp32 --device cpu    # smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import DTYPES, HVPClock, build, lm_loss, token_batches
from timing import environment, sync

import geomprobe as gp
from geomprobe.engine.landscape import Landscape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=20, help="spectrum's max_iter, so each probe is short")
    ap.add_argument("--rows", type=int, default=30, help="cProfile rows listed")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    model, vocab, b, t = build(a.model, DTYPES[a.dtype], device)
    data = token_batches(vocab, b, t, 4, device, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    probe = gp.GeometryProbe(model, lm_loss, probe_data=[data[0]], metrics={"spectrum": {"max_iter": a.max_iter}},
                             schedule=gp.every(10**9), run_dir=os.path.join(os.path.dirname(a.out or ".") or ".",
                                                                             "profile-probe-run"), force=True)
    probe.attach(opt, probe_now=False)
    for step in range(5):  # AdamW state and the training peak the plan reads
        opt.zero_grad(set_to_none=True)
        lm_loss(model, data[step % len(data)]).backward()
        opt.step()
    out: dict = {"environment": environment(device), "args": vars(a), "probes": []}
    for i in range(a.probes):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, data[0]).backward()
        opt.step()
        prof = cProfile.Profile() if i == 0 else None
        calls: list[float] = []
        with HVPClock(device) as clock:
            sync(device)
            t0 = time.perf_counter()
            last = [0.0]

            def note(_clock=clock, _calls=calls, _last=last):
                _calls.append(_clock.seconds - _last[0])
                _last[0] = _clock.seconds

            inner = Landscape.hvp  # the clock's timed call: its per-call seconds, first HVP apart

            def hvp(land, v, _inner=inner):
                r = _inner(land, v)
                note()
                return r

            Landscape.hvp = hvp
            try:
                if prof is not None:
                    prof.enable()
                probe.probe(10**6 + i)
                if prof is not None:
                    prof.disable()
            finally:
                Landscape.hvp = inner
            sync(device)
            seconds = time.perf_counter() - t0
        rec = probe.records[-1]
        row = {"seconds": seconds, "build_seconds": clock.build_seconds, "hvp_seconds": clock.seconds,
               "hvps": rec["cost"]["hvps"], "first_hvp_seconds": calls[0] if calls else None,
               "later_hvp_seconds_median": sorted(calls[1:])[len(calls[1:]) // 2] if len(calls) > 1 else None,
               "outside_seconds": seconds - clock.build_seconds - clock.seconds,
               "peak_mib": rec["cost"].get("peak_mib"), "train_peak_mib": rec["cost"].get("train_peak_mib"),
               "plan": {k: rec["cost"]["memory_plan"].get(k) for k in
                        ("micro_batch_size", "graph_budget_bytes", "basis_device", "samples_kept", "graph_source")}
               if rec["cost"].get("memory_plan") else None}
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(a.rows)
            row["cprofile_cumulative"] = s.getvalue().splitlines()[-a.rows - 3:]
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.rows)
            row["cprofile_tottime"] = s.getvalue().splitlines()[-a.rows - 3:]
        out["probes"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("cprofile")}, default=str), flush=True)
    probe.close(final_probe=False)  # a final probe would only repeat the last one (and cost a command's limit)
    text = json.dumps(out, indent=1, default=str)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
