"""Attention's double backward with and without geomprobe's blockwise handler (engine/autodiff/attndouble.py).

GPT-2 124M (transformers config: n_embd 768, 12 layers, 12 heads, vocab 50257; ``scale.py build()``), batch
8 x 512 tokens, in each dtype asked for. Per dtype, in one process:

* the AdamW training step's seconds and peak memory (everything resident);
* the gradient's seconds;
* with the handler on (torch's fused attention, probabilities recomputed in tiles) and off (torch's math
  kernel, forced for double backward): the retained first-order graph's saved bytes (``Landscape.graph_bytes``,
  whole probe batch, one graph), the Landscape build's seconds, the median HVP seconds, HVP / gradient, the peak
  memory of build + HVPs, and which attention route each call took;
* the relative difference of the two HVPs of one fixed vector, ``|Hv_on - Hv_off| / |Hv_off|``;
* what the memory plan (``engine/memory_plan.py``) chooses at ``--peak-ratio`` (1.5) against the training
  step's peak, with the handler on and off: micro-batches, graphs kept, chunk, basis place, planned and
  measured peak, and the HVP seconds under that plan.

Every case runs in its own try/except and the JSON is written after each one, so a run stopped by a time limit
or an out-of-memory error keeps what it measured.

    python benchmarks/profile_attention.py --dtypes bf16,fp32 --out benchmarks/results/profile_attention_h200.json
    python benchmarks/profile_attention.py --model gpt2-tiny --device cpu --out /tmp/attn.json     # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import DTYPES, build, lm_loss, median_time, peak_of, token_batches
from timing import environment, strict_fp32, sync

from geomprobe.engine.autodiff import attndouble, attnkernels
from geomprobe.engine.landscape import Landscape
from geomprobe.engine.memory_plan import MemoryBudget


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


class Routes:
    """Counts the attention calls the handler took, by route (torch's fused kernel or the blockwise forward)."""

    def __init__(self):
        self.fused = self.blockwise = 0
        self._orig = attndouble._fused_choice

    def __enter__(self):
        def counting(*a, **k):
            fused = self._orig(*a, **k)
            if fused:
                self.fused += 1
            else:
                self.blockwise += 1
            return fused

        attndouble._fused_choice = counting
        return self

    def __exit__(self, *exc):
        attndouble._fused_choice = self._orig

    def as_dict(self) -> dict:
        return {"fused": self.fused, "blockwise": self.blockwise}


def _vector(land: Landscape) -> torch.Tensor:
    g = torch.Generator(device=land.device).manual_seed(0)
    return torch.randn(land.dim, generator=g, device=land.device, dtype=land.dtype)


def measure_landscape(model, batch, device, fast: bool, repeats: int, grad_s: float) -> tuple[dict, torch.Tensor]:
    """The retained graph, the HVP and the peak with the handler on (``fast``) or off, everything resident."""
    res: dict = {}
    _free(device)
    _reset_peak(device)
    base = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else None
    with Routes() as routes:
        t0 = time.perf_counter()
        land = Landscape(model, lm_loss, [batch], mode="eval", memory=None, recompute_attention=fast)
        sync(device)
        res["build_s"] = time.perf_counter() - t0
    res["attention_calls"] = routes.as_dict()
    res["graph_bytes"] = land.graph_bytes
    res["graph_bytes_per_sample"] = land.graph_bytes / batch["input_ids"].shape[0]
    v = _vector(land)
    res["hvp_s"] = median_time(lambda: land.hvp(v), device, repeats=repeats)
    res["hvp_over_grad"] = res["hvp_s"] / grad_s
    hv = land.hvp(v).float().cpu()
    res["peak_bytes"] = _peak(device)
    res["allocated_before_bytes"] = base
    land.close()
    land = v = None  # the graph goes before the next case is measured
    _free(device)
    return res, hv


def measure_plan(model, batch, device, fast: bool, train_peak: int | None, peak_ratio: float, repeats: int) -> dict:
    """What the memory plan chooses at ``peak_ratio`` against the training peak, and the HVP it gives."""
    _free(device)
    _reset_peak(device)
    budget = MemoryBudget(train_peak_bytes=train_peak, peak_ratio=peak_ratio, warn=False)
    t0 = time.perf_counter()
    land = Landscape(model, lm_loss, [batch], mode="eval", memory=budget, recompute_attention=fast)
    sync(device)
    res: dict = {"build_s": time.perf_counter() - t0}
    plan = land.plan
    if plan is not None:
        keys = ("micro_batch_size", "graph_budget_bytes", "chunk_size", "basis_device", "max_basis",
                "graph_bytes_per_sample", "graph_source", "budget_bytes", "peak_bytes", "fits", "warnings")
        res["plan"] = {k: getattr(plan, k) for k in keys}
    res["pieces"] = len(land.batches)
    res["graphs_kept"] = sum(g is not None for g in land._graphs)
    v = _vector(land)
    res["hvp_s"] = median_time(lambda: land.hvp(v), device, repeats=repeats)
    res["graph_rebuilds_per_hvp"] = land.graph_rebuilds / max(land.hvps, 1)
    res["peak_bytes"] = _peak(device)
    if train_peak and res["peak_bytes"]:
        res["peak_over_train"] = res["peak_bytes"] / train_peak
    land.close()
    land = v = None
    _free(device)
    return res


def measure_training(model, batch, device, repeats: int) -> dict:
    """The AdamW step's seconds and peak (everything resident) and the gradient's seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def train_step():
        opt.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()
        opt.step()

    train_step()  # AdamW state exists from here on, as in a training loop
    res = {"train_step_s": median_time(train_step, device, repeats=3)}
    _, res["train_peak_bytes"] = peak_of(train_step, device)
    opt.zero_grad(set_to_none=True)
    res["grad_s"] = median_time(lambda: torch.autograd.grad(lm_loss(model, batch), params), device, repeats=repeats)
    return res


def run(args) -> dict:
    device = torch.device(args.device)
    out: dict = {"env": environment(device), "model": args.model, "peak_ratio": args.peak_ratio,
                 "chunk_bytes": attnkernels.CHUNK_BYTES, "cases": {}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)

    for dtype_name in args.dtypes.split(","):
        case: dict = {}
        out["cases"][dtype_name] = case
        try:
            model, vocab, b, t = build(args.model, DTYPES[dtype_name], device)
            b, t = args.batch or b, args.tokens or t
            batch = token_batches(vocab, b, t, 1, device, seed=1)[0]
            cfg = model.config
            heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            layers = cfg.num_hidden_layers
            case.update(batch=[b, t], params=sum(p.numel() for p in model.parameters()),
                        probabilities_bytes=layers * b * heads * t * t * DTYPES[dtype_name].itemsize)
            L = attnkernels.Layout(N=b, Hk=heads, g=1, Tq=t, Tk=t, D=hd, Dv=hd, scale=1.0, causal=True,
                                   compute_dtype=torch.float32 if dtype_name != "fp64" else torch.float64)
            case["double_backward_tile"] = list(L.tile(10))
            case.update(measure_training(model, batch, device, args.repeats))
        except Exception as e:  # noqa: BLE001 - recorded, the next dtype still runs
            case["error"] = f"{type(e).__name__}: {e}"
            case["traceback"] = traceback.format_exc()[-2000:]
            save()
            continue
        save()
        hvps: dict[str, torch.Tensor] = {}
        for label, fast in (("handler", True), ("math", False)):
            try:
                case[label], hvps[label] = measure_landscape(model, batch, device, fast, args.repeats, case["grad_s"])
            except Exception as e:  # noqa: BLE001
                case[label] = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-2000:]}
                _free(device)
            save()
        if len(hvps) == 2:
            a, ref = hvps["handler"].double(), hvps["math"].double()
            case["hvp_relative_difference"] = float((a - ref).norm() / ref.norm())
        hvps.clear()
        if "graph_bytes" in case.get("handler", {}) and "graph_bytes" in case.get("math", {}):
            case["graph_bytes_saved"] = case["math"]["graph_bytes"] - case["handler"]["graph_bytes"]
            case["saved_over_probabilities"] = case["graph_bytes_saved"] / case["probabilities_bytes"]
        save()
        for label, fast in (("plan_handler", True), ("plan_math", False)):
            try:
                case[label] = measure_plan(model, batch, device, fast, case.get("train_peak_bytes") or None,
                                           args.peak_ratio, args.repeats)
            except Exception as e:  # noqa: BLE001
                case[label] = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-2000:]}
                _free(device)
            save()
        model = batch = None
        _free(device)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-124m", help="a case of scale.py build(): gpt2-124m, gpt2-tiny, ...")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32, fp64")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="samples (default: the model's case, 8 for GPT-2)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the case's, 512)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-ratio", type=float, default=1.5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    strict_fp32()
    out = run(args)
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
