"""HVPs per probe along a real training trajectory: Lanczos started warm (previous probe's Ritz vectors) vs cold.

Two GeometryProbes watch the same training run, one with ``warm_start=True`` (the default) and one with
``warm_start=False``; both measure ``spectrum`` at the same tol on the same probe batch every ``--every``
optimizer steps. A probe changes nothing, so both see exactly the same parameters. Reported per case: mean
HVPs per probe after the first (which is cold for both), their ratio, whether every run converged, and how
often one start missed an extreme eigenvalue that the other found (see :func:`missed`).

    python benchmarks/warm_start.py --out benchmarks/results/warm_start_cpu.json
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
from timing import environment  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe.demo.data import load_digits_tensors  # noqa: E402


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
    else:
        X, y, _, _ = load_digits_tensors(seed=seed)
        model = CNN() if name == "cnn" else nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128),
                                                           nn.Tanh(), nn.Linear(128, 10))
        loss_fn, batch = nn.CrossEntropyLoss(), 64
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe_n = 64 if name == "transformer" else 256  # 64 sequences of 32 tokens: 2048 predictions
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


def measure(name: str, optimizer: str, *, every: int, steps: int, tol: float, seed: int = 0) -> dict:
    model, loss_fn, X, y, probe_batch, opt, batch = case(name, optimizer, seed)
    metrics = {"spectrum": {"tol": tol}}
    probes = {w: gp.GeometryProbe(model, loss_fn, probe_batch, metrics=metrics, schedule=gp.every(every),
                                  warm_start=w, seed=seed) for w in (True, False)}
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
    warm = [r["spectrum"] for r in probes[True].records]
    cold = [r["spectrum"] for r in probes[False].records]
    later = slice(1, None)
    warm_mean = sum(r["hvps"] for r in warm[later]) / max(1, len(warm) - 1)
    cold_mean = sum(r["hvps"] for r in cold[later]) / max(1, len(cold) - 1)
    return {
        "case": name, "optimizer": optimizer, "parameters": probes[True].space.dim, "every": every,
        "steps": steps, "tol": tol, "probes": len(warm), "seconds": seconds,
        "loss_first": probes[True].records[0]["loss"], "loss_last": probes[True].records[-1]["loss"],
        "cold_hvps": [r["hvps"] for r in cold], "warm_hvps": [r["hvps"] for r in warm],
        "cold_mean": cold_mean, "warm_mean": warm_mean, "ratio": cold_mean / warm_mean if warm_mean else None,
        "warm_flags": [r["warm"] for r in warm],
        "all_converged": all(r["converged"] for r in warm + cold),
        # probes where one start missed an extreme eigenvalue the other found (beyond its bound)
        "warm_missed": sum(missed(a, b, k) for a, b in zip(warm, cold) for k in ("lambda_max", "lambda_min")),
        "cold_missed": sum(missed(b, a, k) for a, b in zip(warm, cold) for k in ("lambda_max", "lambda_min")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["mlp", "cnn", "transformer"])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    ap.add_argument("--every", nargs="+", type=int, default=[5, 20])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'case':12} {'opt':5} {'d':>8} {'every':>5} {'probes':>6} {'cold':>6} {'warm':>6} {'ratio':>6} "
          f"converged  missed (warm/cold)")
    for name in args.cases:
        for optimizer in args.optimizers:
            for every in args.every:
                r = measure(name, optimizer, every=every, steps=args.steps, tol=args.tol)
                rows.append(r)
                print(f"{name:12} {optimizer:5} {r['parameters']:>8} {every:>5} {r['probes']:>6} {r['cold_mean']:>6.1f} "
                      f"{r['warm_mean']:>6.1f} {r['ratio']:>6.2f} {str(r['all_converged']):>9}  "
                      f"{r['warm_missed']}/{r['cold_missed']}",
                      flush=True)
                if args.out:  # after every row, so that a long run keeps what it measured
                    doc = {"environment": environment("cpu"), "rows": rows}
                    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
