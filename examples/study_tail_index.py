"""Study 4: the tail index α of stochastic-gradient noise, for a CNN and for an attention model.

Claims: Simsekli, Sagun, Gurbuzbalaban 2019 ("A tail-index analysis of stochastic gradient noise in deep
neural networks"): gradient noise is heavy-tailed, its α̂ (pooled over all coordinates) well below 2.
Zhang et al. 2020 ("Why are adaptive methods good for attention models?"): the noise is heavy-tailed for
attention models and near-Gaussian for CNNs.

Set-up: a small CNN on scikit-learn's digits (8x8 as 1-channel images) and a 2-layer causal transformer on a
character-level corpus built from a few of the Python standard library's own source files, each trained
briefly with SGD (momentum) and with Adam. At a few steps along training the ``noise`` metric takes P
minibatch gradients of the training batch size at the frozen weights and reports α̂ pooled (Simsekli's
number), α̂ standardized (each coordinate divided by its std first: the robust one), their gap (the
scale-heterogeneity caveat), α̂ per block and Hill's exponent of the noise norms. A control gives the
pooled α̂ of *Gaussian* noise with the same per-coordinate scales: what scale heterogeneity alone produces.

Run::

    python examples/study_tail_index.py --out reports/tail_index

writes ``runs/<model>-<optimizer>-s<seed>.jsonl`` (one record per probe), ``tail_index.png``,
``summary.json`` and ``README.md`` in ``--out``.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: find study_common

from study_common import fmt, md_table, mean_std, prepare_out  # noqa: E402

from geomprobe import Landscape  # noqa: E402
from geomprobe.demo.data import load_digits_tensors  # noqa: E402
from geomprobe.engine.persample import sample_minibatches  # noqa: E402
from geomprobe.metrics.noise import HETEROGENEITY_GAP, noise, noise_tail_indices
from geomprobe.stats.tails import sample_sas

CITATIONS = {
    "simsekli": 'Simsekli, Sagun, Gurbuzbalaban, "A tail-index analysis of stochastic gradient noise in deep '
                'neural networks" (ICML 2019)',
    "zhang": 'Zhang, Karimireddy, Veit, Kim, Reddi, Kumar, Sra, "Why are adaptive methods good for attention '
             'models?" (NeurIPS 2020)',
}
# The standard library files the corpus is read from (relative to os.path.dirname(os.__file__)).
CORPUS_FILES = ("os.py", "functools.py", "argparse.py", "textwrap.py", "collections/__init__.py")
CORPUS_CHARS = 300_000
VOCAB = 48            # the 47 most frequent characters, and one for every other
CONTEXT = 32
LM_SEQUENCES = 4096   # training windows of CONTEXT + 1 characters
BATCH = 32            # training batch size of both models (and of every noise sample)
P = 128               # noise samples (minibatches) per probe
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"steps": 600, "probe_at": [0, 30, 150, 600],
            "optimizers": {"sgdm": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 2e-3}}},
    "transformer": {"steps": 800, "probe_at": [0, 40, 200, 800],
                    "optimizers": {"sgdm": {"lr": 0.1, "momentum": 0.9}, "adam": {"lr": 2e-3}}},
}
LABELS = {"cnn": "CNN (digits)", "transformer": "transformer (stdlib chars)", "sgdm": "SGDm", "adam": "Adam"}
HEAVY = 1.8           # α̂ below this: a tail clearly heavier than Gaussian (α = 2) at these sample sizes


# ----------------------------------------------------------------------------- models and data

class DigitsCNN(nn.Module):
    """1x8x8 -> conv3x3(16) -> ReLU -> conv3x3(32) -> ReLU -> maxpool2 -> linear(512 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm and a linear read-out."""

    def __init__(self, vocab: int, context: int, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-character cross-entropy over every position of the batch."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def cnn_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def stdlib_corpus(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``LM_SEQUENCES`` windows (inputs, next-character targets) from the standard library's own source."""
    root = os.path.dirname(os.__file__)
    text = ""
    for name in CORPUS_FILES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text += f.read()
    text = text[:CORPUS_CHARS]
    chars, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), return_counts=True)
    keep = chars[np.argsort(-counts, kind="stable")][: VOCAB - 1]
    lut = {int(c): i for i, c in enumerate(keep)}
    codes = torch.tensor([lut.get(ord(c), VOCAB - 1) for c in text], dtype=torch.long)
    starts = torch.randint(0, len(codes) - CONTEXT - 1, (LM_SEQUENCES,),
                           generator=torch.Generator().manual_seed(seed))
    win = torch.stack([codes[s: s + CONTEXT + 1] for s in starts.tolist()])
    info = {"files": list(CORPUS_FILES), "chars": len(text), "python": sys.version.split()[0],
            "unknown_share": float((codes == VOCAB - 1).float().mean())}
    return win[:, :-1].contiguous(), win[:, 1:].contiguous(), info


