"""Which attention a Landscape builds its first-order graphs with, chosen by its memory plan.

torch's math attention, the only scaled-dot-product kernel with a double backward, keeps the (T x T)
probabilities (and, built for a double backward, more tensors of that size) in every graph; geomprobe's own
double backward (:mod:`~geomprobe.engine.autodiff.attndouble`) runs torch's fused kernel and recomputes them at
every HVP. On an H200 (GPT-2 124M, bf16, 8 x 512, benchmarks/RESULTS.md §6) the recomputing graph was 0.63x the
math one (6.5 against 10.2 GB), but an HVP through a kept graph 1.36x slower (0.152 against 0.112 s). A graph
that does not fit is rebuilt at every HVP call instead, which costs far more: under the 1.5x plan, micro-batches
of one sample and 7 of 8 graphs rebuilt, an HVP took 0.96 s. Hence the rule of ``recompute_attention=None``
("auto"), stated in :func:`choose_attention`:

1. torch's attention wherever its plan fits with every graph kept, or nothing limits memory, or there is no
   plan (``memory=None``), no double backward (finite differences) or ``fast_double_backward=False`` (whose
   absence leaves the recomputing attention out of reach): one measuring forward, as before;
2. otherwise, when the model calls attention in a form the recomputing double backward takes (counted in
   that measuring forward), a second measuring forward on the same slice measures the graph with it, and the
   plan is made again; the recomputing attention is kept when torch's plan does not fit and its planned peak
   is lower, or when torch's plan fits only by rebuilding graphs and its own plan fits keeping enough more
   samples' graphs to pay for its slower products (:func:`choose_attention`): on GPT-2 355M under the 1.5x plan
   torch's attention kept 0 of 8 graphs and the recomputing one 1, and the products took 2.83 s with it
   against 1.79 s for torch's with every graph rebuilt (benchmarks/RESULTS.md §6).

``True`` and ``False`` force either attention: one measuring forward, with that attention. The choice, its
reason and both figures are recorded in :attr:`MemoryPlan.attention` and ``Landscape.info()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .autodiff.fastdouble import AttentionCalls, fast_double_backward
from .batches import batch_size, slice_batch
from .host_stream import RootCapture
from .memory_plan import MemoryBudget, MemoryPlan, _gib
from .saved_bytes import SavedBytes

__all__ = ["choose_attention", "measure_graph", "plan_attention", "requested_label"]

TORCH, RECOMPUTE = "math", "recompute"


def requested_label(requested: bool | None) -> str | bool:
    return "auto" if requested is None else bool(requested)


def measure_graph(land: Any, can_split: bool, recompute: bool) -> tuple[float, str, AttentionCalls]:
    """Saved bytes per sample of the first-order graph of ``land`` (a Landscape), built with the recomputing
    attention or with torch's, on a slice of about 1/8 of the first batch (at least 2 samples where a layer
    normalizes over the batch, else at least 1; the whole batch where it may not be split), and the attention
    calls counted.
    Cost: one forward and one first backward (``create_graph``) on that slice; exact byte count of what
    autograd saves, each storage once, parameters not."""
    batch = land.batches[0]
    n = batch_size(batch)
    # two samples only where a layer normalizes over the batch: on a 1B language model each sample's graph is
    # GBs, and this forward's peak is the probe's own
    least = 2 if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in land.model.modules()) else 1
    m = min(n, max(least, math.ceil(n / 8))) if can_split else n
    piece = slice_batch(batch, n, 0, m)
    counter = SavedBytes(land.params)
    # each parameter's gradient is dropped as autograd finishes it (RootCapture): no whole gradient beside the graph
    with (land.frozen(0), counter.hooks(),
          fast_double_backward(land.fast_double_backward, recompute, land.model) as calls, RootCapture(land.params)):
        loss = land.loss_on(piece)
        grads = torch.autograd.grad(loss, land.params, create_graph=True, allow_unused=True)
    del grads, loss
    attention = " with recomputing attention" if recompute else ""
    return counter.bytes / m, f"measured on {m} of {n} samples{attention}", calls


def _summary(plan: MemoryPlan) -> dict:
    return {"peak_bytes": plan.peak_bytes, "fits": plan.fits, "samples_kept": plan.samples_kept,
            "micro_batch_size": plan.micro_batch_size, "graph_bytes_per_sample": plan.graph_bytes_per_sample}


# an HVP through a kept graph with the recomputing attention, relative to torch's (the module docstring)
RECOMPUTE_SLOWDOWN = 1.36
# a double backward through a kept graph, relative to rebuilding that graph (a forward and a first backward, about
# a gradient): HVP / gradient 2.07-2.13 on GPT-2 124M-355M and the 1B Llama on an H200 (benchmarks/RESULTS.md)
HVP_PER_REBUILD = 2.1


def choose_attention(torch_plan: MemoryPlan, recompute_plan: MemoryPlan) -> tuple[bool, str]:
    """Whether to build graphs with the recomputing attention, given the plan with torch's attention (which
    does not fit, or rebuilds graphs) and the plan with the recomputing one, and why. Pure, costs nothing.

    The rule: when torch's plan does not fit, the plan with the lower planned peak (ties: torch's, faster per
    HVP); when it fits, the recomputing attention only if its plan fits too and either cuts the batch into larger
    micro-batches (a GPU runs small pieces far below its speed: GPT-2 355M fp32, 8 x 512, an HVP 0.47 s whole
    and 1.20 s in pieces of one sample, graphs kept) or, at the same pieces, its products are predicted faster.
    Per sample, in units of rebuilding a graph (a forward and first backward), an HVP costs
    :data:`HVP_PER_REBUILD` through a kept graph with torch's attention, :data:`RECOMPUTE_SLOWDOWN` times that
    with the recomputing one, plus 1 for each graph rebuilt; so the recomputing attention must keep more than
    ``(RECOMPUTE_SLOWDOWN - 1) * HVP_PER_REBUILD`` (0.76) of the samples more than torch's does."""
    total = sum(torch_plan.batch_sizes)
    t_kept, r_kept = torch_plan.samples_kept or 0, recompute_plan.samples_kept or 0
    if not torch_plan.fits:
        if recompute_plan.peak_bytes < torch_plan.peak_bytes:
            return True, (f"with torch's attention the plan does not fit (peak {_gib(torch_plan.peak_bytes)} against "
                          f"{_gib(torch_plan.budget_bytes or 0)}); recomputing attention plans a lower peak "
                          f"({_gib(recompute_plan.peak_bytes)}{', which fits' if recompute_plan.fits else ''})")
        return False, (f"with torch's attention the plan does not fit (peak {_gib(torch_plan.peak_bytes)}); "
                       f"recomputing attention plans no lower peak ({_gib(recompute_plan.peak_bytes)})")
    t_cost = total * HVP_PER_REBUILD + (total - t_kept)  # per HVP, in graph rebuilds
    r_cost = total * HVP_PER_REBUILD * RECOMPUTE_SLOWDOWN + (total - r_kept)
    t_piece, r_piece = (p.micro_batch_size or max(p.batch_sizes) for p in (torch_plan, recompute_plan))
    if recompute_plan.fits and r_piece > t_piece:
        return True, (f"torch's attention fits by rebuilding graphs at every HVP ({t_kept} of {total} samples' "
                      f"graphs kept, micro-batches of {t_piece}); recomputing attention keeps {r_kept} in "
                      f"micro-batches of {r_piece}")
    if recompute_plan.fits and r_cost < t_cost:
        return True, (f"torch's attention fits by rebuilding graphs at every HVP ({t_kept} of {total} samples' "
                      f"graphs kept); recomputing attention keeps {r_kept}, predicted {r_cost / t_cost:.2f}x the "
                      f"time per HVP")
    why = ("does not fit" if not recompute_plan.fits else
           f"predicted {r_cost / t_cost:.2f}x the time per HVP: its slower products cost more than the rebuilds saved")
    return False, (f"torch's attention fits by rebuilding graphs ({t_kept} of {total} samples' graphs kept); "
                   f"recomputing attention keeps {r_kept}, {why}")


