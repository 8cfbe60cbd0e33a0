"""Where a host-vector Landscape's product reads its input and writes its output, and what each costs.

The 1B Llama's host-vector products took 4.4 s in fp32 with input and output in host memory and 2.15 s with both
on the GPU (lean Lanczos, benchmarks/RESULTS.md section 6, eighteenth round), but two device d-vectors beside the
product put the probe over 1.5x its training peak. A product reading its input from host memory (streamed per
parameter, as the host mode does) and writing its output on the device would hold one. This times the three
placements on one Landscape under its default plan (host vectors at 1.5x on the 1B model), with each one's
device peak above the memory allocated before it, and checks that the three products agree.

    python benchmarks/product_placement.py --model llama-1b --dtype fp32 --repeats 3 --out r.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from scale_setup import DTYPES, build, lm_loss, token_batches

import geomprobe as gp
from geomprobe.engine import saved_bytes
from geomprobe.engine.memory_plan import MemoryBudget

saved_bytes.SavedBytes.hooks = lambda self: torch.autograd.graph.saved_tensors_hooks(self.pack, unpack)


plain_pack = saved_bytes.SavedBytes.pack


def offloading_pack(limit: float):
    """SavedBytes.pack that moves saved tensors of 1 MB or more (not parameters) to page-locked host memory until
    ``limit`` bytes of a graph have moved; they come back to the device when the double backward unpacks them."""

    def pack(self, t):
        out = plain_pack(self, t)
        moved = getattr(self, "moved", 0)
        nb = t.numel() * t.element_size()
        if t.device.type != "cuda" or nb < 2**20 or moved + nb > limit or t.data_ptr() in self.exclude:
            return out
        self.moved = moved + nb
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        return Moved(host, t.device)

    return pack


class Moved:
    def __init__(self, host, device):
        self.host, self.device = host, device


def unpack(t):
    return t.host.to(t.device, non_blocking=True) if isinstance(t, Moved) else t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-gb", default="",
                    help="comma-separated GB of each rebuilt graph's saved tensors moved to host memory while the "
                         "graph waits (device input and output; an experiment on SavedBytes.pack)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    model, vocab, batch, tokens = build(a.model, DTYPES[a.dtype], dev)
    data = token_batches(vocab, batch, tokens, 1, dev, seed=0)
    # the 1B's plan at 1.5x its training peak: host vectors, micro-batches of one sample, every graph rebuilt for
    # each product (a Landscape built here, without the optimizer's state, would have room to keep its graphs)
    memory = MemoryBudget(warn=False, overrides={"micro_batch_size": (1, "benchmark"),
                                                    "graph_budget_bytes": (0, "benchmark")})
    land = gp.Landscape(model, lm_loss, data, vector_device="cpu", memory=memory)
    g = torch.Generator().manual_seed(0)
    v_host = torch.randn(land.dim, generator=g).to(land.dtype)
    v_dev = v_host.to(dev)
    placements = {"host_in_host_out": (v_host, torch.empty_like(v_host)),
                  "device_in_device_out": (v_dev, torch.empty_like(v_dev)),
                  "host_in_device_out": (v_host, torch.empty_like(v_dev)),
                  "device_in_host_out": (v_dev, torch.empty_like(v_host).pin_memory() if cuda else torch.empty_like(v_host))}
    for gb in [float(x) for x in a.offload_gb.split(",") if x]:
        placements[f"device_in_device_out_offload_{gb:g}gb"] = (v_dev, torch.empty_like(v_dev))
    res = {"model": a.model, "dtype": a.dtype, "dim": land.dim,
           "plan_vectors": land.plan.vectors if land.plan else None}
    outs = {}
    for name, (v, out) in placements.items():
        times, peak, err = [], None, None
        for _ in range(a.repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            try:
                offload = float(name.rsplit("_", 1)[1][:-2]) * 1e9 if "offload" in name else 0.0
                saved_bytes.SavedBytes.pack = offloading_pack(offload) if offload else plain_pack
                if name in ("host_in_device_out", "device_in_host_out"):
                    # Landscape.hvp answers a host vector in host memory: the streamed pass itself is asked here
                    land.host._rows_into(v.view(1, -1), out.view(1, -1))
                else:
                    land.hvp(v, out=out)
            except Exception as e:  # noqa: BLE001 - recorded: a placement the mode refuses
                err = f"{type(e).__name__}: {e}"[:300]
                break
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            times.append(time.perf_counter() - t)
        outs[name] = None if err else out.detach().to("cpu", torch.float64)
        res[name] = {"seconds": times, "median_s": sorted(times)[len(times) // 2] if times else None,
                     "peak_bytes": peak, "error": err}
        print(name, res[name], flush=True)
    ref = outs["host_in_host_out"]
    for name, o in outs.items():
        if o is not None and ref is not None:
            res[name]["rel_diff_to_host"] = float((o - ref).norm() / ref.norm())
    print(json.dumps(res, indent=1))
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
