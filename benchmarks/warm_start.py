"""HVPs per probe along a real training trajectory: Lanczos started warm (previous probe's Ritz vectors) vs cold.

Three GeometryProbes watch the same training run: one warm-started with the default start (the kept Ritz
vectors moved on along their last step, :class:`geomprobe.probe.WarmStart`), one with the plain start of
earlier versions (``WarmStart(extrapolate=False)``) and one cold (``warm_start=False``); each measures
``spectrum`` at the same tol and ``risk`` on the same probe batch every ``--every`` optimizer steps (warm
starts forced, also where the probe's ``"auto"`` policy would start a certified run cold). A probe changes
nothing, so all three see exactly the same parameters. Reported per case: mean HVPs per probe after the first
(which is cold for all), the ratios cold / warm, whether every run converged, and how often a warm start
missed an extreme eigenvalue that the cold start found, and the other way round (see :func:`missed`).

    python benchmarks/warm_start.py --out benchmarks/results/warm_start_cpu.json
    python benchmarks/warm_start.py --cases gpt2 --optimizers adamw --every 1 5 --steps 100 --risk none
    python benchmarks/warm_start.py --cases transformer --every 5 --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment

import geomprobe as gp
from geomprobe.demo.data import load_digits_tensors
from geomprobe.linalg.certify import DEFAULT_RISK
from geomprobe.probe.warm_start import WarmStart


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.Tanh(), nn.Flatten(), nn.Linear(16 * 64, 10))

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 8, 8))


class TinyLM(nn.Module):
    """A 2-layer pre-norm transformer language model (math attention: it has a double backward)."""

    def __init__(self, vocab=64, d=64, heads=4, layers=2, context=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx):
        h = self.emb(idx) + self.pos[: idx.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: idx.shape[1], : idx.shape[1]], is_causal=True))


class HFGPT2(nn.Module):
    """A small randomly initialised Hugging Face GPT-2 built from a config (eager attention: a double
    backward), returning logits."""

    def __init__(self, vocab=500, d=64, layers=2, heads=2, context=32):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=d, n_layer=layers, n_head=heads, n_positions=context, vocab_size=vocab,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        config.attn_implementation = "eager"
        self.lm = GPT2LMHeadModel(config)

    def forward(self, idx):
        return self.lm(input_ids=idx).logits


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def markov_tokens(n, context, vocab, generator):
    """Sequences of a random sparse Markov chain: a task a small LM learns, so the trajectory moves."""
    nxt = torch.randint(0, vocab, (vocab, 3), generator=generator)
    seq = torch.empty(n, context + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(context):
        seq[:, t + 1] = nxt[seq[:, t], torch.randint(0, 3, (n,), generator=generator)]
    return seq[:, :-1], seq[:, 1:]


def case(name: str, optimizer: str, seed: int = 0):
    """(model, loss_fn, train X, train y, probe batch, optimizer, batch size) for a named case."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "transformer":
        X, y = markov_tokens(2048, 32, 64, g)
        model, loss_fn, batch = TinyLM(), lm_loss, 32
    elif name.startswith("gpt2"):  # gpt2 (2 layers, width 64) or gpt2-4x128: random tokens, as scale.py trains
        layers, width = (4, 128) if name == "gpt2-4x128" else (2, 64)
        seq = torch.randint(0, 500, (256, 33), generator=g)
        X, y = seq[:, :-1], seq[:, 1:]
        model, loss_fn, batch = HFGPT2(layers=layers, d=width), lm_loss, 4
    else:
        X, y, _, _ = load_digits_tensors(seed=seed)
        model = CNN() if name == "cnn" else nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128),
                                                           nn.Tanh(), nn.Linear(128, 10))
        loss_fn, batch = nn.CrossEntropyLoss(), 64
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # 64 sequences of 32 tokens: 2048 predictions; GPT-2: 4 of 32, as scale.py's tiny case
    probe_n = 64 if name == "transformer" else 4 if name.startswith("gpt2") else 256
    return model, loss_fn, X, y, (X[:probe_n], y[:probe_n]), opt, batch


def missed(a, b, key):
    """Whether run ``a`` missed the extreme eigenvalue that run ``b`` found: ``b``'s Ritz value lies beyond
    ``a``'s interval on the outer side. A Ritz value never lies outside the spectrum, so the more extreme of
    the two is the better one; a residual bound certifies that *some* eigenvalue lies within it, not that it
    is the extreme one (a Krylov space can miss an eigenvalue, warm or cold). Up to float32 rounding of the
    HVPs, which no residual bound includes (16 eps ||H||)."""
    rounding = 16 * torch.finfo(torch.float32).eps * max(abs(a["lambda_max"]), abs(a["lambda_min"]))
    sign = 1.0 if key == "lambda_max" else -1.0
    return sign * (b[key] - a[key]) > a[f"{key}_err"] + rounding


