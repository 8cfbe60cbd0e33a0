"""How contaminated are packed diagonal reads on real small networks? (docs/metrics.md#rmed, issue 16 item 4.)

A packed read puts +-1 at one random coordinate of every parameter block and reads ``z_i (Hz)_i``: the
diagonal entry plus the Hessian entries between the chosen coordinates. This script compares packed reads
with exact diagonal entries (one HVP per coordinate) on an MLP, a CNN and a transformer trained briefly on
scikit-learn's digits, and reports, per model: the contamination relative to |h_i| and to the block's median
|h|, how the block median and q99 of |h| read from packed values compare with the exact ones, and whether the
reported error (the spread over two sign patterns) is calibrated: mean of (est - h)^2 / err^2 should be ~1.

Run: ``PYTHONPATH=. python benchmarks/packed_diagonal.py [--rows 256] [--json out.json]`` (CPU, ~1-2 min).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geomprobe import Landscape
from geomprobe.demo.data import load_digits_tensors
from geomprobe.linalg.diagonal import packed_diagonal
from geomprobe.linalg.exact import exact_diagonal


class CNN(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c * 16, 10)

    def forward(self, x):
        x = torch.tanh(self.c1(x.view(-1, 1, 8, 8)))
        x = F.avg_pool2d(torch.tanh(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class Transformer(nn.Module):
    """Rows of the 8x8 image as 8 tokens; pre-norm encoder layers, mean-pooled."""

    def __init__(self, d: int = 32, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d))
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                                                    norm_first=True), layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, 10)

    def forward(self, x):
        return self.out(self.enc(self.inp(x.view(-1, 8, 8)) + self.pos).mean(1))


def mlp(width: int, depth: int) -> nn.Module:
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def trained(model: nn.Module, X, y, steps: int = 150) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X[:256]), y[:256]).backward()
        opt.step()
    return model


def measure(name: str, model: nn.Module, X, y, rows: int, seed: int) -> dict:
    land = Landscape(model, nn.CrossEntropyLoss(), (X[:512], y[:512]))
    g = torch.Generator().manual_seed(seed)
    blocks = land.space.blocks
    # one coordinate per block per row, without replacement within a block while it lasts
    cols = []
    for b in blocks:
        perm = torch.cat([torch.randperm(b.size, generator=g) for _ in range(-(-rows // b.size))])[:rows]
        cols.append(b.start + perm)
    R = torch.stack(cols, 1)
    est, err = packed_diagonal(land.hvp, land.dim, R, generator=g, dtype=land.dtype)
    flat = R.reshape(-1)
    uniq, inv = torch.unique(flat, return_inverse=True)
    h = exact_diagonal(land.hvp, land.dim, uniq, dtype=land.dtype).double()[inv].reshape(R.shape)
    e = (est - h).numpy()
    hn, en, errn = h.numpy(), est.numpy(), err.numpy()
    per = []
    for j, b in enumerate(blocks):
        med = np.median(np.abs(hn[:, j]))
        per.append({
            "block": b.name, "size": b.size,
            "contam_rel_median_p95": float(np.quantile(np.abs(e[:, j]), 0.95) / med) if med > 0 else None,
            "median_rel_err": float(abs(np.median(np.abs(en[:, j])) - med) / med) if med > 0 else None,
            "q99_rel_err": float(abs(np.quantile(np.abs(en[:, j]), 0.99) - np.quantile(np.abs(hn[:, j]), 0.99))
                                 / np.quantile(np.abs(hn[:, j]), 0.99)),
        })
    ok = errn > 0
    return {
        "model": name, "d": land.dim, "blocks": len(blocks), "rows": rows, "hvps_packed": 2 * rows,
        "hvps_exact_equivalent": int(uniq.numel()),
        "contam_rel_to_h_median": float(np.median(np.abs(e) / np.abs(hn).clip(1e-30))),
        "contam_rel_block_median_p95_worst": max(p["contam_rel_median_p95"] or 0 for p in per),
        "block_median_rel_err_worst": max(p["median_rel_err"] or 0 for p in per),
        "block_q99_rel_err_worst": max(p["q99_rel_err"] for p in per),
        "calibration_mean_e2_over_err2": float(np.mean(e[ok] ** 2) / np.mean(errn[ok] ** 2)),
        "within_3err": float(np.mean(np.abs(e[ok]) <= 3 * errn[ok])),
        "per_block": per,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    X, y, _, _ = load_digits_tensors(dtype=torch.float64)
    models = {
        "mlp 64-32-16-10": mlp(32, 2), "mlp 64-256-256-10": mlp(256, 2),
        "cnn 8-16": CNN(8), "transformer d32 x2": Transformer(32, 2),
    }
    out = []
    for name, m in models.items():
        r = measure(name, trained(m.double(), X, y), X, y, a.rows, a.seed)
        out.append(r)
        print(f"{name:22s} d={r['d']:7d} blocks={r['blocks']:3d} | contamination/|h| median "
              f"{r['contam_rel_to_h_median']:.2e}, p95/block-median worst {r['contam_rel_block_median_p95_worst']:.2e} | "
              f"block median rel err worst {r['block_median_rel_err_worst']:.2e}, q99 {r['block_q99_rel_err_worst']:.2e} | "
              f"E e^2/E err^2 {r['calibration_mean_e2_over_err2']:.2f}, |e|<=3err {r['within_3err']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
