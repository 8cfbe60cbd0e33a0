"""Study 5: escaping a strict saddle with SGD, Adam and trust regions, and the isotropy of their noise.

Claim: Staib, Reddi, Kale, Kumar, Sra 2019 ("Escaping saddle points with adaptive gradient methods"): an
adaptive (diagonal) preconditioner makes the stochastic-gradient noise more isotropic near stationary points,
in particular it puts noise into the escape direction, which helps escape saddle points.

Set-up: a synthetic objective with a known strict saddle at w = 0,

    ℓ_i(w) = ½ wᵀAw + ¼‖w‖⁴ + ξ_iᵀw,    f(w) = mean_i ℓ_i(w) = ½ wᵀAw + ¼‖w‖⁴   (the ξ_i are centred)

with A of eigenvalues (−γ, λ_2..λ_d) and a fixed data set of N samples ξ_i whose covariance has standard
deviations s_2..s_d along the positive-curvature eigenvectors and a much smaller s_1 along the escape
direction u_min: strongly anisotropic noise, almost none where it would help. Every run starts exactly at
w = 0 (∇f = 0, λ_min = −γ). Two frames of the same problem: "aligned" (eigenvectors = coordinate axes, where a
diagonal preconditioner can act on u_min alone) and "rotated" (a random rotation Q of everything; SGD and the
spherical trust region are rotation-invariant, a diagonal preconditioner is not). Escape: the first step where
|u_minᵀw| ≥ ½√γ (half-way to the minima at ±√γ u_min); also the first step where f ≤ −γ²/8 (half the well).

Run::

    python examples/study_saddle.py --out reports/saddle

(the design's constants are in study_saddle_design.py, the analysis and report in study_saddle_report.py)
writes ``runs/<frame>-<optimizer>-s<seed>.jsonl`` (a trace record per step, a probe record at scheduled steps
until escape and at escape), ``tuning.json``, ``saddle.png``, ``summary.json`` and ``README.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find study_common

from study_common import prepare_out  # noqa: E402
from study_saddle_design import (  # noqa: E402
    BATCH,
    ESCAPE_F,
    ESCAPE_R,
    FRAMES,
    GAMMA,
    GRID,
    LAM,
    OPTIMIZERS,
    P_NOISE,
    PROBE_AT,
    S_ESCAPE,
    S_OTHER,
    STEPS,
    TUNE_SEEDS,
    D,
    N,
)
from study_saddle_report import analyse, plot, write_readme  # noqa: E402

from geomprobe import Landscape, optim  # noqa: E402
from geomprobe.metrics.isotropy import isotropy  # noqa: E402
from geomprobe.metrics.saddle import saddle  # noqa: E402

# ----------------------------------------------------------------------------- problem

class Problem:
    """A, the data set of noise vectors ξ_i and u_min, in one frame."""

    def __init__(self, frame: str, data_seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(data_seed)
        lam = torch.cat([torch.tensor([-GAMMA]), torch.logspace(math.log10(LAM[0]), math.log10(LAM[1]), D - 1)])
        s = torch.cat([torch.tensor([S_ESCAPE]),
                       torch.logspace(math.log10(S_OTHER[1]), math.log10(S_OTHER[0]), D - 1)])
        z = torch.randn(N, D, generator=gen, dtype=torch.float64)
        z = (z - z.mean(0)) / z.std(0)
        xi = z * s
        if frame == "rotated":
            Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
        else:
            Q = torch.eye(D, dtype=torch.float64)
        self.Q = Q
        self.A = Q @ torch.diag(lam.double()) @ Q.T
        self.xi = xi @ Q.T
        self.u_min = Q[:, 0].clone()
        self.lam, self.s = lam.double(), s.double()

    def f(self, w: torch.Tensor) -> float:
        w = w.detach().double()
        return float(0.5 * w @ self.A @ w + 0.25 * (w @ w) ** 2)


class Point(nn.Module):
    """The parameter vector w (float64), started at the saddle w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D, dtype=torch.float64))


