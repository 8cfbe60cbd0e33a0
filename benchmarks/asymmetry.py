"""How far an HVP is from symmetric, step by step along a Lanczos run (issue 16, partial reorthogonalization).

In a fully reorthogonalized run the Gram-Schmidt coefficients of ``H v_j`` (after the three-term step) against
the older vectors ``v_k`` (``k < j - 1``) are ``v_k^T H v_j``, zero for a symmetric product up to rounding: they
are the loss of orthogonality one step of a partially reorthogonalized run would inject along ``v_k``, and
``|(H v_j)^T v_{j-1} - beta_{j-1}|`` is the part of it that a run sees without reading the basis. Reported per
step: ``alpha``, ``beta``, the local asymmetry and the largest and RMS coefficient against the older vectors,
in absolute terms and over ``beta_j``.

    python benchmarks/asymmetry.py --cases gpt2-124m:bf16,gpt2-124m:fp32 --steps 60 --out results/asym.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import DTYPES, MLP, build, lm_loss, token_batches

from geomprobe import Landscape

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")  # the module, not the function it exports


def landscape(name: str, dtype_name: str, device: str) -> Landscape:
    """The Landscape of a named case of ``scale.py`` (its models, batches and seeds)."""
    if name == "mlp-10m":
        dtype = DTYPES[dtype_name]
        model = MLP().to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(256, 784, generator=g).to(device, dtype), torch.randint(0, 10, (256,), generator=g).to(device))
        ce = torch.nn.CrossEntropyLoss()
        return Landscape(model, ce, [batch], mode="eval")
    model, vocab, b, t = build(name, DTYPES[dtype_name], device)
    batch = token_batches(vocab, b, t, 1, device, seed=1)[0]
    return Landscape(model, lm_loss, [batch], mode="eval")


def measure(name: str, dtype_name: str, steps: int, device: str) -> dict:
    land = landscape(name, dtype_name, device)
    rows: list[dict] = []
    inner = lanczos_module.krylov_step

    def recording(*args, **kwargs):
        w, coeffs, beta = inner(*args, **kwargs)
        c = coeffs.double()
        older = c[:-2].abs() if c.numel() > 2 else torch.zeros(1, dtype=torch.float64)
        rows.append({"alpha": float(c[-1]), "coeff_prev": float(c[-2]) if c.numel() > 1 else None, "beta": beta,
                     "older_max": float(older.max()), "older_rms": float(older.pow(2).mean().sqrt())})
        return w, coeffs, beta

    lanczos_module.krylov_step = recording
    try:
        gen = torch.Generator(device=land.device).manual_seed(0)
        r = lanczos_module.lanczos(land.hvp, land.dim, tol=0.0, max_iter=steps, dtype=land.dtype, device=land.device,
                                   generator=gen, reorth="full")
    finally:
        lanczos_module.krylov_step = inner
    norm = max(abs(x["alpha"]) for x in rows) + 2 * max(x["beta"] for x in rows)
    for j, x in enumerate(rows):
        x["local_asym"] = abs(x["coeff_prev"] - rows[j - 1]["beta"]) if j > 0 else 0.0
        for key in ("local_asym", "older_max", "older_rms"):
            x[key + "_over_beta"] = x[key] / max(x["beta"], 1e-300)
            x[key + "_over_norm"] = x[key] / norm
    land.close()
    return {"model": name, "dtype": dtype_name, "dim": land.dim, "steps": len(rows), "norm_bound": norm,
            "theta_max": float(r.ritz_values.max()), "theta_min": float(r.ritz_values.min()), "rows": rows}


def growth(name: str, dtype_name: str, steps: int, device: str) -> dict:
    """Partial reorthogonalization with every whole-basis pass suppressed: the measured ``max_k |v_j^T v_k|``
    per step (how fast orthogonality is really lost) beside what the estimate would have asked for."""
    from geomprobe.linalg import orthogonality

    land = landscape(name, dtype_name, device)
    asked: list[tuple[int, float, float]] = []
    real_advance = orthogonality.OrthogonalityEstimate.advance

    def never(self, alphas, betas, norm, asymmetry=0.0):
        real_advance(self, alphas, betas, norm, asymmetry)
        asked.append((len(alphas), float(abs(self._cur[:-1]).max()), float(self.threshold)))
        self.always = self.selective = False
        self._force = self._chain = False
        return False

    orthogonality.OrthogonalityEstimate.advance = never
    try:
        gen = torch.Generator(device=land.device).manual_seed(0)
        r = lanczos_module.lanczos(land.hvp, land.dim, tol=0.0, max_iter=steps, dtype=land.dtype,
                                   device=land.device, generator=gen, reorth="partial", keep_basis=True)
    finally:
        orthogonality.OrthogonalityEstimate.advance = real_advance
    Q = r.basis.float()
    G = (Q @ Q.T).double().cpu()
    G.fill_diagonal_(0)
    measured = [float(G[j, :j].abs().max()) if j else 0.0 for j in range(G.shape[0])]
    land.close()
    return {"model": name, "dtype": dtype_name, "steps": G.shape[0], "measured_max_inner": measured,
            "estimate": [a[1] for a in asked], "threshold": asked[-1][2] if asked else None,
            "asymmetry": r.asymmetry, "theta_max": float(r.ritz_values.max()), "theta_min": float(r.ritz_values.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gpt2-tiny:fp32")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--growth", action="store_true", help="also run without whole-basis passes and measure V^T V")
    a = ap.parse_args()
    out = []
    for case in a.cases.split(","):
        name, dt = case.split(":")
        res = measure(name, dt, a.steps, a.device)
        out.append(res)
        rs = res["rows"][2:]
        print(f"{case}: d={res['dim']} ||T||<={res['norm_bound']:.4g} theta [{res['theta_min']:.4g}, {res['theta_max']:.4g}]")
        for key in ("local_asym", "older_max", "older_rms"):
            ob = sorted(x[key + "_over_beta"] for x in rs)
            on = sorted(x[key + "_over_norm"] for x in rs)
            print(f"  {key}: /beta median {ob[len(ob)//2]:.3g} max {ob[-1]:.3g};  /norm median {on[len(on)//2]:.3g} max {on[-1]:.3g}")
        if a.growth:
            g = growth(name, dt, a.steps, a.device)
            res["growth"] = g
            m = g["measured_max_inner"]
            print(f"  no passes: asymmetry {g['asymmetry']:.3g}, threshold {g['threshold']:.3g}; measured max |v_j^T v_k| "
                  + " ".join(f"{j}:{m[j]:.2g}" for j in range(4, len(m), max(1, len(m) // 10))))
            e = g["estimate"]
            print("  estimate " + " ".join(f"{j}:{e[j-1]:.2g}" for j in range(4, len(e) + 1, max(1, len(e) // 10))))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
