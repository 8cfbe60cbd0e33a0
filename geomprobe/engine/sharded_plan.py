"""The memory plan of the exact HVP route of an FSDP2 model (engine/sharded_landscape.py), per rank.

The one-process plan (:mod:`~geomprobe.engine.memory_plan`) counts whole d-vectors; the sharded exact route
holds some things whole and others as this rank's slice, so it is counted here, in bytes of the model's
dtype, with ``D = d * itemsize`` (whole) and ``L = d_local * itemsize`` (this rank's slice):

- **whole parameters**: every parameter all-gathered once (``whole_bytes``, the unselected ones too, which
  stand in as constants), and this rank's gradient slice ``L`` (none on the device when vectors live in
  host memory, below);
- **graphs**: per piece of ``m`` samples, its saved tensors ``s m``. Its per-parameter gradient never exists
  whole: the build reduce-scatters each parameter's gradient as autograd finishes it and keeps the graph's
  edges, not the gradient's value (:class:`~geomprobe.engine.sharded_stream.BuildPass`), so building holds
  ``STREAM_PIECES`` times the largest parameter beyond the graph. Pieces are kept while they fit (none when
  not even the first does); the others are rebuilt at every HVP, one at a time, and live during it;
- **a streamed HVP** (one vector, :mod:`~geomprobe.engine.sharded_stream`): the output slice ``L`` (in host
  memory: none), the pieces in flight (``STREAM_PIECES`` times the largest parameter: one being gathered, one
  in use, outputs on their way to the reduce-scatter) and the double backward's temporaries
  ``HVP_GRAPH_FACTOR s m``;
- **a Lanczos run**: its working vectors ``LANCZOS_WORK_VECTORS L`` and its basis, ``stored L`` on the
  device or none there when it lives in host memory;
- **a batched block** of ``k > 1`` vectors, only where it fits: ``k (3 D + s m)``, the whole inputs, the
  per-parameter outputs and their flattening (the route that gathers whole vectors), and then the build and
  every kept graph hold their whole gradient again (``D`` each), which the block differentiates.

The peak is the whole parameters, the gradient slice and the graphs plus the largest of: building a graph,
an HVP, a Lanczos run.

**Vectors in host memory** (``vector_device="cpu"``): every slice-sized vector (the gradient, HVP inputs
and outputs, Lanczos' working vectors and basis) lives in host memory, and a streamed HVP copies each
parameter's piece of its input to the device just before its all-gather and adds each reduce-scattered
piece of its output back, and the double backward's partial sums are formed on the host too; the device then
holds the whole parameters, the graphs and the pieces in flight only (the double backward's temporaries are
still counted as ``HVP_GRAPH_FACTOR s m``, which then errs high). The Lanczos arithmetic runs on the host
(slower per step). The plan takes it when nothing fits with
the slices on the device and the host can hold ``HOST_VECTORS`` slices.

The budget is :func:`~geomprobe.engine.memory_plan.budget_bytes`'s (the least of the training peak times its
ratio, the free memory and a cap, less what is allocated, times the headroom), taken over the tightest rank
by the caller. The choices, in order: where the vectors and the basis live (the basis whole on the device,
bounded to ``MIN_BOUNDED_BASIS`` vectors, in host memory; then every vector in host memory), then the
micro-batch size that keeps the most samples' graphs (the halvings of the largest batch), then the vector
chunk (1 unless a batched block fits).

>>> GiB = 2**30
>>> p = plan_sharded_exact(dim=6 * 10**9, local_dim=3 * 10**9, itemsize=2, whole_bytes=12 * GiB,
...     largest_param_bytes=GiB // 4, batch_sizes=[2], graph_bytes_per_sample=8 * GiB,
...     available_bytes=120 * GiB, allocated_bytes=18 * GiB, host_bytes=1000 * GiB,
...     bounded_basis=True)
>>> p.fits, p.micro_batch_size, p.chunk_size, p.vector_device, p.basis_device, p.max_basis
(True, None, 1, None, 'cpu', 89)
>>> q = plan_sharded_exact(dim=6 * 10**9, local_dim=3 * 10**9, itemsize=2, whole_bytes=12 * GiB,
...     largest_param_bytes=GiB // 4, batch_sizes=[2], graph_bytes_per_sample=8 * GiB,
...     available_bytes=60 * GiB, allocated_bytes=18 * GiB, host_bytes=1000 * GiB, bounded_basis=True)
>>> q.fits, q.vector_device, q.basis_device, q.items["lanczos_work"]
(True, 'cpu', 'cpu', 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..linalg.orthogonality import SELECTIVE_VECTORS
from .memory_plan import (
    DEFAULT_BASIS_VECTORS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PEAK_RATIO,
    HOST_SHARE,
    HVP_GRAPH_FACTOR,
    LANCZOS_WORK_VECTORS,
    MIN_BOUNDED_BASIS,
    MemoryPlan,
    _halvings,
    _pieces,
    budget_bytes,
    place_basis,
    selective_room,
)

__all__ = ["BLOCK_VECTORS", "GRAPH_FACTOR", "HOST_VECTORS", "STREAM_PIECES", "ShardedMemoryPlan", "plan_sharded_exact"]

# saved bytes of a first-order graph built with create_graph, per saved byte of a plain forward: the
# forward's saved tensors and the backward's (measured on the FSDP forward, which the exact route cannot run
# before it has gathered the parameters)
GRAPH_FACTOR = 3
STREAM_PIECES = 4  # whole parameters in flight in a streamed HVP: gathered ahead, in use, output, its send buffer
BLOCK_VECTORS = 3  # whole d-vectors per vector of a batched block: the input, the outputs, their flattening
# slices held in host memory beside the basis when vectors live there: the gradient, an HVP's output and
# Lanczos' working vectors
HOST_VECTORS = 2 + LANCZOS_WORK_VECTORS


@dataclass
class ShardedMemoryPlan(MemoryPlan):
    """A :class:`~geomprobe.engine.memory_plan.MemoryPlan` of the sharded exact route, with where its
    slice-sized vectors live: ``vector_device`` ``"cpu"`` (host memory) or None (the model's device)."""

    vector_device: str | None = None


def plan_sharded_exact(
    *,
    dim: int,
    local_dim: int,
    itemsize: int,
    whole_bytes: int,
    largest_param_bytes: int,
    batch_sizes: Sequence[int],
    graph_bytes_per_sample: float,
    available_bytes: int | None,
    allocated_bytes: int | None = 0,
    train_peak_bytes: int | None = None,
    peak_ratio: float = DEFAULT_PEAK_RATIO,
    cap_bytes: int | None = None,
    host_bytes: int | None = None,
    basis_vectors: int = DEFAULT_BASIS_VECTORS,
    bounded_basis: bool = False,
    can_split: bool = True,
    host_is_device: bool = False,
    max_chunk: int = DEFAULT_CHUNK_SIZE,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
    graph_source: str | None = None,
) -> MemoryPlan:
    """The settings that keep the sharded exact route within its budget on this rank, and the arithmetic
    (module docstring). Pure: no allocation, no HVP, no collective. ``overrides`` maps ``micro_batch_size``,
    ``graph_budget_bytes``, ``chunk_size``, ``basis_device``, ``max_basis``, ``vector_device`` to
    ``(value, who)``, used as given. ``fits`` is False when even the least plan exceeds the budget (it is then returned, warned)."""
    if dim < 1 or local_dim < 0 or itemsize < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigurationError(
            f"a sharded memory plan needs dim >= 1, local_dim >= 0, itemsize >= 1 and non-empty batches, got "
            f"dim={dim}, local_dim={local_dim}, itemsize={itemsize}, batch_sizes={list(batch_sizes)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None and v[0] is not None}
    budget, source = budget_bytes(available_bytes=available_bytes, allocated_bytes=allocated_bytes,
                                  train_peak_bytes=train_peak_bytes, peak_ratio=peak_ratio, cap_bytes=cap_bytes)
    D, L, s = dim * itemsize, local_dim * itemsize, float(graph_bytes_per_sample)
    m_req = min(int(basis_vectors), dim + 1)
    sources = {k: who for k, (_, who) in given.items()}
    n_max = max(batch_sizes)
    pieces_bytes = STREAM_PIECES * largest_param_bytes
    host_need = HOST_VECTORS * L
    host_room = None if host_bytes is None else int(host_bytes * HOST_SHARE)

    def fixed(on_device: bool) -> int:  # whole parameters, the gradient slice
        return whole_bytes + (L if on_device else 0)

    def stream(m: int, on_device: bool = True) -> int:
        return (L if on_device else 0) + pieces_bytes + int(HVP_GRAPH_FACTOR * s * m)

    def lanczos_work(on_device: bool) -> int:
        return LANCZOS_WORK_VECTORS * L if on_device else 0

    def layout(m: int, room: float | None) -> tuple[int, int, int, int | None, int]:
        """(kept bytes, a rebuilt piece's bytes, samples kept, graph budget, pieces kept) for pieces of ``m``."""
        pieces = _pieces(batch_sizes, m)
        sizes = [int(s * p) for p in pieces]
        if "graph_budget_bytes" in given:
            cap = given["graph_budget_bytes"][0]
        else:
            cap = None if room is None or sum(sizes) <= room else max(1, int(room))
        kept = kept_samples = rebuilt = n_kept = 0
        for p, b in zip(pieces, sizes):
            if cap is None or kept + b <= cap:
                kept, kept_samples, n_kept = kept + b, kept_samples + p, n_kept + 1
            else:
                rebuilt = max(rebuilt, b)
        return kept, rebuilt, kept_samples, cap, n_kept

    candidates = [int(given["micro_batch_size"][0])] if "micro_batch_size" in given else (
        _halvings(n_max) if can_split else [n_max])
    # (vectors on the device, bytes of basis reserved there), in order of preference
    vectors_asked = given.get("vector_device", (None,))[0]
    if vectors_asked is not None and str(vectors_asked) == "cpu":
        levels = [(False, 0)]
    else:
        if "basis_device" in given and given["basis_device"][0] == "cpu":
            reserves = [0]
        else:
            reserves = [m_req * L] + ([MIN_BOUNDED_BASIS * L] if bounded_basis and m_req > MIN_BOUNDED_BASIS else [])
            reserves += [] if host_is_device else [0]
        levels = [(True, r) for r in reserves]
        if vectors_asked is None and not host_is_device and (host_room is None or host_room >= host_need):
            levels.append((False, 0))

    best = None
    for on_device, reserve in levels:
        for m in candidates:
            if budget is None:
                best = (on_device, m, *layout(m, None))
                break
            least = max(pieces_bytes, stream(m, on_device) + lanczos_work(on_device) + reserve)
            got = layout(m, budget - fixed(on_device) - least)
            if got[1]:  # a rebuilt piece lives beside the kept ones during its HVP
                got = layout(m, budget - fixed(on_device) - least - got[1])
            if fixed(on_device) + got[0] + got[1] + least <= budget and (best is None or got[2] > best[4]):
                best = (on_device, m, *got)
        if best is not None:
            break
    fits = best is not None
    if best is None:  # nothing fits: the least need, the largest pieces within 10 % of it
        on_device = levels[-1][0]
        needs = [(fixed(on_device) + k + r + max(pieces_bytes, stream(m, on_device) + lanczos_work(on_device)),
                  on_device, m, k, r, ks, c, nk) for m in candidates for k, r, ks, c, nk in [layout(m, 0)]]
        least = min(n[0] for n in needs)
        best = next(n[1:] for n in needs if n[0] <= 1.1 * least)
    on_device, m, kept, rebuilt, _, graph_cap, n_kept = best
    graphs = fixed(on_device) + kept + rebuilt
    rest = None if budget is None else budget - graphs

    def value(name: str, default: Any) -> Any:
        if name in given:
            return given[name][0]
        sources.setdefault(name, "plan")
        return default

    vector_device = value("vector_device", None if on_device else "cpu")
    micro = value("micro_batch_size", m if m < n_max else None)
    graph_budget = value("graph_budget_bytes", graph_cap)
    per_block_vector = BLOCK_VECTORS * D + int(s * m)
    # whole blocks need every kept graph's whole gradient (and a rebuilt one's while it lives)
    block_grads = D * (n_kept + (1 if rebuilt else 0))
    if rest is None:
        k = max_chunk
    elif not fits or not on_device:
        k = 1
    else:
        k = int(min(max_chunk, max(1, (rest - block_grads) // per_block_vector)))
    chunk = int(value("chunk_size", k))
    if chunk > 1:
        graphs += block_grads
        rest = None if rest is None else rest - block_grads

    room = None if rest is None else rest - stream(m, on_device) - lanczos_work(on_device)
    warns: list[str] = []
    if on_device:
        where, cap_basis, placed = place_basis(m_req, L, room, host_bytes, bounded_basis=bounded_basis,
                                               host_is_device=host_is_device)
    else:  # the basis beside the other vectors, in what the host has left after them
        left = None if host_bytes is None else max(0, int(host_bytes - host_need / HOST_SHARE))
        where, cap_basis, placed = place_basis(m_req, L, 0, left, bounded_basis=bounded_basis, host_is_device=False)
        if host_room is not None and host_room < host_need:
            placed = False
    if not placed:
        warns.append(f"a Lanczos basis of {m_req} slices ({m_req * L / 2**30:.2f} GiB) fits neither the budget "
                     "nor the host; Lanczos may run out of memory: lower max_iter")
    basis_device = value("basis_device", where)
    max_basis = value("max_basis", cap_basis)
    stored = m_req if max_basis is None else min(m_req, int(max_basis))
    basis_on_device = 0 if basis_device == "cpu" or (basis_device is None and not on_device) else stored * L
    build_phase = D if chunk > 1 else pieces_bytes
    hvp_phase = stream(m, on_device) if chunk == 1 else chunk * per_block_vector
    selective_work = selective_room(SELECTIVE_VECTORS * L, itemsize, on_device, None if budget is None else
                                    budget - graphs - stream(m, on_device) - lanczos_work(on_device) - basis_on_device)
    lanczos_phase = stream(m, on_device) + lanczos_work(on_device) + basis_on_device + selective_work
    peak = graphs + max(build_phase, hvp_phase, lanczos_phase)
    if budget is not None and peak > budget:
        fits = False
    if budget is not None and not fits:
        warns.insert(0, f"the sharded exact route needs about {peak / 2**30:.2f} GiB per GPU beyond the "
                        f"{(allocated_bytes or 0) / 2**30:.2f} GiB allocated, but {source} leaves "
                        f"{budget / 2**30:.2f} GiB; it runs with micro-batches of {micro or n_max} and may run "
                        "out of memory (recorded; training continues)")
    items = {
        "whole_parameters": int(whole_bytes), "gradient_slice": L if on_device else 0, "vector": D, "slice": L,
        "graph_per_piece": int(s * m), "graphs_kept": kept, "graph_rebuilt": rebuilt,
        "block_gradients": block_grads if chunk > 1 else 0, "build_gradient": build_phase,
        "stream_hvp": stream(m, on_device), "hvp_phase": hvp_phase, "lanczos_work": lanczos_work(on_device),
        "basis_on_device": basis_on_device, "basis_full": m_req * L, "selective_work": selective_work,
        "lanczos_phase": lanczos_phase,
        "host_vectors": 0 if on_device else host_need + (0 if basis_on_device else stored * L),
    }
    return ShardedMemoryPlan(
        budget_bytes=budget, budget_source=source, allocated_bytes=allocated_bytes, available_bytes=available_bytes,
        train_peak_bytes=train_peak_bytes, peak_ratio=float(peak_ratio), cap_bytes=cap_bytes,
        host_available_bytes=host_bytes, dim=int(dim), itemsize=int(itemsize),
        batch_sizes=[int(b) for b in batch_sizes], graph_bytes_per_sample=float(s), micro_batch_size=micro,
        graph_budget_bytes=graph_budget, chunk_size=chunk, basis_device=basis_device, max_basis=max_basis,
        persample_bytes=None, basis_vectors=m_req, bounded_basis=bool(bounded_basis), peak_bytes=int(peak),
        fits=bool(fits), items=items, sources=sources, warnings=warns, graph_source=graph_source,
        device_vectors=None if room is None else max(0, int(room // max(L, 1))), vector_device=vector_device,
    )
