"""Seconds for landscape views on the probe batch: a 41-point line and a 21x21 plane through a random-init
ResNet-18 (torchvision, 32 images of 3x224x224) and GPT-2 124M (transformers' GPT2Config(), 8 x 512 tokens).

For each model: the Landscape's build (one gradient with its graph), the top Ritz vector (Lanczos, ``--max-iter``
steps at most), then the line along ``"top"`` and the plane of ``"top"`` and a filter-normalized ``"random"``
direction, which reuse that Ritz vector (their HVPs are the quadratic model's 1 and 2). Each view's seconds are
device-synchronized wall time; ``forward_ms`` is a view's time per point. Synthetic data, no download.

    python benchmarks/views.py --device cuda --out views_h200.json
    python benchmarks/views.py --device cpu --tiny                  # a smoke run with shrunken models

Prints one JSON line; ``--out`` also writes it to a file. A model that fails (a missing package, out of memory)
is reported with its error and the other still runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geomprobe import Landscape, views  # noqa: E402
from geomprobe.metrics.ritz_vectors import extreme_ritz  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resnet18(tiny: bool, device, dtype):
    """(model, loss_fn, batch, description): torchvision's ResNet-18 at 1000 classes, random init."""
    g = torch.Generator().manual_seed(0)
    n, side = (4, 64) if tiny else (32, 224)
    try:
        from torchvision.models import resnet18 as tv_resnet18

        torch.manual_seed(0)
        model, what = tv_resnet18(weights=None, num_classes=1000), "torchvision resnet18"
        classes = 1000
    except ImportError:
        if not tiny:
            raise
        from benchmarks.models import ResNet18  # the smoke run needs no torchvision

        torch.manual_seed(0)
        model, what, classes, side = ResNet18(classes=10, width=8), "CIFAR ResNet-18 (width 8; no torchvision)", 10, 32
    x = torch.randn(n, 3, side, side, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    model = model.to(device=device, dtype=dtype)
    return model, torch.nn.CrossEntropyLoss(), (x.to(device, dtype), y.to(device)), f"{what}, {n}x3x{side}x{side}"


def gpt2(tiny: bool, device, dtype):
    """(model, loss_fn, batch, description): GPT-2 124M (GPT2Config()) at random init on random tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = (GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=256, bos_token_id=0,
                         eos_token_id=0) if tiny else GPT2Config())
    for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, attr, 0.0)
    config.attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype)
    batch, tokens = (2, 32) if tiny else (8, 512)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g).to(device)

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits
        targets = batch["input_ids"][:, 1:].reshape(-1)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)

    size = sum(p.numel() for p in model.parameters()) / 1e6
    return model, loss_fn, {"input_ids": ids}, f"GPT-2 ({size:.1f}M), {batch}x{tokens} tokens"


def measure(name: str, build, args, device, dtype) -> dict:
    out: dict = {"model": name}
    try:
        model, loss_fn, batch, what = build(args.tiny, device, dtype)
        out.update(description=what, parameters=sum(p.numel() for p in model.parameters()))
        sync(device)
        t0 = time.perf_counter()
        land = Landscape(model, loss_fn, batch, mode="eval")
        sync(device)
        out["landscape_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ritz = extreme_ritz(land, "top", 1, tol=1e-3, max_iter=args.max_iter)
        sync(device)
        out.update(lanczos_seconds=time.perf_counter() - t0, lambda_max=ritz.values[0], lanczos_hvps=land.hvps)
        views.line(land, "top", points=3)  # warm-up (kernels, allocator) outside the timings
        for label, call, points in (
            ("line", lambda: views.line(land, "top", points=args.line_points), args.line_points),
            ("plane", lambda: views.plane(land, "top", "random", points=(args.plane_points, args.plane_points)),
             args.plane_points**2),
        ):
            sync(device)
            t0 = time.perf_counter()
            result = call()
            sync(device)
            seconds = time.perf_counter() - t0
            out[label] = {"points": points, "seconds": seconds, "forward_ms": 1e3 * seconds / points,
                          "forwards": result["forwards"], "hvps": result["hvps"]}
        if device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        land.close()
    except Exception as e:  # a benchmark reports a failed model and goes on with the next
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--models", default="resnet18,gpt2", help="comma-separated: resnet18, gpt2")
    ap.add_argument("--line-points", type=int, default=41)
    ap.add_argument("--plane-points", type=int, default=21)
    ap.add_argument("--max-iter", type=int, default=30, help="Lanczos steps at most for the top Ritz vector")
    ap.add_argument("--tiny", action="store_true", help="shrunken models and batches (a CPU smoke run)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    builders = {"resnet18": resnet18, "gpt2": gpt2}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in builders]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(builders)}")
    doc = {
        "benchmark": "views", "device": str(device), "dtype": args.dtype, "tiny": args.tiny,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "results": [measure(m, builders[m], args, device, dtype) for m in names],
    }
    line = json.dumps(doc)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