def make_loss(prob: Problem):
    A = prob.A

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        w = model.w
        return 0.5 * w @ (A @ w) + 0.25 * (w @ w) ** 2 + batch["xi"].mean(0) @ w
    return loss


# ----------------------------------------------------------------------------- runs

def probe(model: Point, prob: Problem, opt: Any, *, seed: int, step: int, eps_g: float) -> dict[str, Any]:
    loss = make_loss(prob)
    land = Landscape(model, loss, {"xi": prob.xi}, loss_form="model")
    gen = torch.Generator().manual_seed(7919 * seed + step)
    batches = [{"xi": prob.xi[torch.randperm(N, generator=gen)[:BATCH]]} for _ in range(P_NOISE)]
    iso = isotropy(land, optimizer=opt, noise_data=batches, max_samples=P_NOISE, seed=seed)
    sad = saddle(land, eps_g=eps_g, seed=seed)
    keys = ("cv", "isotropy_index", "escape", "trace_cov")
    out = {k + suf: iso[k + suf] for k in keys for suf in ("", "_preconditioned")}
    out.update({k + "_err": iso[k + "_err"] for k in keys})
    out.update({k + "_preconditioned_err": iso[k + "_preconditioned_err"] for k in keys})
    out.update(isotropy_min=iso["isotropy_min"], precond_source=iso["source"], iso_lambda_min=iso["lambda_min"],
               saddle=sad["saddle"], saddle_flag=sad["flag"], grad_norm=sad["grad_norm"], eps_g=sad["eps_g"],
               eps_h=sad["eps_h"], lambda_min=sad["lambda_min"], lambda_min_err=sad["lambda_min_err"],
               lambda_max=sad["lambda_max"])
    land.close()
    return out


def run(frame: str, prob: Problem, opt_name: str, hp: dict, seed: int, *, path: str | None,
        eps_g: float, steps: int = STEPS) -> dict[str, Any]:
    """One run from w = 0; stops at escape (after probing there) or at the budget."""
    torch.manual_seed(seed)
    model = Point()
    opt = optim.make(opt_name, model.parameters(), **hp)
    counter = optim.track_backprops(opt)
    loss = make_loss(prob)
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(N, generator=gen), 0
    log = open(path, "w") if path else None
    if log:
        log.write(json.dumps({"kind": "meta", "frame": frame, "optimizer": opt_name, "hparams": hp, "seed": seed,
                              "batch": BATCH, "budget_steps": steps}) + "\n")
    esc_r = esc_f = None
    t0 = time.perf_counter()
    step = 0
    try:
        while step < steps:
            if cursor + BATCH > N:
                order, cursor = torch.randperm(N, generator=gen), 0
            idx = order[cursor: cursor + BATCH]
            cursor += BATCH
            opt.step(optim.make_closure(opt, lambda: loss(model, {"xi": prob.xi[idx]})))
            step += 1
            w = model.w.detach()
            proj = float(w @ prob.u_min)
            fv = prob.f(w)
            if not math.isfinite(fv):
                raise RuntimeError(f"{opt_name} diverged at step {step}")
            if esc_r is None and abs(proj) >= ESCAPE_R:
                esc_r = {"steps": step, "backprops": counter.backprops}
            if esc_f is None and fv <= ESCAPE_F:
                esc_f = {"steps": step, "backprops": counter.backprops}
            if log:
                log.write(json.dumps({"kind": "trace", "step": step, "backprops": counter.backprops,
                                      "proj": proj, "f": fv, "w_norm": float(w.norm())}) + "\n")
                if (step in PROBE_AT and esc_r is None) or (esc_r is not None and esc_r["steps"] == step):
                    rec = probe(model, prob, opt, seed=seed, step=step, eps_g=eps_g)
                    rec.update(kind="probe", step=step, backprops=counter.backprops, proj=proj, f=fv,
                               escaped=esc_r is not None)
                    log.write(json.dumps(rec) + "\n")
            if esc_r is not None and esc_f is not None:
                break
            if esc_r is not None and not log:
                break
    finally:
        counter.remove()
        if log:
            log.close()
    out = {"escape": esc_r, "escape_f": esc_f, "steps": step, "backprops": counter.backprops,
           "seconds": time.perf_counter() - t0}
    if log:
        with open(path, "a") as fh:
            fh.write(json.dumps({"kind": "end", **out}) + "\n")
    return out


