"""The models, batches and clocks of ``benchmarks/scale.py`` (issue 16), shared with the benchmarks that reuse its
cases (``asymmetry.py``, ``probe_costs.py``, ``profile_lanczos_step.py``): the named Hugging Face configs and the
CPU MLP, the token batches, and the timers of HVPs, peaks and profiles."""

from __future__ import annotations

import cProfile
import importlib
import os
import pstats
import sys
import time
from collections.abc import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import sync  # noqa: E402

from geomprobe.engine.landscape import Landscape  # noqa: E402

FULL = ("spectrum", "trace", "density", "rmed", "diagshare", "noise", "precond")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


# ---------------------------------------------------------------------------------------------- models
def build(name: str, dtype: torch.dtype, device) -> tuple[torch.nn.Module, int, int, int]:
    """(model, vocab, batch, tokens) for a named case; weights from a fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cases = {
        "gpt2-124m": (GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257), 8, 512),
        "gpt2-355m": (GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257), 8, 512),
        "gpt2-tiny": (GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=256), 4, 32),
        # a CPU case between the tiny one and 124M (3.8M parameters): benchmarks/probe_costs.py
        "gpt2-mid": (GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=2048), 4, 128),
        "llama-1b": (LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=8192, vocab_size=32000,
                                 max_position_embeddings=2048), 4, 512),
        "llama-tiny": (LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, max_position_embeddings=64), 4, 32),
    }
    config, batch, tokens = cases[name]
    config.attn_implementation = "sdpa"
    for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cls = GPT2LMHeadModel if name.startswith("gpt2") else LlamaForCausalLM
        model = cls(config)
    return model.to(device=device, dtype=dtype), config.vocab_size, batch, tokens


class MLP(torch.nn.Module):
    """10.5M parameters: 784 -> 2048 -> 2048 -> 2048 -> 10 with tanh."""

    def __init__(self, width: int = 2048):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                       torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
                                       torch.nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def token_batches(vocab: int, batch: int, tokens: int, n: int, device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, tokens), generator=g).to(device)} for _ in range(n)]


# ---------------------------------------------------------------------------------------------- timing
def stream_sync(device) -> None:
    """Wait for the current stream of ``device`` (nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(torch.device(device)).synchronize()


class HVPClock:
    """Seconds spent inside ``Landscape.hvp`` (device-synchronized), counted for every Landscape, and apart from
    them the seconds of ``Landscape._build``: the gradient with its first-order graph, a gradient in the sense of
    the issue's "time outside HVPs and gradients" (``build_seconds``)."""

    def __init__(self, device):
        self.device, self.seconds, self.calls, self.build_seconds = device, 0.0, 0, 0.0
        self.spans: list[tuple[float, float]] = []  # each HVP's start and end (perf_counter): the gaps between
        self._orig = Landscape.hvp
        self._orig_build = Landscape._build

    def __enter__(self):
        clock = self

        def timed(land, v, out=None):
            # the calling stream only: a Lanczos run's read of an offloaded basis runs on a second stream beside
            # the product (linalg/delayed_lanczos.py), and a device-wide wait here would serialize the two
            stream_sync(clock.device)
            t0 = time.perf_counter()
            out = clock._orig(land, v, out=out)
            stream_sync(clock.device)
            t1 = time.perf_counter()
            clock.seconds += t1 - t0
            clock.spans.append((t0, t1))
            clock.calls += 1
            return out

        def timed_build(land):
            sync(clock.device)
            t0 = time.perf_counter()
            try:
                return clock._orig_build(land)
            finally:
                sync(clock.device)
                clock.build_seconds += time.perf_counter() - t0

        Landscape.hvp = timed
        Landscape._build = timed_build
        return self

    def __exit__(self, *exc):
        Landscape.hvp = self._orig
        Landscape._build = self._orig_build


def median_time(fn, device, repeats: int = 5) -> float:
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def peak_of(fn, device, reset: bool = True) -> tuple[float, int]:
    """(seconds, peak bytes allocated while ``fn`` ran, everything resident included)."""
    cuda = torch.device(device).type == "cuda"
    if cuda and reset:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() if cuda else 0)


def profile_rows_of(prof: cProfile.Profile, rows: int, callers_of: int = 8) -> dict:
    """The ``rows`` functions of most own time and of most cumulative time, with calls and seconds, and for the
    ``callers_of`` functions of most own time the callers that spent it (seconds each)."""
    st = pstats.Stats(prof)
    name = lambda k: f"{os.path.basename(k[0])}:{k[1]}:{k[2]}"
    entries = [(name(k), v[1], v[2], v[3], k) for k, v in st.stats.items()]
    pick = lambda i: [{"function": e[0], "calls": e[1], "own_s": round(e[2], 4), "cumulative_s": round(e[3], 4)}
                      for e in sorted(entries, key=lambda e: -e[i])[:rows]]
    callers = {}
    for e in sorted(entries, key=lambda e: -e[2])[:callers_of]:
        by = st.stats[e[4]][4]
        callers[e[0]] = [{"caller": name(k), "calls": v[1], "own_s": round(v[2], 4)}
                         for k, v in sorted(by.items(), key=lambda kv: -kv[1][2])[:6]]
    return {"by_own": pick(2), "by_cumulative": pick(3), "callers": callers}


class CallTimers:
    """Host seconds and calls of named functions while in a ``with`` (each ``"module:attr"`` or
    ``"module:Class.attr"`` under ``geomprobe``, replaced by a timing wrapper and put back after): where a probe's
    time outside its products goes, without a profiler's own cost."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.totals: dict[str, list] = {}
        self._undo: list = []

    def __enter__(self):
        for name in self.names:
            mod, attr = name.split(":")
            owner = importlib.import_module(f"geomprobe.{mod}")
            *path, last = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            fn = getattr(owner, last)
            tally = self.totals.setdefault(name, [0.0, 0])

            def timed(*a, _fn=fn, _tally=tally, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    _tally[0] += time.perf_counter() - t0
                    _tally[1] += 1

            setattr(owner, last, timed)
            self._undo.append((owner, last, fn))
        return self

    def __exit__(self, *exc):
        for owner, last, fn in reversed(self._undo):
            setattr(owner, last, fn)
        self._undo = []

    def report(self) -> dict:
        return {k: {"ms": round(v[0] * 1e3, 1), "calls": v[1]} for k, v in self.totals.items()}


def span_gaps(spans: list[tuple[float, float]], t0: float, t1: float) -> dict:
    """Milliseconds outside the HVPs of one probe: before the first, between each two, after the last."""
    if not spans:
        return {"before": round((t1 - t0) * 1e3, 1), "between": [], "after": 0.0}
    return {"before": round((spans[0][0] - t0) * 1e3, 1),
            "between": [round((b[0] - a[1]) * 1e3, 1) for a, b in zip(spans, spans[1:])],
            "after": round((t1 - spans[-1][1]) * 1e3, 1)}


# ---------------------------------------------------------------------------------------------- one model
def hvp_clock_lines(t0: float, every: int = 5):
    """A progress callback: a line on stderr at each metric's start and end and every ``every`` HVPs, with the
    seconds since ``t0``, so that a case a time limit kills still says how far it got and how fast it went."""

    def report(ev) -> None:
        if ev.kind in ("start", "end") or (ev.kind == "advance" and ev.hvps % every == 0):
            print(f"[{time.perf_counter() - t0:8.1f} s] {ev.kind} {ev.metric} hvps {ev.hvps}", file=sys.stderr,
                  flush=True)

    return report
