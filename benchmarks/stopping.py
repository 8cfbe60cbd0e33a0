"""diagshare and density with and without stopping at ``rel_tol``: HVPs, seconds and interval widths (issue 16).
(rmed stopped in rounds on a branch that was not kept: its results/stopping_cpu_*rmed* files record that run.)

Per model, each metric runs twice on the same Landscape and seed: ``rel_tol=0`` (the whole budget) and the
default ``rel_tol``; printed and saved per run: mode, HVPs spent, budget, seconds (all, and inside HVPs),
the value, its interval, the half-width over the value, and ``converged``.

    python benchmarks/stopping.py --models gpt2-124m --dtype bf16 --device cuda --out r.json
    python benchmarks/stopping.py --models gpt2-mid --device cpu --hvps 256            # CPU, a smaller budget
    python benchmarks/stopping.py --models gpt2-tiny --device cpu --metrics density --seeds 0,1,2,3,4

density's "value" is the negative mass, its "err" the Monte Carlo half-width the stop tests, its "ci" the
reported interval (``negative_mass_lo``, ``_hi``); ``hvps`` does not apply to it (``n_v`` caps its starts).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import DTYPES, HVPClock, build, lm_loss, token_batches  # noqa: E402
from timing import environment, sync  # noqa: E402

from geomprobe.engine.landscape import Landscape  # noqa: E402
from geomprobe.metrics import density, diagshare, rmed  # noqa: E402

KEYS = {"rmed": ("rmed", "rmed_err", "rmed_ci"), "diagshare": ("diagshare", "diagshare_err", "diagshare_ci"),
        "density": ("negative_mass", "negative_mass_mc_err", ("negative_mass_lo", "negative_mass_hi"))}


def one(metric, land: Landscape, device, clock: HVPClock, seed: int = 0, **options) -> dict:
    fn = {"rmed": rmed, "diagshare": diagshare, "density": density}[metric]
    clock.seconds = 0.0
    sync(device)
    t0 = time.perf_counter()
    out = fn(land, seed=seed, **options)
    sync(device)
    secs = time.perf_counter() - t0
    x, err, ci = (out[k] if isinstance(k, str) else [out[j] for j in k] for k in KEYS[metric])
    used = options.get("rel_tol", inspect.signature(fn).parameters["rel_tol"].default)
    mode = out.get("mode", ("exact" if out["exact"] else "sampled") if "exact" in out else f"{out['n_v']} starts")
    row = {"metric": metric, "options": options, "seed": seed, "rel_tol": used, "mode": mode,
           "hvps": out["hvps"], "budget": out["budget"], "seconds": secs, "hvp_seconds": clock.seconds,
           "value": x, "err": err, "ci": ci, "rel_halfwidth": (err / abs(x)) if x and err is not None else None,
           "converged": out["converged"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2-124m")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--metrics", default="diagshare")
    ap.add_argument("--hvps", type=int, default=1024)
    ap.add_argument("--rel-tols", default="0,default", help="comma-separated; 'default' = the metric's default")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each metric and rel_tol run once per seed")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        model, vocab, b, t = build(name, DTYPES[a.dtype], a.device)
        batch = token_batches(vocab, b, t, 1, a.device, seed=1)[0]
        land = Landscape(model, lm_loss, [batch], mode="eval")
        print(f"# {name} {a.dtype}: d={land.dim}, {len(land.space.blocks)} blocks, chunk {land.chunk_size}", flush=True)
        with HVPClock(a.device) as clock:
            for metric in a.metrics.split(","):
                for seed in (int(s) for s in a.seeds.split(",")):
                    for rt in a.rel_tols.split(","):
                        opts = {} if metric == "density" else {"hvps": a.hvps}
                        opts.update({} if rt == "default" else {"rel_tol": float(rt)})
                        rows.append({"model": name, "dtype": a.dtype,
                                     **one(metric, land, a.device, clock, seed=seed, **opts)})
        land.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"environment": environment(a.device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