def frozen_saddle(prob: Problem, seed: int, eps_g: float, warm: int = 100) -> dict[str, Any]:
    """Adam's preconditioner accumulated AT the saddle: Adam with lr = 0 takes ``warm`` minibatch steps at w = 0
    (v̂ = the noise's per-coordinate second moment there), then the isotropy probe at w = 0 with that P."""
    torch.manual_seed(seed)
    model = Point()
    opt = optim.make("adam", model.parameters(), lr=0.0)
    loss = make_loss(prob)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(warm):
        idx = torch.randperm(N, generator=gen)[:BATCH]
        opt.step(optim.make_closure(opt, lambda: loss(model, {"xi": prob.xi[idx]})))
    return probe(model, prob, opt, seed=seed, step=warm, eps_g=eps_g)


def tune(probs: dict[str, Problem], eps_g: float) -> dict[str, Any]:
    """Per frame and optimizer: the grid value with the fewest mean backprops to escape (budget if none)."""
    res: dict[str, Any] = {}
    for frame, prob in probs.items():
        res[frame] = {}
        for o in OPTIMIZERS:
            trials = []
            for hp in GRID[o]:
                bps = []
                for s in TUNE_SEEDS:
                    r = run(frame, prob, o, hp, s, path=None, eps_g=eps_g)
                    bps.append(r["escape"]["backprops"] if r["escape"] else float("inf"))
                trials.append({"hparams": hp, "backprops": bps, "mean": float(np.mean(bps))})
            best = min(trials, key=lambda t: t["mean"])
            res[frame][o] = {"best": best["hparams"], "trials": trials}
    return res



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/saddle")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--force", action="store_true", help="replace the runs already in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="redo the analysis, figure and README from the runs in --out (keeps the run time)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    probs = {f: Problem(f) for f in FRAMES}
    noise_norm = math.sqrt(float((probs["aligned"].s ** 2).sum()) / BATCH)
    eps_g = 0.05 * noise_norm
    if args.report_only:
        with open(os.path.join(args.out, "summary.json")) as f:
            old = json.load(f)
        args.seeds = old["seeds"]
        with open(os.path.join(args.out, "tuning.json")) as f:
            tuning = json.load(f)
    else:
        prepare_out(args.out, force=args.force)
        tuning = tune(probs, eps_g)
        with open(os.path.join(args.out, "tuning.json"), "w") as f:
            json.dump(tuning, f, indent=1)
    paths = {}
    for frame in FRAMES:
        for o in OPTIMIZERS:
            for seed in args.seeds:
                p = os.path.join(args.out, "runs", f"{frame}-{o}-s{seed}.jsonl")
                if not args.report_only:
                    run(frame, probs[frame], o, tuning[frame][o]["best"], seed, path=p, eps_g=eps_g)
                    print(f"{frame} {o} s{seed} done at {time.perf_counter() - t0:.0f}s", flush=True)
                paths[f"{frame}-{o}-s{seed}"] = p
    summ = analyse(paths, args.seeds)
    if args.report_only:
        summ["frozen"] = old["frozen"]
    else:
        summ["frozen"] = {f: [frozen_saddle(probs[f], s, eps_g) for s in args.seeds] for f in FRAMES}
    summ["tuning"] = tuning
    summ["eps_g"] = eps_g
    seconds = old["seconds"] if args.report_only else time.perf_counter() - t0
    summ["seconds"] = seconds
    plot(summ, os.path.join(args.out, "saddle.png"))
    v = write_readme(args.out, summ, seconds)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summ, f, indent=1)
    print(f"verdict: {v}; {time.perf_counter() - t0:.0f}s; report in {args.out}/README.md")


if __name__ == "__main__":
    main()
