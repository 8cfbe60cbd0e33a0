"""Study 1, language-model half: R_med along Adam and SGD-with-momentum trajectories of a small causal
transformer on a character-level corpus from the Python standard library, compared at matched training loss.

Claim (Jiang, Malik, Li, "How Does Adaptive Optimization Impact Local Neural Network Geometry?"): where Adam
trains faster than SGD with momentum, its trajectory passes through regions of smaller
``R_med = max_i |h_i| / median_i |h_i|`` (h the Hessian diagonal of a layer).

Reuses the corpus and the transformer of ``study_tail_index.py`` and the training loop and matching rule of
``study_common.py`` / ``study_rmed.py``. Run::

    python examples/study_rmed_lm.py --out reports/rmed_adam_vs_sgd_lm

writes ``runs/<optimizer>-s<seed>/``, ``rmed_vs_loss.png``, ``summary.json`` and ``README.md`` in ``--out``.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find the study modules

from study_common import fmt, md_table, mean_std, prepare_out, train_with_probes  # noqa: E402
from study_rmed import CITATION, probe_steps  # noqa: E402
from study_rmed import analyse as analyse_rmed  # noqa: E402
from study_tail_index import CONTEXT, VOCAB, CharTransformer, stdlib_corpus  # noqa: E402

from geomprobe.runs.reader import RunReader  # noqa: E402

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgdm": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 3e-3},
}
D_MODEL, HEADS, LAYERS = 16, 4, 1   # sized so 6 runs x 8 probes fit in 8 minutes on one CPU thread
BATCH = 32
STEPS = 600
PROBES = 8
PROBE_SAMPLES = 16                    # sequences of CONTEXT characters in the probe's fixed batch
RMED = {"exact_threshold": 256, "k": 128, "top": 16, "screen_samples": 16}   # the demo's cheap options
LEVELS = 8
WEIGHTS = ("tok.weight", "blocks.0.qkv.weight", "blocks.0.proj.weight", "blocks.0.mlp.0.weight",
           "blocks.0.mlp.2.weight", "head.weight")


class SequenceCE(nn.Module):
    """Mean next-character cross-entropy over every position: logits (B, T, V), targets (B, T)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def run_all(out: str, seeds: list[int]) -> tuple[dict[str, list[str]], dict[str, Any]]:
    X, Y, info = stdlib_corpus(seed=0)
    runs: dict[str, list[str]] = {name: [] for name in OPTIMIZERS}
    for seed in seeds:
        for name, hp in OPTIMIZERS.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)        # the same initial weights for both optimizers of a seed
                model = CharTransformer(VOCAB, CONTEXT, d=D_MODEL, heads=HEADS, layers=LAYERS)
            info["params"] = sum(p.numel() for p in model.parameters())
            run_dir = os.path.join(out, "runs", f"{name}-s{seed}")
            res = train_with_probes(
                model, SequenceCE(), (X, Y), optimizer=name, hparams=hp, batch=BATCH, budget=STEPS,
                probe_at=probe_steps(STEPS, PROBES), metrics={"rmed": RMED}, run_dir=run_dir, seed=seed,
                axis="steps", probe_samples=PROBE_SAMPLES,
                meta={"model": "CharTransformer", "d": D_MODEL, "heads": HEADS, "layers": LAYERS},
            )
            print(f"  {name} seed {seed}: final train loss {res.final_loss:.4f} in {res.seconds:.0f}s",
                  file=sys.stderr)
            runs[name].append(run_dir)
    return runs, info


def analyse(runs: dict[str, list[str]], seeds: list[int]) -> dict[str, Any]:
    """study_rmed.analyse on this half's layers and levels, plus each run's final training loss."""
    per = analyse_rmed(runs, seeds, weights=WEIGHTS, levels=LEVELS)
    for name, entry in per["optimizers"].items():
        entry["final_train_loss"] = [RunReader(r).records[-1]["train_loss"] for r in runs[name]]
    return per


