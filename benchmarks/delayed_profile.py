"""Where a delayed Lanczos step's time goes on a GPU (linalg/delayed_lanczos.py): per step, the product's
device time and host time, the side stream's read of the basis (device time), and the host time outside the
product; whether the basis is page-locked. Runs ``scale.py models`` with the loop instrumented.

    python benchmarks/delayed_profile.py --cases gpt2-124m:bf16:spectrum --out results/delayed_profile.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import runpy
import statistics
import sys
import time
from pathlib import Path

import torch

D = importlib.import_module("geomprobe.linalg.delayed_lanczos")
L = importlib.import_module("geomprobe.linalg.lanczos")
steps: list[dict] = []
info: dict = {}


def instrument() -> None:
    project, run = D._project, D.run_delayed

    def timed_project(basis, device, z, u, ab, tail=None):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        c = project(basis, device, z, u, ab, tail)
        e.record()
        steps.append({"side": (s, e), "rows": basis.n, "enqueue_s": time.perf_counter() - t0, "t_start": t0})
        info.update(pin=basis.pin, pin_refused=basis.pin_refused, offloaded=basis.offloaded)
        return c

    def timed_run(matvec, *a, **kw):
        def mv(x):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            y = matvec(x)
            e.record()
            t1 = time.perf_counter()
            if steps:
                steps[-1].update(hvp=(s, e), hvp_host_s=t1 - t0, hvp_return=t1)
            return y
        return run(mv, *a, **kw)

    D._project = timed_project
    L.run_delayed = timed_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gpt2-124m:bf16:spectrum")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    instrument()
    scale = str(Path(__file__).resolve().parent / "scale.py")
    sys.argv = [scale, "models", "--cases", a.cases, "--out", a.out + ".scale.json"]
    runpy.run_path(scale, run_name="__main__")
    torch.cuda.synchronize()
    rows = []
    for i, st in enumerate(steps):
        if "hvp" not in st:
            continue
        nxt = steps[i + 1]["enqueue_s"] if i + 1 < len(steps) else None
        rows.append({"rows": st["rows"], "side_ms": st["side"][0].elapsed_time(st["side"][1]),
                     "hvp_ms": st["hvp"][0].elapsed_time(st["hvp"][1]), "hvp_host_ms": 1e3 * st["hvp_host_s"],
                     "enqueue_ms": 1e3 * st["enqueue_s"],
                     "gap_ms": 1e3 * (steps[i + 1]["t_start"] - st["hvp_return"]) if i + 1 < len(steps) else None,
                     "next_enqueue_ms": None if nxt is None else 1e3 * nxt})
    out = {"info": info, "steps": rows}
    med = {k: statistics.median(r[k] for r in rows) for k in ("side_ms", "hvp_ms", "hvp_host_ms", "enqueue_ms")} if rows else {}
    med["gap_s_total"] = sum(r["gap_ms"] for r in rows if r["gap_ms"] is not None) / 1e3
    med["side_s_total"] = sum(r["side_ms"] for r in rows) / 1e3
    out["median"] = med
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"info": info, "median": med, "n": len(rows)}))
    for r in rows[:: max(1, len(rows) // 8)]:
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
