"""Half-precision HVPs of language models: time and accuracy with geomprobe's half-precision double backward
(attention products in bf16 with float32 accumulation, norms and GELUs in closed form evaluated in float32)
against torch's own path (``fast_double_backward=False``: attention converted to float32, norms and the
elementwise GELU differentiated twice by autograd), in one process.

Per model: the gradient's seconds; each HVP's seconds and ratio to the gradient (graph kept); each HVP's
relative error against the float64 HVP of the same rounded weights and data (``vectors`` random vectors,
largest error), so the speed-up is shown not to cost accuracy.

    python benchmarks/half_hvp.py --models gpt2-124m:bf16,llama-1b:bf16 --out r.json
    python benchmarks/half_hvp.py --models gpt2-tiny:bf16 --device cpu            # smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402
from timing import dump, environment, median_seconds  # noqa: E402

import geomprobe as gp  # noqa: E402


def measure(spec: str, device, vectors: int) -> dict:
    name, dtype = spec.split(":")
    model, vocab, batch, tokens = scale.build(name, scale.DTYPES[dtype], device)
    model.eval()
    data = scale.token_batches(vocab, batch, tokens, 1, device, seed=0)
    params = list(model.parameters())
    row: dict = {"model": name, "dtype": dtype, "params": sum(p.numel() for p in params), "batch": [batch, tokens]}
    row["grad_s"] = median_seconds(lambda: torch.autograd.grad(scale.lm_loss(model, data[0]), params), device)
    g = torch.Generator(device=device).manual_seed(0)
    d = row["params"]
    V = torch.randn(vectors, d, generator=g, device=device, dtype=scale.DTYPES[dtype])
    outs = {}
    for fast in (True, False):
        key = "geomprobe" if fast else "torch"
        land = gp.Landscape(model, scale.lm_loss, data, memory=None, fast_double_backward=fast)
        row[f"hvp_s_{key}"] = median_seconds(lambda: land.hvp(V[0]), device)
        row[f"hvp_over_grad_{key}"] = row[f"hvp_s_{key}"] / row["grad_s"]
        outs[key] = torch.stack([land.hvp(v) for v in V]).double().cpu()
        land.close()
        del land
        gc.collect()
        torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None
    row["speedup"] = row["hvp_s_torch"] / row["hvp_s_geomprobe"]
    exact_model = copy.deepcopy(model).double()
    del model
    gc.collect()
    exact = gp.Landscape(exact_model, scale.lm_loss, data, memory=None)
    ref = torch.stack([exact.hvp(v.double()) for v in V]).cpu()
    exact.close()
    for key, out in outs.items():
        row[f"error_{key}"] = max(float((o - r).norm() / r.norm()) for o, r in zip(out, ref))
    print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="gpt2-124m:bf16")
    ap.add_argument("--vectors", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = {"benchmark": "half_hvp", "env": environment(a.device), "rows": []}
    for spec in a.models.split(","):
        try:
            out["rows"].append(measure(spec, a.device, a.vectors))
        except Exception as e:  # keep the other models' figures
            out["rows"].append({"model": spec, "failed": f"{type(e).__name__}: {e}"})
            print(out["rows"][-1], flush=True)
        dump(out, a.out)


if __name__ == "__main__":
    main()