def measure(name: str, optimizer: str, *, every: int, steps: int, tol: float, seed: int = 0,
            risk: float | None = DEFAULT_RISK) -> dict:
    model, loss_fn, X, y, probe_batch, opt, batch = case(name, optimizer, seed)
    metrics = {"spectrum": {"tol": tol, "risk": risk}}
    starts = {"warm": True, "plain": True, "cold": False}
    probes = {k: gp.GeometryProbe(model, loss_fn, probe_batch, metrics=metrics, schedule=gp.every(every),
                                  warm_start=w, seed=seed) for k, w in starts.items()}
    probes["plain"].warm = WarmStart(certified=True, extrapolate=False)  # the start of earlier versions
    for p in probes.values():
        p.attach(opt)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    for p in probes.values():
        p.close()
    runs = {k: [r.get("spectrum") for r in p.records] for k, p in probes.items()}
    # a probe point where any start's run failed (recorded by the probe, training went on) is left out of
    # the comparison for all three
    ok = [all(isinstance(runs[k][i], dict) and "hvps" in runs[k][i] for k in runs) for i in range(len(runs["warm"]))]
    runs = {k: [r for r, good in zip(rows, ok) if good] for k, rows in runs.items()}
    cold, warm, plain = runs["cold"], runs["warm"], runs["plain"]

    def mean(rows):  # after the first probe, which is cold for every start
        return sum(r["hvps"] for r in rows[1:]) / max(1, len(rows) - 1)

    def misses(a, b):
        return sum(missed(x, y, k) for x, y in zip(a, b) for k in ("lambda_max", "lambda_min"))

    out = {
        "case": name, "optimizer": optimizer, "parameters": probes["warm"].space.dim, "every": every,
        "steps": steps, "tol": tol, "risk": risk, "probes": len(warm), "failed_points": ok.count(False),
        "seconds": seconds,
        "loss_first": probes["warm"].records[0]["loss"], "loss_last": probes["warm"].records[-1]["loss"],
        "cold_hvps": [r["hvps"] for r in cold], "warm_hvps": [r["hvps"] for r in warm],
        "plain_hvps": [r["hvps"] for r in plain],
        "cold_mean": mean(cold), "warm_mean": mean(warm), "plain_mean": mean(plain),
        "warm_flags": [r["warm"] for r in warm],
        "gains": dict(probes["warm"].warm.gain),  # the extrapolation gains fitted by the end of the run
        "all_converged": all(r["converged"] for r in warm + plain + cold),
        # probes where one start missed an extreme eigenvalue the other found (beyond its bound)
        "warm_missed": misses(warm, cold), "cold_missed": misses(cold, warm),
        "plain_missed": misses(plain, cold), "cold_missed_plain": misses(cold, plain),
    }
    out["ratio"] = out["cold_mean"] / out["warm_mean"] if out["warm_mean"] else None
    out["plain_ratio"] = out["cold_mean"] / out["plain_mean"] if out["plain_mean"] else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["mlp", "cnn", "transformer"])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    ap.add_argument("--every", nargs="+", type=int, default=[5, 20])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--risk", default="1e-2", help="the extremes' certificate risk, or 'none' (residual bounds)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    risk = None if args.risk == "none" else float(args.risk)
    rows = []
    print(f"{'case':12} {'opt':5} {'d':>8} {'every':>5} {'probes':>6} {'cold':>6} {'plain':>6} {'warm':>6} "
          f"{'ratio':>6} {'plain':>6} converged  missed (warm/plain/cold)")
    for name in args.cases:
        for optimizer in args.optimizers:
            for every in args.every:
                r = measure(name, optimizer, every=every, steps=args.steps, tol=args.tol, risk=risk)
                rows.append(r)
                print(f"{name:12} {optimizer:5} {r['parameters']:>8} {every:>5} {r['probes']:>6} "
                      f"{r['cold_mean']:>6.1f} {r['plain_mean']:>6.1f} {r['warm_mean']:>6.1f} {r['ratio']:>6.2f} "
                      f"{r['plain_ratio']:>6.2f} {r['all_converged']!s:>9}  "
                      f"{r['warm_missed']}/{r['plain_missed']}/{r['cold_missed']}", flush=True)
                if args.out:  # after every row, so that a long run keeps what it measured
                    doc = {"environment": environment("cpu"), "args": vars(args), "rows": rows}
                    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