def build(model_name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN() if model_name == "cnn" else CharTransformer(VOCAB, CONTEXT)


# ----------------------------------------------------------------------------- probing

def gaussian_control(land: Landscape, batches: list, seed: int, columns: int) -> dict[str, Any]:
    """α̂ pooled/standardized of *Gaussian* noise with the measured per-coordinate stds: the pooled α̂ that
    unequal scales alone would give (no heavy tail anywhere)."""
    rows = []
    for p, b in enumerate(batches):
        with land.frozen(p):
            g = torch.autograd.grad(land.loss_on(b), land.params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(q) if x is None else x).reshape(-1)
                               for q, x in zip(land.params, g)]).double())
    G = torch.stack(rows)
    sd = G.std(0)
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randperm(G.shape[1], generator=gen)[:columns]
    fake = torch.randn(G.shape[0], len(cols), generator=gen, dtype=torch.float64) * sd[cols]
    out = noise_tail_indices(fake, seed=seed)
    log_sd = torch.log(sd[cols][sd[cols] > 0])
    return {"alpha_pooled": out["alpha_pooled"], "alpha_standardized": out["alpha_standardized"],
            "log_scale_sd": float(log_sd.std())}


def probe(model: nn.Module, loss_fn, data: tuple, *, seed: int, step: int) -> dict[str, Any]:
    """The noise metric at the current weights from P fresh minibatches of the training batch size."""
    X, Y = data
    idx = torch.randperm(len(Y), generator=torch.Generator().manual_seed(10_000 + seed))[:512]
    land = Landscape(model, loss_fn, (X[idx], Y[idx]), hvp_method="finite-difference")
    batches = sample_minibatches((X, Y), BATCH, P, seed=1000 * seed + step)
    out = noise(land, noise_data=batches, max_samples=P, dataset_size=len(Y), seed=seed)
    cols = out["coordinates"]
    out["gaussian_control"] = gaussian_control(land, batches, seed, cols)
    out["probe_loss"] = land.loss
    return out