def verdict(summary: dict[str, Any]) -> tuple[str, list[str], dict[str, float]]:
    """Same criteria as study_rmed: reproduced when every weight layer has Adam lower in >= 75% of
    seed-paired (seed, level) comparisons and the whole-model seed mean is lower at >= 75% of levels;
    not reproduced when all of them are <= 25%; mixed otherwise."""
    o = summary["optimizers"]
    a, s = np.array(o["adam"]["rmed"], float), np.array(o["sgdm"]["rmed"], float)
    ok = np.isfinite(a) & np.isfinite(s)
    pair = float(np.mean(a[ok] < s[ok])) if ok.any() else float("nan")
    mean_lower = float(np.mean(np.nanmean(a, 0) < np.nanmean(s, 0)))
    sa, ss = np.array(o["adam"]["steps"], float), np.array(o["sgdm"]["steps"], float)
    both = np.isfinite(sa) & np.isfinite(ss)
    faster = float(np.mean(sa[both] < ss[both])) if both.any() else float("nan")
    reached = {n: float(np.mean(np.isfinite(np.array(o[n]["steps"], float)))) for n in o}
    layer = {}
    for b in WEIGHTS:
        x, y = np.array(o["adam"]["blocks"][b], float), np.array(o["sgdm"]["blocks"][b], float)
        m = np.isfinite(x) & np.isfinite(y)
        layer[b] = float(np.mean(x[m] < y[m])) if m.any() else float("nan")
    fin = {n: float(np.mean(o[n]["final_train_loss"])) for n in o}
    reasons = [
        f"Speed: after {STEPS} steps the full-training-set loss is {fin['adam']:.3f} (Adam) vs "
        f"{fin['sgdm']:.3f} (SGDm), seed means; where both reach a matched level, Adam gets there first in "
        f"{faster:.0%} of (seed, level) pairs; Adam reaches {reached['adam']:.0%} and SGDm {reached['sgdm']:.0%}"
        " of the (seed, level) cells.",
        f"Whole model: Adam's R_med is below SGD's in {pair:.0%} of matched (seed, level) pairs with both "
        f"values, and on the seed mean at {mean_lower:.0%} of levels.",
        "Per weight layer, Adam's R_med is below SGD's in "
        + ", ".join(f"{v:.0%} ({b})" for b, v in layer.items()) + " of seed-paired comparisons.",
    ]
    stats = {"pair": pair, "mean_lower": mean_lower, "adam_faster": faster, **{f"layer:{k}": v for k, v in layer.items()}}
    finite = [v for v in layer.values() if np.isfinite(v)]
    if finite and min(finite) >= 0.75 and mean_lower >= 0.75:
        return "reproduced", reasons, stats
    if finite and max(finite) <= 0.25 and mean_lower <= 0.25:
        return "not reproduced", reasons, stats
    return "mixed", reasons, stats


