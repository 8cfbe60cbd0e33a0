"""Study 1: R_med along Adam and SGD-with-momentum trajectories, compared at matched training loss.

Claim (Jiang, Malik, Li, "How Does Adaptive Optimization Impact Local Neural Network Geometry?"): where Adam
trains faster than SGD with momentum, its trajectory passes through regions of smaller
``R_med = max_i |h_i| / median_i |h_i|`` (h the Hessian diagonal of a layer), i.e. better-conditioned local
geometry in the diagonal sense.

Set-up: the digits MLP (64 -> 64 -> 64 -> 10, tanh) trained from the same initial weights and data order per
seed by SGD with momentum and by Adam, probed at steps spaced geometrically; R_med per layer and for the
whole model compared where each run first reaches the same training loss. The transformer language-model
half of the claim is not part of this script.

Run::

    python examples/study_rmed.py --out reports/rmed_adam_vs_sgd

writes ``runs/<optimizer>-s<seed>/`` (the run logs), ``rmed_vs_loss.png``, ``summary.json`` and
``README.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find study_common

from study_common import fmt, md_table, mean_std, prepare_out, train_with_probes  # noqa: E402

from geomprobe.demo.data import load_digits_tensors  # noqa: E402
from geomprobe.demo.models import DigitsMLP  # noqa: E402
from geomprobe.report import compare_runs  # noqa: E402
from geomprobe.runs.reader import RunReader  # noqa: E402

OPTIMIZERS: dict[str, dict[str, Any]] = {
    # The demo's learning rates: each is a sensible, stable choice for this problem, neither tuned to win.
    "sgdm": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 3e-3},
}
HIDDEN = (64, 64)
BATCH = 128
STEPS = 1200          # about 107 epochs of the 1438 training digits
PROBES = 14
# Exact diagonal for blocks up to 256 coordinates; larger weight matrices: the median from 192 exact
# coordinates, the max from a 32-probe Bekas screen whose 48 best candidates are recomputed exactly.
RMED = {"exact_threshold": 256, "k": 192, "top": 48, "screen_samples": 32}
LEVELS = 8
WEIGHTS = ("net.0.weight", "net.2.weight", "net.4.weight")
CITATION = ('Jiang, Malik, Li, "How Does Adaptive Optimization Impact Local Neural Network Geometry?" '
            "(NeurIPS 2023)")


def probe_steps(total: int, count: int) -> list[float]:
    """Step 0, then ``count - 1`` steps spaced geometrically up to ``total`` (geometry moves fastest early)."""
    return [0.0] + [float(s) for s in np.unique(np.round(np.geomspace(5, total, count - 1)))]


def run_all(out: str, seeds: list[int]) -> dict[str, list[str]]:
    """Train and probe every optimizer for every seed; returns the run folders per optimizer."""
    X, y, _, _ = load_digits_tensors(seed=0)
    runs: dict[str, list[str]] = {name: [] for name in OPTIMIZERS}
    for seed in seeds:
        for name, hp in OPTIMIZERS.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)        # the same initial weights for both optimizers of a seed
                model = DigitsMLP(HIDDEN)
            run_dir = os.path.join(out, "runs", f"{name}-s{seed}")
            res = train_with_probes(
                model, nn.CrossEntropyLoss(), (X, y), optimizer=name, hparams=hp, batch=BATCH, budget=STEPS,
                probe_at=probe_steps(STEPS, PROBES), metrics={"rmed": RMED}, run_dir=run_dir, seed=seed,
                axis="steps", meta={"model": "DigitsMLP", "hidden": list(HIDDEN)},
            )
            print(f"  {name} seed {seed}: final train loss {res.final_loss:.4f} in {res.seconds:.0f}s",
                  file=sys.stderr)
            runs[name].append(run_dir)
    return runs


def _block_series(run: str, block: str) -> tuple[np.ndarray, np.ndarray]:
    """(probe loss, R_med of ``block``) per probe of one run."""
    recs = RunReader(run).records
    loss = np.array([r["loss"] for r in recs], dtype=float)
    vals = np.array([r["rmed"]["blocks"][block]["rmed"] if r.get("rmed") else np.nan for r in recs], dtype=float)
    return loss, vals


def _at_loss(loss: np.ndarray, vals: np.ndarray, level: float) -> float:
    """The value where the loss first falls to ``level``, linear in the loss between the bracketing probes
    (the same first-passage rule compare_runs uses, applied to a per-layer series)."""
    below = np.nonzero(loss <= level)[0]
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    if i == 0 or loss[i] == level:
        return float(vals[i])
    t = (loss[i - 1] - level) / (loss[i - 1] - loss[i])
    return float(vals[i - 1] + t * (vals[i] - vals[i - 1]))


def analyse(runs: dict[str, list[str]], seeds: list[int], *, weights: list[str] | None = None,
            levels: int | None = None) -> dict[str, Any]:
    """R_med at matched loss: one loss axis for all runs, mean ± std over seeds per optimizer and level.

    ``weights`` (the weight blocks to match per layer) and ``levels`` default to this study's; the LM half
    passes its own."""
    weights = WEIGHTS if weights is None else weights
    names = list(runs)
    flat = [r for n in names for r in runs[n]]
    cmp = compare_runs(flat, by="loss", metrics=["rmed.rmed", "rmed.rmed_q99"],
                       levels=LEVELS if levels is None else levels)
    axis = [float(a) for a in cmp.axis]
    # Drop the first level: every run starts there from the same initial weights, so it says nothing.
    keep = list(range(1, len(axis)))
    per: dict[str, Any] = {"levels": [axis[i] for i in keep], "optimizers": {}}
    for n_i, name in enumerate(names):
        rows = slice(n_i * len(seeds), (n_i + 1) * len(seeds))
        entry: dict[str, Any] = {
            "rmed": cmp.values["rmed.rmed"][rows][:, keep].tolist(),
            "rmed_q99": cmp.values["rmed.rmed_q99"][rows][:, keep].tolist(),
            "steps": cmp.steps_at[rows][:, keep].tolist(),
            "blocks": {},
        }
        for block in weights:
            entry["blocks"][block] = [
                [_at_loss(*_block_series(run, block), axis[i]) for i in keep] for run in runs[name]
            ]
        per["optimizers"][name] = entry
    return per


def _verdict(summary: dict[str, Any]) -> tuple[str, list[str]]:
    """The paper's R_med is per layer, so the verdict rests on the weight layers: reproduced when, in every
    weight layer, Adam's R_med is below SGD's in at least 75% of matched (seed, level) pairs and the
    whole-model seed mean is lower at at least 75% of levels; not reproduced when every layer and the whole
    model show at most 25%; mixed otherwise."""
    a = np.array(summary["optimizers"]["adam"]["rmed"], dtype=float)
    s = np.array(summary["optimizers"]["sgdm"]["rmed"], dtype=float)
    ok = np.isfinite(a) & np.isfinite(s)
    pair = float(np.mean(a[ok] < s[ok])) if ok.any() else float("nan")
    mean_lower = float(np.mean(np.nanmean(a, 0) < np.nanmean(s, 0)))
    sa = np.array(summary["optimizers"]["adam"]["steps"], dtype=float)
    ss = np.array(summary["optimizers"]["sgdm"]["steps"], dtype=float)
    faster = float(np.nanmean(sa < ss))
    # Is the gap of the seed means larger than the seed-to-seed spread?
    gap = np.nanmean(s, 0) - np.nanmean(a, 0)
    spread = np.sqrt((np.nanvar(a, 0, ddof=1) + np.nanvar(s, 0, ddof=1)) / 2)
    clear = [fmt(lv) for lv, g, sd in zip(summary["levels"], gap, spread) if g > sd]
    is_ahead = np.nanmean(sa, 0) < np.nanmean(ss, 0)
    is_lower = np.nanmean(a, 0) < np.nanmean(s, 0)
    ahead = [fmt(lv) for lv, x in zip(summary["levels"], is_ahead) if x]
    lower_ahead, lower_behind = int((is_ahead & is_lower).sum()), int((~is_ahead & is_lower).sum())
    blocks = summary["optimizers"]["adam"]["blocks"]
    # Seed-paired: the same initial weights and data order, compared at the same loss level.
    layer_pair = {b: float(np.nanmean(np.array(blocks[b], dtype=float)
                                      < np.array(summary["optimizers"]["sgdm"]["blocks"][b], dtype=float)))
                  for b in WEIGHTS}
    reasons = [
        f"Adam's whole-model R_med is below SGD's in {pair:.0%} of matched (seed, loss level) pairs and on "
        f"the seed mean at {mean_lower:.0%} of loss levels.",
        f"Adam reaches the matched loss levels in fewer steps in {faster:.0%} of (seed, level) pairs "
        "(the paper's claim is conditional on Adam training faster).",
        f"The gap of the seed means exceeds the pooled seed std only at loss {', '.join(clear) or 'no level'}; "
        "at the other levels the whole-model gap is within one seed std.",
        f"Adam is ahead (fewer seed-mean steps) at loss {', '.join(ahead) or 'no level'}; its seed-mean R_med "
        f"is lower at {lower_ahead} of those {len(ahead)} levels and at {lower_behind} of the other "
        f"{len(summary['levels']) - len(ahead)}.",
        "Per weight layer, Adam's R_med is below SGD's in "
        + ", ".join(f"{v:.0%} ({b})" for b, v in layer_pair.items())
        + " of seed-paired (seed, level) comparisons.",
    ]
    if min(layer_pair.values()) >= 0.75 and mean_lower >= 0.75:
        return "reproduced", reasons
    if max(layer_pair.values()) <= 0.25 and mean_lower <= 0.25:
        return "not reproduced", reasons
    return "mixed", reasons


def plot(runs: dict[str, list[str]], summary: dict[str, Any], path: str) -> None:
    """Left: probe loss against step. Right: whole-model R_med against loss, seeds thin, means with ±std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgdm": "tab:blue", "adam": "tab:orange"}
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, dirs in runs.items():
        for k, run in enumerate(dirs):
            recs = RunReader(run).records
            st = np.array([max(r["step"], 1) for r in recs])
            lo = np.array([r["loss"] for r in recs])
            rm = np.array([r["rmed"]["rmed"] for r in recs])
            ax[0].plot(st, lo, color=colors[name], alpha=0.6, label=name if k == 0 else None)
            ax[1].plot(lo, rm, color=colors[name], alpha=0.25, lw=0.8)
        levels = np.array(summary["levels"])
        r = np.array(summary["optimizers"][name]["rmed"], dtype=float)
        ax[1].errorbar(levels, np.nanmean(r, 0), yerr=np.nanstd(r, 0, ddof=1), color=colors[name], marker="o",
                       capsize=3, label=f"{name}: mean ± std over seeds")
        for j, block in enumerate(WEIGHTS):
            b = np.array(summary["optimizers"][name]["blocks"][block], dtype=float)
            ax[2].plot(levels, np.nanmean(b, 0), color=colors[name], ls=["-", "--", ":"][j], marker=".",
                       label=f"{name} {block}")
    ax[0].set(xscale="log", yscale="log", xlabel="step (log; step 0 drawn at 1)", ylabel="training loss (probe batch)",
              title="training")
    for a in ax[1:]:
        a.set(xscale="log", yscale="log", xlabel="training loss (matched; decreasing →)")
        a.invert_xaxis()
    ax[1].set(ylabel="R_med (whole model)", title="R_med at matched loss")
    ax[2].set(ylabel="R_med per weight layer (seed mean)", title="per layer")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(out: str, summary: dict[str, Any], seeds: list[int], seconds: float) -> str:
    """The study's README from ``summary``; returns the verdict."""
    verdict, reasons = _verdict(summary)
    levels = summary["levels"]
    opt = summary["optimizers"]
    rows = []
    for i, lv in enumerate(levels):
        row = [fmt(lv)]
        for name in OPTIMIZERS:
            for key in ("steps", "rmed", "rmed_q99"):
                m, s = mean_std([v[i] for v in opt[name][key]])
                row.append(f"{m:.0f} ± {s:.0f}" if key == "steps" else f"{fmt(m)} ± {fmt(s, 2)}")
        rows.append(row)
    main = md_table(["loss", "SGDm steps", "SGDm R_med", "SGDm R_q99", "Adam steps", "Adam R_med", "Adam R_q99"],
                    rows)
    brow = []
    for i, lv in enumerate(levels):
        row = [fmt(lv)]
        for block in WEIGHTS:
            for name in OPTIMIZERS:
                m, s = mean_std([v[i] for v in opt[name]["blocks"][block]])
                row.append(f"{fmt(m)} ± {fmt(s, 2)}")
        brow.append(row)
    bhead = ["loss"] + [f"{'SGDm' if n == 'sgdm' else 'Adam'} {b}" for b in WEIGHTS for n in OPTIMIZERS]
    text = f"""# Study 1 — R_med along Adam and SGD-with-momentum trajectories (digits MLP)

**Verdict: {verdict}** for the digits MLP; the transformer language-model part was not run.

## Claim

{CITATION}: along trajectories where Adam trains faster than SGD with momentum, the local geometry Adam
visits has a smaller `R_med = max_i |h_i| / median_i |h_i|` (h: the Hessian diagonal of a layer) than SGD's,
compared at the same training loss. The paper's evidence is mainly language models (transformers); this
study tests the direction on a small MLP only. **The transformer language-model half of the claim was not run
here** (no time in this round; it remains to do).

## Set-up

- Data: scikit-learn's digits (1438 training images, pixels standardized), no download.
- Model: `DigitsMLP` 64 → 64 → 64 → 10 with tanh (8,970 weights), the same initial weights and minibatch order
  for both optimizers of a seed.
- Optimizers: SGD with momentum (lr 0.05, momentum 0.9) and Adam (lr 3e-3, betas 0.9/0.999), batch {BATCH},
  {STEPS} steps each (~107 epochs). Learning rates are the package demo's, not tuned for this study.
- Seeds: {", ".join(map(str, seeds))} ({len(seeds)} seeds; seed = initial weights, data order and probe sampling).
- Probes: {PROBES} per run at steps spaced geometrically; the Hessian of the cross-entropy on 512 fixed
  training images (eval mode). R_med options `{json.dumps(RMED)}`: blocks of ≤ 256 coordinates (biases, none
  of the weights) get their exact diagonal; weight matrices get the median from 192 exactly computed random
  coordinates and the max by a Bekas screen with the 48 top candidates recomputed exactly (the max is exact
  for the coordinates computed, so R_med is if anything slightly low). Whole-model R_med pools every block's
  diagonal.
- Matching: `geomprobe.report.compare_runs(..., by="loss")` puts all {2 * len(seeds)} runs on one geometric
  grid of {LEVELS} loss levels; each run's value at a level is interpolated where it first reaches that loss.
  The first level (the shared initial point) is dropped. Per-layer values use the same first-passage rule.

## Results

Whole model, mean ± std over seeds at matched training loss (steps: where each run first got there):

{main}

Per weight layer, R_med mean ± std over seeds at matched loss:

{md_table(bhead, brow)}

![R_med against matched loss](rmed_vs_loss.png)

## Verdict: {verdict}

{chr(10).join("- " + r for r in reasons)}
- Scope: one small tanh MLP on an easy data set, both optimizers with untuned demo learning rates; the
  paper's claim is about language models, where Adam's advantage is large. A result here in either
  direction says little about transformers; the language-model half is still to run.

## Reproduce

`python examples/study_rmed.py --out reports/rmed_adam_vs_sgd --force` — measured wall time
{seconds / 60:.1f} min on 2 shared CPU cores (torch CPU). Run logs (JSONL) are in `runs/`, the numbers above
in `summary.json`.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    return verdict


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the study and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/rmed_adam_vs_sgd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--force", action="store_true", help="replace the runs already in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="redo the analysis, figure and README from the runs already in --out (keeps the "
                             "measured run time from its summary.json)")
    args = parser.parse_args(argv)
    # One thread: the model is too small for intra-op parallelism to pay (on a busy 2-core machine two
    # threads made each probe 10-40x slower), and it leaves a core free.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.report_only:
        with open(os.path.join(args.out, "summary.json")) as f:
            old = json.load(f)
        args.seeds = old["seeds"]
        runs = {n: [os.path.join(args.out, "runs", f"{n}-s{s}") for s in args.seeds] for n in OPTIMIZERS}
    else:
        prepare_out(args.out, force=args.force)
        runs = run_all(args.out, args.seeds)
    summary = analyse(runs, args.seeds)
    seconds = old["seconds"] if args.report_only else time.perf_counter() - t0
    summary["seconds"] = seconds
    summary["seeds"] = args.seeds
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(runs, summary, os.path.join(args.out, "rmed_vs_loss.png"))
    verdict = write_readme(args.out, summary, args.seeds, seconds)
    print(f"verdict: {verdict}; {time.perf_counter() - t0:.0f}s; report in {args.out}/README.md")


if __name__ == "__main__":
    main()
