"""The Krylov arithmetic of a host-vector Lanczos run, timed on the CPU against a copy-bandwidth floor.

In the host-vector mode (``Landscape(vector_device="cpu")``, the FSDP2 Landscape with ``vector_device="cpu"``)
the Lanczos basis and its working vectors live in host memory and every step's vector arithmetic runs on the
CPU: the dots and updates of Gram-Schmidt (``row_dots`` / ``sub_rows``), the norms, the appends, and at a thick
restart the rotation of the basis (``LanczosBasis.rotate``). This benchmark runs the spectrum metric's Lanczos
as that mode runs it (:func:`geomprobe.linalg.lanczos.lanczos` with ``device="cpu"`` and the Landscape's dtype,
as :func:`geomprobe.metrics.spectrum.run_lanczos` calls it) on a cheap synthetic matvec (a diagonal with a
known spectrum, so the arithmetic dominates), with ``--max-basis`` as the bounded / thick-restart mode and
without a cap, and reports:

- ``floor``: GB/s of a copy of one d-vector into an existing buffer (read + write), measured in the same run;
- ``kernels``: each arithmetic function alone (median of ``--repeats``) on 1 row and ``--max-basis`` rows,
  seconds and GB/s of the bytes it must move (the basis rows read, ``w`` read and written), and the share
  of the copy floor that is;
- ``runs``: per Lanczos run, seconds per step outside the matvec, the matvec's own, minor page faults per step
  outside the matvec (fresh d-sized temporaries show here), and per function (cProfile) seconds per step and
  calls per step; the Ritz values found (to compare the numerics of two versions of the code).

The matvec returns a fresh output vector per call, as the host mode's HVP does (``--reuse-output`` writes
into one buffer instead). A table ends the output; ``--out`` writes the JSON.

    OMP_NUM_THREADS=2 python benchmarks/host_lanczos.py --dim 1e8 --threads 2 --out r.json
    python benchmarks/host_lanczos.py --dim 5e7 --dtypes bf16 --max-basis 6 --steps 12 --skip-unbounded
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment

from geomprobe.linalg import vectors as V
from geomprobe.linalg.krylov_basis import LanczosBasis
from geomprobe.linalg.lanczos import lanczos

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults of lazily mapped inputs are not the kernel's
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def spectrum(d: int) -> torch.Tensor:
    """The diagonal: a bulk spread over [-0.5, 1] and a few outliers at the top (float32)."""
    diag = torch.linspace(-0.5, 1.0, d, dtype=torch.float32)
    top = torch.tensor([8.0, 5.0, 3.0, 2.0])
    diag[-len(top):] = top.flip(0)
    return diag


def floor(d: int, dtype: torch.dtype, repeats: int) -> dict:
    src = torch.ones(d, dtype=dtype)
    dst = torch.zeros(d, dtype=dtype)
    t = median(lambda: dst.copy_(src), repeats)
    nbytes = 2 * d * src.element_size()
    return {"seconds": t, "bytes": nbytes, "GBps": nbytes / t / 1e9}


def kernels(d: int, dtype: torch.dtype, rows: list[int], repeats: int, floor_gbps: float) -> list[dict]:
    item = torch.empty(0, dtype=dtype).element_size()
    n_max = max(rows)
    g = torch.Generator().manual_seed(0)
    B = torch.empty(n_max, d, dtype=dtype)
    for i in range(n_max):  # row by row: no float32 copy of the whole basis
        B[i] = V.gaussian(d, g, dtype)
    w = V.gaussian(d, g, dtype)
    out = []

    def record(name, n, t, nbytes):
        gbps = nbytes / t / 1e9
        out.append({"function": name, "rows": n, "seconds": t, "bytes": nbytes, "GBps": gbps,
                    "of_floor": gbps / floor_gbps})

    for n in rows:
        Bn = B[:n]
        c = V.row_dots(Bn, w)
        record("row_dots", n, median(lambda Bn=Bn: V.row_dots(Bn, w), repeats), (n + 1) * d * item)
        # c ~ B w of unit-variance rows is ~ sqrt(d): scaled so repeated updates keep w finite and unchanged in size
        c = (c / (c.abs().max() * 1e6)).to(V.accumulation_dtype(dtype))
        record("sub_rows", n, median(lambda Bn=Bn, c=c: V.sub_rows(w, c, Bn), repeats), (n + 2) * d * item)
    record("vector_norm", 1, median(lambda: V.vector_norm(w), repeats), d * item)
    # a thick restart's rotation: n_max rows to the ~0.6 share it keeps, in place
    keep = max(1, round(0.6 * n_max))
    Y = torch.linalg.qr(torch.randn(n_max, n_max, dtype=torch.float64, generator=g))[0][:, :keep].contiguous()
    basis = LanczosBasis(d, dtype, "cpu", capacity=n_max)
    for i in range(n_max):
        basis.append(B[i])
    del B

    def rotate():
        basis.n = n_max  # the rotation is in place: the rows it leaves are rotated again (values stay bounded)
        basis.rotate(Y)

    record("rotate", n_max, median(rotate, repeats), (n_max + keep) * d * item)
    return out


class Matvec:
    """``diag * v`` in the vectors' type, timed; a fresh output per call unless ``reuse``. ``wide``: the product
    of a half-precision model on float32 vectors (the host-vector Landscape's): ``v`` read in ``dtype``, the
    result given back in float32."""

    def __init__(self, diag: torch.Tensor, dtype: torch.dtype, reuse: bool, wide: bool = False):
        self.diag = diag.to(dtype)
        self.wide = wide
        self.out = torch.empty_like(self.diag, dtype=torch.float32 if wide else dtype) if reuse else None
        self.seconds = 0.0
        self.faults = 0
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        f0, t0 = minflt(), time.perf_counter()
        if self.wide:
            w = torch.mul(self.diag, v.to(self.diag.dtype)).float()
        else:
            w = torch.mul(self.diag, v, out=self.out) if self.out is not None else self.diag * v
        self.seconds += time.perf_counter() - t0
        self.faults += minflt() - f0
        self.calls += 1
        return w


def linalg_functions(stats: pstats.Stats, steps: int, top: int = 20) -> list[dict]:
    rows = []
    for (path, _line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        if f"geomprobe{os.sep}linalg" in path:
            rows.append({"function": f"{os.path.basename(path)[:-3]}.{name}", "calls_per_step": ncalls / steps,
                         "seconds_per_step": cumtime / steps, "own_seconds_per_step": tottime / steps})
    rows.sort(key=lambda r: -r["seconds_per_step"])
    return rows[:top]


def torch_ops(stats: pstats.Stats, steps: int, top: int = 8) -> list[dict]:
    rows = []
    for (path, _line, name), (_cc, ncalls, tottime, _cumtime, _callers) in stats.stats.items():
        if path == "~":  # built-ins: the torch operations the Python code issues
            rows.append({"op": name, "calls_per_step": ncalls / steps, "seconds_per_step": tottime / steps})
    rows.sort(key=lambda r: -r["seconds_per_step"])
    return rows[:top]


def run(d: int, dtype: torch.dtype, diag: torch.Tensor, steps: int, max_basis: int | None, reuse: bool,
        wide: bool = False) -> dict:
    mv = Matvec(diag, dtype, reuse, wide)
    prof = cProfile.Profile()
    f0, t0 = minflt(), time.perf_counter()
    prof.enable()
    r = lanczos(mv, d, k=1, tol=1e-12, max_iter=steps, which="both", generator=V.default_generator(0),
                dtype=dtype, device="cpu", max_basis=max_basis, basis_dtype=torch.float32 if wide else None)
    prof.disable()
    wall, faults = time.perf_counter() - t0, minflt() - f0
    stats = pstats.Stats(prof)
    n = r.matvecs
    top, top_b = r.top(2)
    bottom, bottom_b = r.bottom(1)
    return {
        "max_basis": max_basis, "steps": n, "restarts": r.restarts, "basis_peak": r.basis_peak,
        "seconds_per_step": (wall - mv.seconds) / n, "matvec_seconds_per_step": mv.seconds / n,
        "page_faults_per_step": (faults - mv.faults) / n, "matvec_page_faults_per_step": mv.faults / n,
        # the basis's first touch (its rows are written once each) against what the steps add beyond it
        "basis_page_faults_per_step": r.basis_peak * d * diag.new_empty(0, dtype=dtype).element_size() / 4096 / n,
        "top": top, "top_bounds": top_b, "bottom": bottom, "bottom_bounds": bottom_b,
        "functions": linalg_functions(stats, n), "torch_ops": torch_ops(stats, n),
    }


def table(result: dict) -> str:
    lines = []
    for case in result["cases"]:
        fl = case["floor"]["GBps"]
        lines.append(f"\n{case['dtype']}, d = {case['dim']:,}, {result['threads']} threads: copy floor {fl:.1f} GB/s")
        lines.append(f"  {'kernel':<12} {'rows':>4} {'ms':>9} {'GB/s':>7} {'of floor':>8}")
        for k in case["kernels"]:
            lines.append(f"  {k['function']:<12} {k['rows']:>4} {k['seconds'] * 1e3:>9.1f} {k['GBps']:>7.1f} "
                         f"{k['of_floor']:>8.2f}")
        for r in case["runs"]:
            cap = "no cap" if r["max_basis"] is None else f"max_basis {r['max_basis']}"
            lines.append(f"  Lanczos ({cap}, {r['steps']} steps, {r['restarts']} restarts): "
                         f"{r['seconds_per_step']:.3f} s/step outside the matvec "
                         f"(matvec {r['matvec_seconds_per_step']:.3f}), {r['page_faults_per_step']:.0f} page faults/step "
                         f"({r['basis_page_faults_per_step']:.0f} the basis's first touch); top {r['top'][0]:.6f}")
            for f in r["functions"][:8]:
                lines.append(f"    {f['function']:<40} {f['seconds_per_step']:>8.3f} s/step "
                             f"{f['calls_per_step']:>8.1f} calls")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=float, default=1e8, help="entries per vector (50-200M on a big host)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="of bf16, fp16, fp32, fp64, and bf16w / fp16w: a half "
                    "product on a float32 basis")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--max-basis", type=int, default=6, help="the bounded run's cap (thick restart)")
    ap.add_argument("--steps", type=int, default=20, help="matvecs of the bounded run")
    ap.add_argument("--unbounded-steps", type=int, default=10, help="matvecs of the run without a cap")
    ap.add_argument("--skip-unbounded", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reuse-output", action="store_true", help="the matvec writes into one buffer")
    ap.add_argument("--chunk-elements", type=float, default=None,
                    help="host_arith.HOST_CHUNK_ELEMENTS (float32 scratch per chunk; to tune it on a host)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    d = int(a.dim)
    if a.chunk_elements is not None:
        try:
            from geomprobe.linalg import host_arith
        except ImportError:  # the code before the chunked host passes has no such setting
            ap.error("--chunk-elements needs geomprobe.linalg.host_arith")
        host_arith.HOST_CHUNK_ELEMENTS = int(a.chunk_elements)
    if d < 16 or a.max_basis < 5 or a.steps < 1:
        ap.error("need --dim >= 16, --max-basis >= 5 (k=1 at both ends), --steps >= 1")
    result = {"environment": environment("cpu"), "threads": torch.get_num_threads(), "dim": d,
              "chunk_elements": a.chunk_elements, "cases": []}
    diag = spectrum(d)
    for name in a.dtypes.split(","):
        # "bf16w": a bf16 product on a float32 basis (Lanczos' basis_dtype, as the host-vector mode runs it)
        wide = name.endswith("w")
        dtype = DTYPES[name[:-1] if wide else name]
        rows = torch.float32 if wide else dtype
        case = {"dtype": name, "dim": d, "floor": floor(d, rows, a.repeats)}
        case["kernels"] = [] if a.skip_kernels else kernels(d, rows, [1, a.max_basis], a.repeats,
                                                            case["floor"]["GBps"])
        case["runs"] = [run(d, dtype, diag, a.steps, a.max_basis, a.reuse_output, wide)]
        if not a.skip_unbounded:
            case["runs"].append(run(d, dtype, diag, a.unbounded_steps, None, a.reuse_output, wide))
        result["cases"].append(case)
        print(table({"threads": result["threads"], "cases": [case]}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
