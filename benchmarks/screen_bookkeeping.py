"""Seconds rmed's and precond's Bekas-screen bookkeeping takes on GPT-2 124M's layout (148 blocks, 124,439,808
coordinates), CPU only, with no HVP: the screen is synthetic (float64 mean and standard error, as
``bekas_diagonal`` returns them), the reads' values too, so what is timed is only what is done with the screen.

Both plans rmed can follow on GPT-2 124M at its default budget (``plan_rmed`` of the 148 sizes):

* ``packed`` (the plan of the GPU profile ``results/scale_gpt2_124m_bf16_spectrum_rmed_precond_profile_h200.json``):
  441 sampled and 55 candidate coordinates per block; the candidates of ``read_packed``, precond's scaled
  candidates (``read_scaled_candidates``' choice: 55 per block by the bound times ``|P|``) and three
  ``diagonal_statistics`` calls (rmed's, precond's raw and precond's scaled R_med);
* ``exact`` (the pilot's fallback): 6 sampled coordinates per block, no top candidates, a pool of 88 across
  blocks, raw then scaled, and the same three statistics.

Runs against the checkout on ``PYTHONPATH``: the old one (the screen copied to the host as float64 numpy and
ranked there) or the new one (kept where it was computed, ranked there). ``digest`` is a hash of every
candidate chosen, equal between the two when the choice is the same:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/screen_bookkeeping.py --out after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from metric_bookkeeping import gpt2_blocks  # noqa: E402
from timing import environment  # noqa: E402

from geomprobe.metrics import _reads  # noqa: E402
from geomprobe.metrics._budget import plan_rmed  # noqa: E402
from geomprobe.metrics.rmed import diagonal_statistics  # noqa: E402

NEW = not hasattr(_reads, "host_scales")
Z = 4.0


def parts_of(blocks, plan, rng, packed: bool) -> list:
    """Per block the sampled coordinates and their (synthetic) reads, as the reads leave them."""
    out = []
    for b in blocks:
        k = plan.rows_sample if packed else plan.k
        sample = np.sort(rng.choice(b.size, min(k, b.size), replace=False))
        p = _reads.BlockDiag(b, False, sample, rng.normal(size=len(sample)), np.empty(0, int), np.empty(0))
        if packed:
            p.sample_err = rng.random(len(sample)) * 0.1
        out.append(p)
    return out


def choose(parts, mean, se, p, plan, packed: bool) -> tuple[list, list]:
    """The candidates of the raw reads (the parts completed in place) and precond's scaled ones (new parts),
    by the checkout's own functions, as ``read_packed`` / ``read_exact`` and ``read_scaled_candidates`` call
    them."""
    blocks = [q.block for q in parts]
    n_top = plan.rows_cand if packed else plan.top
    if NEW:
        from geomprobe.metrics._screen import Screen, screen_candidates

        screen = Screen(mean, se)
        cand, extra = screen_candidates(screen, blocks, [q.sample for q in parts], [None], n_top, Z,
                                        pool=0 if packed else plan.pool)
        for q, c, m in zip(parts, cand, extra):
            q.screen, q.cand = screen, np.union1d(c, m).astype(int)[: plan.rows_cand if packed else None]
        chosen, more = screen_candidates(screen, blocks, [q.sample for q in parts], [p], n_top, Z,
                                         pool=0 if packed else plan.pool, taken=[q.cand for q in parts])
        new = [np.union1d(np.setdiff1d(c, q.cand), m).astype(int) for q, c, m in zip(parts, chosen, more)]
    else:
        mh, sh = mean.double().cpu().numpy(), se.double().cpu().numpy()
        bound, host = _reads.screen_bound(mh, sh, Z), _reads.host_scales([None])
        for q in parts:
            b = q.block
            q.screen, q.screen_se = mh[b.start : b.stop], sh[b.start : b.stop]
            q.cand = _reads._screen_candidates(bound[b.start : b.stop], q.sample, [None], n_top)
        if not packed:
            extra = _reads._pool_candidates(parts, [q.cand for q in parts], host, Z, plan.pool)
            for q, m in zip(parts, extra):
                q.cand = np.union1d(q.cand, m).astype(int)
        (hp,) = _reads.host_scales([p])
        new = []
        for q in parts:
            b = q.block
            c = _reads._screen_candidates(_reads.screen_bound(q.screen, q.screen_se, Z), q.sample,
                                          [hp[b.start : b.stop]], n_top)
            new.append(np.setdiff1d(c, q.cand).astype(int))
        if not packed:
            more = _reads._pool_candidates(parts, [np.union1d(q.cand, c) for q, c in zip(parts, new)], [hp], Z,
                                           plan.pool)
            new = [np.union1d(c, m).astype(int) for c, m in zip(new, more)]
    return parts, new


def completed(parts, new, rng, packed: bool) -> tuple[list, list]:
    """Synthetic reads of every candidate: the raw parts and the scaled parts (raw plus precond's)."""
    for q in parts:
        q.cand_h = rng.normal(size=len(q.cand))
        q.cand_err = rng.random(len(q.cand)) * 0.1 if packed else None
    scaled = [replace(q, cand=np.concatenate([q.cand, c]), cand_h=np.concatenate([q.cand_h, rng.normal(size=len(c))]),
                      cand_err=np.concatenate([q.cand_err, rng.random(len(c))]) if packed else None)
              for q, c in zip(parts, new)]
    return parts, scaled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plans", default="packed,exact")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    blocks = gpt2_blocks(1)
    d = blocks[-1].stop
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    se = torch.rand(d, generator=g, dtype=torch.float64)
    p = torch.exp(torch.randn(d, generator=g))  # float32, as precond's P of a float32 model
    plan = plan_rmed([b.size for b in blocks], budget=1024, exact_threshold=1024, k=512, top=64, screen_samples=32,
                     signs=2, min_k=24, pilot=8)
    plans = {"packed": plan, "exact": plan.fallback}
    res = {"environment": environment("cpu"), "args": vars(args), "code": "new" if NEW else "old", "dim": d,
           "blocks": len(blocks), "threads": torch.get_num_threads(), "runs": []}
    for rep in range(args.repeats):
        for name in args.plans.split(","):
            pl, packed = plans[name], name == "packed"
            rng = np.random.default_rng(rep)
            parts = parts_of(blocks, pl, rng, packed)
            t0 = time.perf_counter()
            parts, new = choose(parts, mean, se, p, pl, packed)
            t_choose = time.perf_counter() - t0
            parts, scaled = completed(parts, new, rng, packed)
            gen = torch.Generator().manual_seed(rep)
            t0 = time.perf_counter()
            raw = diagonal_statistics(parts, pl, [None], z=Z, level=0.95, bootstrap=400, budget=1024, generator=gen)
            diagonal_statistics(parts, pl, [None], z=Z, level=0.95, bootstrap=400, budget=1024, generator=gen)
            pre = diagonal_statistics(scaled, pl, [p], z=Z, level=0.95, bootstrap=400, budget=1024, generator=gen)
            t_stats = time.perf_counter() - t0
            digest = hashlib.sha256(b"".join(np.asarray(c, np.int64).tobytes() for q, c in
                                             zip(parts, new) for c in (q.cand, c))).hexdigest()[:16]
            row = {"plan": name, "repeat": rep, "candidates_s": t_choose, "statistics_s": t_stats,
                   "total_s": t_choose + t_stats, "candidates": int(sum(len(q.cand) for q in parts)),
                   "scaled_candidates": int(sum(len(c) for c in new)), "digest": digest,
                   "rmed_max_upper": raw[0]["max_upper"], "precond_max_upper": pre[0]["max_upper"]}
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
            del parts, scaled
    summary = {}
    for name in args.plans.split(","):
        rows = [r for r in res["runs"] if r["plan"] == name]
        summary[name] = {k: float(np.median([r[k] for r in rows])) for k in ("candidates_s", "statistics_s", "total_s")}
    res["median"] = summary
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
