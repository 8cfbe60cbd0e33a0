"""How far an HVP is from symmetric under each way the Landscape can compute it (issue 16's open lead).

GPT-2 355M in fp32 under the default 1.5x plan (vectors in host memory, one sample per micro-batch, four of eight
graphs rebuilt at every product, torch's attention) measured a Lanczos asymmetry of 5.7e-5 of ||T||, about 1,000x
what a resident fp32 GPT-2 124M shows, which sends its spectrum to a whole-basis pass at every step
(benchmarks/RESULTS.md section 6, thirteenth round). This script takes one model and measures, for each setting
alone and together, the symmetry defect of Krylov pairs::

    |u^T H v - v^T H u| / ||H u||      (u a random unit vector, v = H u / ||H u||, in the model's dtype)

which is Lanczos' own asymmetry measure at its first step (``(H v_1)^T v_0 - beta_0`` over ``||T||``). Random
independent pairs do not show a product's error: it lies where ``H``'s range does, and a random ``u`` sees about
``1 / sqrt(d)`` of it (the first run of this script measured 7.5e-11 that way on the plan that Lanczos found
asymmetric at 5.7e-5). Also the repeatability of one product (``||H u - H' u|| / ||H u||``, the same vector
twice): a product that is not the same function from call to call (a rebuilt graph that differs) shows there
first, and the median seconds of a product. Settings: everything
resident (the reference), one sample per micro-batch with every graph kept, graphs rebuilt at every product
(``graph_budget_bytes=1``), vectors in host memory, and recomputed attention, each on its own, and the default
plan's combination (first, after one AdamW step, as a probe in a training loop plans). One process, one line
per setting, the JSON at ``--out``.

    python benchmarks/hvp_symmetry.py --model gpt2-355m --dtype fp32 --out results/hvp_symmetry_355m_h200.json
    python benchmarks/hvp_symmetry.py --model gpt2-tiny --device cpu --dtype fp32 --pairs 2     # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import DTYPES, build, lm_loss, token_batches  # noqa: E402

from geomprobe.engine.landscape import Landscape  # noqa: E402

SETTINGS = {  # name: Landscape keywords (memory=None: exactly these settings, no plan)
    # first, while the device's peak is still the training step's (the plan reads it)
    "default_plan": {"memory": "auto"},
    "resident": {},
    "micro_batch_1": {"micro_batch_size": 1},
    "rebuilt": {"micro_batch_size": 1, "graph_budget_bytes": 1},
    "host_vectors": {"vector_device": "cpu"},
    "recompute_attention": {"recompute_attention": True},
    "host_rebuilt": {"micro_batch_size": 1, "graph_budget_bytes": 1, "vector_device": "cpu"},
}


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x.double(), y.double()))


def defects(land: Landscape, pairs: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """The symmetry defect of ``pairs`` Krylov pairs (largest and median), one product's repeatability and the
    median seconds of a product (module docstring). Vectors are drawn and compared where the Landscape keeps
    them (the device, or the host in host-vector mode), in float64 there."""
    where = land.vector_device if getattr(land, "vector_device", None) is not None else land.device
    g = torch.Generator(device=where).manual_seed(seed)
    sym, seconds, rep = [], [], None

    def hvp(x: torch.Tensor) -> torch.Tensor:
        if land.device.type == "cuda":
            torch.cuda.synchronize(land.device)
        t0 = time.perf_counter()
        y = land.hvp(x)
        if land.device.type == "cuda":
            torch.cuda.synchronize(land.device)
        seconds.append(time.perf_counter() - t0)
        return y

    for i in range(pairs):
        u = torch.randn(land.dim, generator=g, device=where, dtype=torch.float32)
        u = u.div_(u.norm()).to(dtype)
        Hu = hvp(u)
        n = math.sqrt(_dot(Hu, Hu))
        v = (Hu.double() / max(n, 1e-300)).to(dtype)
        Hv = hvp(v)
        sym.append(abs(_dot(u, Hv) - _dot(v, Hu)) / max(n, 1e-300))
        if i == 0:
            d = hvp(u).double().sub_(Hu.double())
            rep = math.sqrt(_dot(d, d)) / max(n, 1e-300)
            del d
        del u, v, Hu, Hv
    sym.sort()
    seconds.sort()
    return {"symmetry_max": sym[-1], "symmetry_median": sym[len(sym) // 2], "repeat": rep, "pairs": pairs,
            "hvp_seconds": seconds[len(seconds) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-355m")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    model, vocab, b, t = build(args.model, dtype, args.device)
    batch = token_batches(vocab, b, t, 1, args.device, seed=1)[0]
    # an AdamW step first, as in a training loop: the default plan reads its peak (1.5x of it) and its state
    # takes the memory a training loop's would
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lm_loss(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    doc = {"args": vars(args), "torch": torch.__version__, "results": {}}
    for name in args.settings.split(","):
        kw = dict(SETTINGS[name])
        kw.setdefault("memory", None)
        if kw.get("vector_device") == "cpu" and torch.device(args.device).type == "cpu":
            kw.pop("vector_device")  # host and device are one
        t0 = time.perf_counter()
        try:
            land = Landscape(model, lm_loss, [batch], mode="eval", **kw)
            row = defects(land, args.pairs, dtype)
            row["plan"] = None if land.plan is None else {k: getattr(land.plan, k, None) for k in (
                "micro_batch_size", "graph_budget_bytes", "vectors", "samples_kept")}
            land.close()
        except Exception as e:  # keep the other settings' figures
            row = {"failed": f"{type(e).__name__}: {e}"}
        row["seconds"] = time.perf_counter() - t0
        doc["results"][name] = row
        print(json.dumps({"setting": name, **row}, default=str), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=2, default=str)
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