def plan_attention(land: Any, memory: MemoryBudget, plan: Callable[..., MemoryPlan], can_split: bool,
                   requested: bool | None) -> tuple[MemoryPlan, dict, dict]:
    """The memory plan of ``land`` and the attention its graphs are built with (module docstring).

    ``plan(graph_bytes_per_sample, graph_source, persample_graph_bytes_per_sample)`` plans with a figure (see
    :func:`~geomprobe.engine.memory_plan.plan_memory`). Returns the plan (its ``attention`` set), the
    attention record, and the figures per attention (``{"math": ..., "recompute": ...}``, bytes per sample,
    None where not measured). Cost: no forward when ``memory`` gives the figures needed or nothing limits
    memory; one measuring forward (:func:`measure_graph`) for the first plan, one more only where rule 2 of the
    module applies."""
    fast = land.fast_double_backward
    figures: dict[str, float | None] = {TORCH: memory.graph_bytes_per_sample,
                                        RECOMPUTE: memory.recompute_graph_bytes_per_sample}
    calls = memory.attention_calls
    record: dict[str, Any] = {"requested": requested_label(requested), "recompute": False, "reason": "",
                              "attention_calls": calls, "graph_bytes_per_sample": figures, "other_plan": None}

    def done(p: MemoryPlan, recompute: bool, reason: str) -> tuple[MemoryPlan, dict, dict]:
        record.update(recompute=recompute, reason=reason, attention_calls=calls, graph_bytes_per_sample=dict(figures))
        p.attention = record
        return p, record, figures

    first = RECOMPUTE if requested and fast else TORCH
    per_sample, source = figures[first], "given"
    if per_sample is None:
        unlimited = plan(None, None, None)
        if unlimited.budget_bytes is None:  # nothing limits the probe: nothing to measure
            return done(unlimited, first == RECOMPUTE, _forced(requested, fast) or "no memory limit: torch's attention")
        per_sample, source, counted = land._measure_graph_per_sample(can_split, first == RECOMPUTE)
        figures[first], calls = per_sample, counted.takeable if fast else calls
    first_plan = plan(per_sample, source, figures[TORCH])
    forced = _forced(requested, fast)
    if forced:
        return done(first_plan, first == RECOMPUTE, forced)
    if first_plan.budget_bytes is None:
        return done(first_plan, False, "no memory limit: torch's attention")
    if first_plan.fits and first_plan.samples_kept == sum(first_plan.batch_sizes):
        return done(first_plan, False, "torch's attention fits with every graph kept")
    if calls == 0:
        return done(first_plan, False, "no attention call that the recomputing double backward takes")
    other, other_source = figures[RECOMPUTE], "given"
    if other is None:
        other, other_source, counted = land._measure_graph_per_sample(can_split, True)
        figures[RECOMPUTE], calls = other, counted.takeable
        if calls == 0:
            return done(first_plan, False, "no attention call that the recomputing double backward takes")
    second = plan(other, other_source, figures[TORCH])
    recompute, reason = choose_attention(first_plan, second)
    record["other_plan"] = _summary(first_plan if recompute else second)
    return done(second if recompute else first_plan, recompute, reason)


def _forced(requested: bool | None, fast: bool) -> str | None:
    """The reason for an attention the rule does not choose, or None when it does."""
    if requested is None:
        return None if fast else "fast_double_backward=False: torch's attention"
    if requested and not fast:
        return "requested, but fast_double_backward=False: torch's attention"
    return "requested"