def plot(runs: dict[str, list[str]], summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgdm": "tab:blue", "adam": "tab:orange"}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = np.array(summary["levels"])
    for name, dirs in runs.items():
        for k, run in enumerate(dirs):
            recs = RunReader(run).records
            ax[0].plot([max(r["step"], 1) for r in recs], [r["train_loss"] for r in recs], color=colors[name],
                       alpha=0.6, label=name if k == 0 else None)
            ax[1].plot([r["loss"] for r in recs], [r["rmed"]["rmed"] for r in recs], color=colors[name],
                       alpha=0.25, lw=0.8)
        r = np.array(summary["optimizers"][name]["rmed"], float)
        ax[1].errorbar(levels, np.nanmean(r, 0), yerr=np.nanstd(r, 0, ddof=1), color=colors[name], marker="o",
                       capsize=3, label=f"{name}: mean ± std over seeds")
    ax[0].set(xscale="log", xlabel="step (log; step 0 at 1)", ylabel="training loss (full set)", title="training")
    ax[1].set(xscale="log", yscale="log", xlabel="training loss (matched; decreasing →)",
              ylabel="R_med (whole model)", title="R_med at matched loss")
    ax[1].invert_xaxis()
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(out: str, summary: dict[str, Any], seeds: list[int], seconds: float) -> str:
    v, reasons, stats = verdict(summary)
    summary["verdict"], summary["verdict_stats"] = v, stats
    o, levels = summary["optimizers"], summary["levels"]
    rows = []
    for i, lv in enumerate(levels):
        row = [fmt(lv)]
        for name in OPTIMIZERS:
            for key in ("steps", "rmed", "rmed_q99"):
                m, s = mean_std([x[i] for x in o[name][key]])
                row.append(f"{fmt(m)} ± {fmt(s, 2)}" if key != "steps" else
                           ("-" if not np.isfinite(m) else f"{m:.0f} ± {s:.0f}"))
        rows.append(row)
    main = md_table(["loss", "SGDm steps", "SGDm R_med", "SGDm R_q99", "Adam steps", "Adam R_med", "Adam R_q99"],
                    rows)
    brows = []
    for b in WEIGHTS:
        for i, lv in enumerate(levels):
            row = [b, fmt(lv)]
            for name in OPTIMIZERS:
                m, s = mean_std([x[i] for x in o[name]["blocks"][b]])
                row.append(f"{fmt(m)} ± {fmt(s, 2)}")
            brows.append(row)
    info = summary["corpus"]
    text = f"""# Study 1 (language model) — R_med along Adam and SGD-with-momentum trajectories of a char transformer

**Verdict: {v}** (3 seeds, a {info['params']:,}-weight one-block causal transformer; see the reasons below).
The digits-MLP half is in [../rmed_adam_vs_sgd/README.md](../rmed_adam_vs_sgd/README.md).

## Claim

{CITATION}: along trajectories where Adam trains faster than SGD with momentum, the local geometry Adam
visits has a smaller `R_med = max_i |h_i| / median_i |h_i|` (h: the Hessian diagonal of a layer) than SGD's,
compared at the same training loss. The paper's evidence is mainly transformer language models.

## Set-up

- Data: next-character prediction on {info['chars']:,} characters of the Python {info['python']} standard library's
  own source ({", ".join(info['files'])}), vocabulary {VOCAB} (47 most frequent characters + one for the rest),
  4096 windows of {CONTEXT} characters (`study_tail_index.stdlib_corpus`), no download.
- Model: `study_tail_index.CharTransformer` with d = {D_MODEL}, {HEADS} heads, {LAYERS} pre-norm block (causal
  attention + GELU MLP), {info['params']:,} weights; the same initial weights and minibatch order for both
  optimizers of a seed. Kept this small so that the whole study runs in under 8 minutes on one CPU thread.
- Optimizers: SGD with momentum (lr {OPTIMIZERS['sgdm']['lr']}, momentum 0.9) and Adam (lr {OPTIMIZERS['adam']['lr']}, betas
  0.9/0.999), batch {BATCH} sequences, {STEPS} steps each. Reasonable, untuned learning rates.
- Seeds: {", ".join(map(str, seeds))}.
- Probes: {PROBES} per run at steps spaced geometrically (0 … {STEPS}); Hessian of the cross-entropy on
  {PROBE_SAMPLES} fixed training windows ({PROBE_SAMPLES * CONTEXT} characters), eval mode. R_med options
  `{json.dumps(RMED)}` (the package demo's cheap setting): blocks ≤ 256 coordinates exact, larger weight
  matrices: median from 128 exactly computed coordinates, max from a 16-probe Bekas screen with 16 candidates
  recomputed exactly. Whole-model R_med pools every block's diagonal.
- Matching: as in the digits study — `geomprobe.report.compare_runs(..., by="loss")` on one geometric grid of
  {LEVELS} loss levels (first, shared initial level dropped); each run's value interpolated where it first
  reaches the level; per-layer values by the same first-passage rule. "-" = no run of that optimizer got there.

## Results

Whole model, mean ± std over seeds at matched training loss (probe-batch loss; steps: where each run first got there):

{main}

Per weight layer, R_med mean ± std over seeds at matched loss:

{md_table(["layer", "loss", "SGDm R_med", "Adam R_med"], brows)}

![R_med against matched loss](rmed_vs_loss.png)

## Verdict: {v}

{chr(10).join("- " + r for r in reasons)}
- Criteria (same as the digits study): reproduced when every weight layer has Adam lower in ≥ 75 % of
  seed-paired comparisons and the whole-model seed mean is lower at ≥ 75 % of levels; not reproduced when all
  are ≤ 25 %; mixed otherwise.
- Scope: a very small one-block transformer trained for {STEPS} steps with the cheap R_med estimator and a
  {PROBE_SAMPLES}-window probe batch, 3 seeds — far from the paper's scale. Levels reached by only one
  optimizer contribute no paired comparison.

## Reproduce

`python examples/study_rmed_lm.py --out reports/rmed_adam_vs_sgd_lm --force` — measured wall time
{seconds / 60:.1f} min on 2 CPU cores (torch CPU, one thread). Run logs (JSONL) are in `runs/`, the numbers above in
`summary.json`.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    return v


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/rmed_adam_vs_sgd_lm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--force", action="store_true", help="replace the runs already in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="redo the analysis, figure and README from the runs in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.report_only:
        with open(os.path.join(args.out, "summary.json")) as f:
            old = json.load(f)
        args.seeds, info = old["seeds"], old["corpus"]
        runs = {n: [os.path.join(args.out, "runs", f"{n}-s{s}") for s in args.seeds] for n in OPTIMIZERS}
    else:
        prepare_out(args.out, force=args.force)
        runs, info = run_all(args.out, args.seeds)
    summary = analyse(runs, args.seeds)
    seconds = old["seconds"] if args.report_only else time.perf_counter() - t0
    summary.update(seconds=seconds, seeds=args.seeds, corpus=info)
    plot(runs, summary, os.path.join(args.out, "rmed_vs_loss.png"))
    v = write_readme(args.out, summary, args.seeds, seconds)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"verdict: {v}; {time.perf_counter() - t0:.0f}s; report in {args.out}/README.md")


if __name__ == "__main__":
    main()