def train(model_name: str, opt_name: str, seed: int, data: tuple, out_dir: str) -> str:
    """Train with minibatches drawn without replacement; probe the noise at ``probe_at`` steps; JSONL log."""
    cfg = MODELS[model_name]
    loss_fn = cnn_loss if model_name == "cnn" else lm_loss
    model = build(model_name, seed)
    hp = cfg["optimizers"][opt_name]
    opt = (torch.optim.SGD(model.parameters(), **hp) if opt_name == "sgdm"
           else torch.optim.Adam(model.parameters(), **hp))
    X, Y = data
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(Y), generator=gen), 0
    path = os.path.join(out_dir, "runs", f"{model_name}-{opt_name}-s{seed}.jsonl")
    t0 = time.perf_counter()
    with open(path, "w") as log:
        log.write(json.dumps({"meta": {"model": model_name, "optimizer": opt_name, "hparams": hp, "seed": seed,
                                       "batch": BATCH, "steps": cfg["steps"], "P": P,
                                       "params": sum(p.numel() for p in model.parameters())}}) + "\n")
        for step in range(cfg["steps"] + 1):
            if step in cfg["probe_at"]:
                rec = probe(model, loss_fn, data, seed=seed, step=step)
                model.eval()
                with torch.no_grad():
                    rec["train_loss"] = float(loss_fn(model, (X, Y)))
                model.train()
                rec["step"] = step
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(f"  {model_name} {opt_name} s{seed} step {step}: loss {rec['train_loss']:.3f} "
                      f"α pooled {fmt(rec['alpha_pooled'])} std {fmt(rec['alpha_standardized'])} "
                      f"hill {fmt(rec['hill_alpha'])} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
            if step == cfg["steps"]:
                break
            if cursor + BATCH > len(Y):
                order, cursor = torch.randperm(len(Y), generator=gen), 0
            idx = order[cursor: cursor + BATCH]
            cursor += BATCH
            opt.zero_grad()
            loss = loss_fn(model, (X[idx], Y[idx]))
            loss.backward()
            opt.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{model_name} {opt_name} diverged at step {step}")
    return path


def calibrate(seed: int = 0, columns: int = 4000) -> list[dict[str, float]]:
    """What the estimators give at this study's sample shape (P samples × ``columns`` coordinates) on
    symmetric α-stable noise of known α, with equal scales and with log-normal scales (sd of log-scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for a in (1.2, 1.5, 1.8, 2.0):
        x = sample_sas(a, P * columns, gen).reshape(P, columns).double()
        eq = noise_tail_indices(x, seed=seed)
        ln = noise_tail_indices(x * torch.exp(torch.randn(columns, generator=gen, dtype=torch.float64)), seed=seed)
        rows.append({"alpha": a, "pooled": eq["alpha_pooled"], "standardized": eq["alpha_standardized"],
                     "pooled_lognormal": ln["alpha_pooled"], "standardized_lognormal": ln["alpha_standardized"]})
    return rows


def read_run(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    return lines[0]["meta"], lines[1:]


# ----------------------------------------------------------------------------- analysis and report

KEYS = ("train_loss", "alpha_pooled", "alpha_standardized", "gap", "hill_alpha", "noise_scale")


def analyse(paths: dict[str, str], seeds: list[int]) -> dict[str, Any]:
    """Per (model, optimizer, step): the seed values of each quantity, the Gaussian control, per-block α̂."""
    rows: dict[str, Any] = {}
    for key, path in paths.items():
        meta, recs = read_run(path)
        m, o = meta["model"], meta["optimizer"]
        entry = rows.setdefault(f"{m}/{o}", {"model": m, "optimizer": o, "params": meta["params"], "steps": {}})
        for r in recs:
            s = entry["steps"].setdefault(str(r["step"]), {k: [] for k in KEYS + ("control_pooled",
                                                                                "control_std", "log_scale_sd",
                                                                                "flag", "hill_lo", "hill_hi",
                                                                                "block_std", "block_pooled")})
            for k in KEYS:
                s[k].append(r.get(k))
            s["control_pooled"].append(r["gaussian_control"]["alpha_pooled"])
            s["control_std"].append(r["gaussian_control"]["alpha_standardized"])
            s["log_scale_sd"].append(r["gaussian_control"]["log_scale_sd"])
            s["flag"].append(bool(r["scale_heterogeneity"]))
            s["hill_lo"].append(r.get("hill_alpha_lo"))
            s["hill_hi"].append(r.get("hill_alpha_hi"))
            s["block_std"].append({b: v["alpha_standardized"] for b, v in r["blocks"].items()})
            s["block_pooled"].append({b: v["alpha"] for b, v in r["blocks"].items()})
    return {"runs": rows, "seeds": seeds, "P": P, "batch": BATCH}


def _vals(runs: dict, model: str, key: str, trained_only: bool = True) -> list[float]:
    out = []
    for entry in runs.values():
        if entry["model"] != model:
            continue
        for step, s in entry["steps"].items():
            if trained_only and int(step) == 0:
                continue
            out += [v for v in s[key] if v is not None]
    return out


def verdict(summary: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    """Simsekli: pooled α̂ well below 2 (< HEAVY) at the trained probes of both models. Real heavy tails:
    standardized α̂ < HEAVY too. Zhang: the transformer's standardized α̂ < HEAVY while the CNN's stays ≥ HEAVY
    (near-Gaussian). Reproduced: both claims hold with standardized α̂; not reproduced: neither the pooled
    nor the standardized α̂ is below HEAVY anywhere and there is no CNN/transformer contrast; mixed otherwise."""
    runs = summary["runs"]
    st: dict[str, Any] = {}
    for m in MODELS:
        st[m] = {k: mean_std(_vals(runs, m, k)) for k in ("alpha_pooled", "alpha_standardized", "gap",
                                                           "hill_alpha", "control_pooled")}
        st[m]["pooled_heavy_share"] = float(np.mean(np.array(_vals(runs, m, "alpha_pooled")) < HEAVY))
        st[m]["std_heavy_share"] = float(np.mean(np.array(_vals(runs, m, "alpha_standardized")) < HEAVY))
        st[m]["flag_share"] = float(np.mean(_vals(runs, m, "flag")))
        bl = [v for s in _vals(runs, m, "block_std") for v in s.values() if v is not None]
        st[m]["block_std_min"] = float(min(bl)) if bl else float("nan")
        st[m]["block_std_heavy_share"] = float(np.mean(np.array(bl) < HEAVY)) if bl else float("nan")
    c, t = st["cnn"], st["transformer"]
    simsekli_pooled = c["pooled_heavy_share"] >= 0.75 and t["pooled_heavy_share"] >= 0.75
    heavy_t = t["std_heavy_share"] >= 0.75
    heavy_c = c["std_heavy_share"] >= 0.75
    gauss_c = c["std_heavy_share"] <= 0.25
    zhang = heavy_t and gauss_c and t["alpha_standardized"][0] < c["alpha_standardized"][0] - 0.2
    reasons = [
        f"Pooled α̂ (Simsekli's estimator) at the trained probes: CNN {fmt(c['alpha_pooled'][0])} ± "
        f"{fmt(c['alpha_pooled'][1], 2)} (below {HEAVY} in {c['pooled_heavy_share']:.0%} of probes), transformer "
        f"{fmt(t['alpha_pooled'][0])} ± {fmt(t['alpha_pooled'][1], 2)} (below {HEAVY} in "
        f"{t['pooled_heavy_share']:.0%}).",
        f"Standardized α̂ (each coordinate divided by its std): CNN {fmt(c['alpha_standardized'][0])} ± "
        f"{fmt(c['alpha_standardized'][1], 2)}, transformer {fmt(t['alpha_standardized'][0])} ± "
        f"{fmt(t['alpha_standardized'][1], 2)}; below {HEAVY} in {c['std_heavy_share']:.0%} (CNN) and "
        f"{t['std_heavy_share']:.0%} (transformer) of trained probes.",
        f"Scale-heterogeneity gap (standardized − pooled): CNN {fmt(c['gap'][0])}, transformer "
        f"{fmt(t['gap'][0])}; flagged (> {HETEROGENEITY_GAP}) in {c['flag_share']:.0%} (CNN) and "
        f"{t['flag_share']:.0%} (transformer) of trained probes. Gaussian noise with the measured "
        f"per-coordinate scales gives a pooled α̂ of {fmt(c['control_pooled'][0])} (CNN) and "
        f"{fmt(t['control_pooled'][0])} (transformer): that much of the low pooled α̂ needs no heavy tail.",
        f"Per block, the standardized α̂ goes as low as {fmt(c['block_std_min'])} (CNN) and "
        f"{fmt(t['block_std_min'])} (transformer); below {HEAVY} in {c['block_std_heavy_share']:.0%} and "
        f"{t['block_std_heavy_share']:.0%} of (block, probe) pairs.",
        f"Hill's exponent of the noise norms ‖ξ_p‖: CNN {fmt(c['hill_alpha'][0])}, transformer "
        f"{fmt(t['hill_alpha'][0])} (a heavy-tailed noise vector would give a small exponent, ≲ 2; large values "
        "mean the norms are concentrated, as for Gaussian noise in many dimensions).",
    ]
    for m in MODELS:
        pairs = [(lo, a) for e in runs.values() if e["model"] == m for k, sv in e["steps"].items() if int(k) > 0
                 for lo, a in zip(sv["train_loss"], sv["alpha_standardized"]) if a is not None]
        early = [a for lo, a in pairs if lo >= 0.1]
        late = [a for lo, a in pairs if lo < 0.1]
        st[m]["std_loss_ge_0.1"], st[m]["std_loss_lt_0.1"] = mean_std(early), mean_std(late)
        reasons.append(
            f"{LABELS[m]}: standardized α̂ {fmt(mean_std(early)[0])} over {len(early)} trained probes with "
            f"training loss ≥ 0.1 and {fmt(mean_std(late)[0])} over {len(late)} probes below 0.1.")
        worst = [(d[b], sd.get(b), b) for e in runs.values() if e["model"] == m for k, sv in e["steps"].items()
                 if int(k) > 0 for d, sd in zip(sv["block_pooled"], sv["block_std"]) for b in d
                 if d[b] is not None]
        if worst:
            lo = min(worst, key=lambda w: w[0])
            reasons.append(f"{LABELS[m]}: the lowest per-block pooled α̂ at a trained probe is {fmt(lo[0])} in "
                           f"`{lo[2]}`, whose standardized α̂ there is {fmt(lo[1])}."
                           + (" The key third of `qkv.bias` has zero gradient in exact arithmetic (softmax "
                              "ignores a constant added to all of a query's scores), so its noise is round-off "
                              "(~1e-11) beside the query and value biases: pure scale heterogeneity."
                              if lo[2].endswith("qkv.bias") else ""))
    cal = summary.get("calibration")
    if cal:
        reasons.append(
            "Calibration at this sample shape (P = " + str(P) + " × 4000 SαS values, table above): the "
            "standardized α̂ reads " + ", ".join(f"{fmt(r['standardized'])} for α = {r['alpha']}" for r in cal)
            + " — biased towards 2 for heavy tails (each column is divided by a std its own outliers inflate), "
            "so it understates heavy tails rather than inventing them; the pooled α̂ is unbiased at equal scales "
            "but reads " + ", ".join(f"{fmt(r['pooled_lognormal'])}" for r in cal)
            + " for the same α with log-normal scales.")
    if simsekli_pooled and heavy_t and zhang:
        v = "reproduced"
    elif not simsekli_pooled and c["std_heavy_share"] <= 0.25 and t["std_heavy_share"] <= 0.25 and \
            c["pooled_heavy_share"] <= 0.25 and t["pooled_heavy_share"] <= 0.25:
        v = "not reproduced"
    else:
        v = "mixed"
    reasons.append(
        "Simsekli's pooled claim (pooled α̂ < " + str(HEAVY) + " in ≥ 75% of trained probes) "
        + ("holds for both models" if simsekli_pooled else "holds for "
           + (" and ".join(LABELS[m] for m in MODELS if st[m]["pooled_heavy_share"] >= 0.75) or "neither model")
           + " only") + "; "
        + ("the standardized α̂ confirms heavy tails in the transformer" if heavy_t
           else "the standardized α̂ does not confirm heavy tails in the transformer")
        + (" and in the CNN" if heavy_c else ", " + ("and the CNN is near-Gaussian" if gauss_c
                                                      else f"but does in the CNN at {c['std_heavy_share']:.0%} of "
                                                           "trained probes"))
        + "; Zhang's contrast (attention heavy, CNN near-Gaussian) " + ("holds." if zhang else "does not hold.")
    )
    c_late = st["cnn"]["std_loss_lt_0.1"][0]
    if t["std_heavy_share"] <= 0.25 and math.isfinite(c_late) and c_late < HEAVY:
        st["headline"] = (
            f"the pooled α̂ is below 2 for both models (CNN {fmt(c['alpha_pooled'][0])}, transformer "
            f"{fmt(t['alpha_pooled'][0])}), as Simsekli et al. report, but for the transformer that is scale "
            f"heterogeneity, not heavy tails: its standardized α̂ is {fmt(t['alpha_standardized'][0])} and "
            f"Gaussian noise with its per-coordinate scales gives a pooled {fmt(t['control_pooled'][0])}. "
            f"Real (if moderate) heavy tails appear in the CNN once it nearly fits the data (standardized α̂ "
            f"{fmt(c_late)} at training loss < 0.1, {fmt(st['cnn']['std_loss_ge_0.1'][0])} before). So the "
            "attention model is the near-Gaussian one here: the reverse of Zhang et al.'s contrast.")
    else:
        st["headline"] = reasons[-1]
    return v, reasons, st


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
    colors = {"cnn/sgdm": "tab:blue", "cnn/adam": "tab:cyan", "transformer/sgdm": "tab:red",
              "transformer/adam": "tab:orange"}
    for key, entry in summary["runs"].items():
        steps = sorted(entry["steps"], key=int)
        x = [max(int(s), 1) for s in steps]
        lab = f"{LABELS[entry['model']]} {LABELS[entry['optimizer']]}"
        for j, (k, title) in enumerate((("alpha_pooled", "α̂ pooled (Simsekli)"),
                                        ("alpha_standardized", "α̂ standardized (robust)"),
                                        ("control_pooled", "pooled α̂ of Gaussian noise at the same scales"))):
            m = [np.mean([v for v in entry["steps"][s][k] if v is not None]) for s in steps]
            ax[j].plot(x, m, marker="o", color=colors[key], label=lab)
            for s, xx in zip(steps, x):
                ax[j].scatter([xx] * len(entry["steps"][s][k]), entry["steps"][s][k], color=colors[key], s=8,
                              alpha=0.4)
            ax[j].set_title(title)
    for a in ax:
        a.axhline(2.0, color="k", lw=0.8, ls="--")
        a.axhline(HEAVY, color="gray", lw=0.8, ls=":")
        a.set(xscale="log", xlabel="training step (log; step 0 at 1)", ylabel="α̂", ylim=(0.8, 2.3))
        a.grid(alpha=0.3, which="both")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(out: str, summary: dict[str, Any], seconds: float) -> str:
    v, reasons, st = verdict(summary)
    summary["verdict"], summary["verdict_stats"] = v, st
    rows = []
    for key, entry in summary["runs"].items():
        for step in sorted(entry["steps"], key=int):
            s = entry["steps"][step]

            def ms(k: str, d: int = 3) -> str:
                m, sd = mean_std(s[k])
                return f"{fmt(m, d)} ± {fmt(sd, 2)}"
            rows.append([LABELS[entry["model"]], LABELS[entry["optimizer"]], step, fmt(mean_std(s["train_loss"])[0]),
                         ms("alpha_pooled"), ms("alpha_standardized"), ms("gap", 2),
                         f"{sum(s['flag'])}/{len(s['flag'])}", ms("control_pooled"), fmt(mean_std(s["log_scale_sd"])[0], 2),
                         ms("hill_alpha"), fmt(mean_std(s["noise_scale"])[0])])
    table = md_table(["model", "opt", "step", "train loss", "α̂ pooled", "α̂ standardized", "gap (std − pooled)",
                      "flag", "Gaussian control α̂ pooled", "sd log scale", "Hill α (norms)", "noise scale B_simple"],
                     rows)
    brows = []
    for key, entry in summary["runs"].items():
        last = max(entry["steps"], key=int)
        s = entry["steps"][last]
        for b in s["block_std"][0]:
            vs = [d[b] for d in s["block_std"] if d.get(b) is not None]
            vp = [d[b] for d in s["block_pooled"] if d.get(b) is not None]
            brows.append([LABELS[entry["model"]], LABELS[entry["optimizer"]], last, f"`{b}`",
                          fmt(mean_std(vp)[0]), fmt(mean_std(vs)[0])])
    ctable = md_table(["true α", "α̂ pooled", "α̂ standardized", "α̂ pooled, log-normal scales",
                       "α̂ standardized, log-normal scales"],
                      [[r["alpha"], fmt(r["pooled"]), fmt(r["standardized"]), fmt(r["pooled_lognormal"]),
                        fmt(r["standardized_lognormal"])] for r in summary["calibration"]])
    btable = md_table(["model", "opt", "step", "block", "α̂ pooled", "α̂ standardized"], brows)
    info = summary["corpus"]
    cnn_p = next(e["params"] for e in summary["runs"].values() if e["model"] == "cnn")
    tr_p = next(e["params"] for e in summary["runs"].values() if e["model"] == "transformer")
    hp = lambda m: "; ".join(f"{LABELS[o]} {json.dumps(h)}" for o, h in MODELS[m]["optimizers"].items())  # noqa: E731
    text = f"""# Study 4 — tail index of stochastic-gradient noise: CNN vs attention model

**Verdict: {v}** — {st['headline']}

## Claims

- {CITATIONS['simsekli']}: the stochastic-gradient noise of deep networks is heavy-tailed; the tail index
  α̂ (Mohammadi et al. estimator, pooled over all coordinates) is well below 2, the Gaussian value.
- {CITATIONS['zhang']}: the noise is heavy-tailed for attention models and near-Gaussian for CNNs.

The caveat tested here (docs/metrics.md#noise): pooling coordinates of unequal scales makes even Gaussian noise look
heavy-tailed to the pooled estimator (sd of the log-scale 1 gives α̂ ≈ 1.5). The standardized α̂ divides
each coordinate by its std over the P samples first and is the robust number.

## Set-up

- CNN: 1×8×8 digits (scikit-learn, 1438 training images, pixels standardized) → conv3×3(16) → ReLU →
  conv3×3(32) → ReLU → maxpool 2 → linear 512 → 10 ({cnn_p:,} weights); {MODELS['cnn']['steps']} steps.
- Attention model: a 2-layer pre-norm causal transformer (d = 64, 4 heads, GELU MLP, {tr_p:,} weights) on a
  character-level corpus of {info['chars']:,} characters read from the Python {info['python']} standard
  library's own `{'`, `'.join(info['files'])}`; vocabulary of the {VOCAB - 1} most frequent characters plus
  one for the rest ({info['unknown_share']:.2%} of characters), context {CONTEXT}, {LM_SEQUENCES} windows at
  seeded random offsets; {MODELS['transformer']['steps']} steps.
- Optimizers (batch {BATCH}, minibatches without replacement): CNN — {hp('cnn')}; transformer — {hp('transformer')}.
  Seeds {', '.join(map(str, summary['seeds']))} (initial weights, data order, noise batches).
- Probes at steps {MODELS['cnn']['probe_at']} (CNN) and {MODELS['transformer']['probe_at']} (transformer): the
  `noise` metric at the frozen weights with `noise_data=` {P} independent minibatches of the training batch
  size ({BATCH}), i.e. P = {P} noise samples ξ_p = g_p − ḡ, all coordinates (P·m ≤ 2^19 values, so a random
  subset of coordinates for the transformer); α̂ with 16 random partitions, K1 ≈ √K.
- Gaussian control: from the same {P} gradients, Gaussian noise with each coordinate's measured std, put
  through the same pooled estimator: the pooled α̂ that scale heterogeneity alone explains. "sd log scale" is
  the spread of the log per-coordinate std.

## Results

Mean ± std over seeds per probe (flag: runs whose standardized − pooled gap exceeds {HETEROGENEITY_GAP}):

{table}

Calibration of the estimators at this sample shape (P = {P} samples × 4000 coordinates of symmetric
α-stable noise, Chambers–Mallows–Stuck; "log-normal scales": each coordinate times exp(N(0, 1))):

{ctable}

Per block at the last probe (seed means):

{btable}

![α̂ along training](tail_index.png)

## Verdict: {v}

{chr(10).join('- ' + r for r in reasons)}
- Reading: each noise sample is the gradient of a minibatch of {BATCH}, a sum of {BATCH} per-example terms;
  unless per-example gradients have infinite variance (α < 2), the central limit theorem pushes minibatch
  noise towards Gaussian, which is what a correct α̂ must then show. A pooled α̂ well below 2 together with a
  standardized α̂ near 2 and a Gaussian control that reproduces the pooled value is scale heterogeneity, not
  heavy tails.
- Scope: two small models trained briefly on small offline data, {len(summary['seeds'])} seeds, P = {P}; the
  papers used larger networks (Simsekli: AlexNet/VGG/FCNs on CIFAR/MNIST; Zhang: BERT/transformers vs ResNets).
  α̂ at P·m values has a standard error of a few hundredths (see `summary.json`).

## Reproduce

`python examples/study_tail_index.py --out reports/tail_index --force` — measured wall time
{seconds / 60:.1f} min on 2 CPU cores (one torch thread). Run logs (JSONL, one record per probe) are in `runs/`,
the numbers above in `summary.json`.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    return v


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/tail_index")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--force", action="store_true", help="replace the runs already in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="redo the analysis, figure and README from the runs in --out (keeps the run time)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    Xc, yc, _, _ = load_digits_tensors(seed=0)
    Xl, Yl, info = stdlib_corpus(seed=0)
    data = {"cnn": (Xc, yc), "transformer": (Xl, Yl)}
    if args.report_only:
        with open(os.path.join(args.out, "summary.json")) as f:
            old = json.load(f)
        args.seeds = old["seeds"]
    else:
        prepare_out(args.out, force=args.force)
    paths = {}
    for seed in args.seeds:
        for m, cfg in MODELS.items():
            for o in cfg["optimizers"]:
                p = os.path.join(args.out, "runs", f"{m}-{o}-s{seed}.jsonl")
                paths[f"{m}-{o}-s{seed}"] = p if args.report_only else train(m, o, seed, data[m], args.out)
    summary = analyse(paths, args.seeds)
    summary["corpus"] = info
    summary["calibration"] = calibrate()
    seconds = old["seconds"] if args.report_only else time.perf_counter() - t0
    summary["seconds"] = seconds
    plot(summary, os.path.join(args.out, "tail_index.png"))
    v = write_readme(args.out, summary, seconds)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"verdict: {v}; {time.perf_counter() - t0:.0f}s; report in {args.out}/README.md")


if __name__ == "__main__":
    main()
