"""The memory plan of a probe: how to measure within a byte budget, decided before measuring.

A probe's memory beyond what is already allocated when it starts (the model, its gradients, the optimizer's
state) is counted in d-vectors of the model's dtype, ``v = d * itemsize`` bytes, and in ``s``, the bytes a
first-order graph saves per sample (measured on a slice of the first probe batch, or by the previous probe;
with the attention that :mod:`~geomprobe.engine.attention_plan` chooses):

- **graphs**: the flat gradient (``v``) and, per kept piece of ``m`` samples, its saved tensors ``s m`` and
  its gradient (``v``). A piece whose graph is not kept is rebuilt at every HVP call and lives during it.
- **a block of k batched HVPs** (``rmed``, ``diagshare``, traces): ``k (HVP_VECTORS v + HVP_GRAPH_FACTOR s m)``,
  the vectors in, the per-parameter results and their flattening, and each vector's double backward through
  the piece's graph; for ``k > 1`` one more ``k v``, the per-parameter slices of the block (copied, as they
  are not contiguous).
- **a Lanczos run** (one vector at a time): one HVP, its working vectors ``LANCZOS_WORK_VECTORS v`` (the kernel
  keeps vectors in the model's dtype, no float64 copies), and its basis: ``basis_vectors`` vectors on the
  device, none there when the basis lives in host memory, ``max_basis`` vectors when the bounded-memory
  Lanczos holds fewer; with the basis in host memory, two more (``items["delayed_work"]``) where they fit, for
  the passes that run beside the products (:mod:`~geomprobe.linalg.delayed_lanczos`); with float32 or float64
  vectors, ``SELECTIVE_VECTORS`` more (``items["selective_work"]``) where they fit beside the basis, for the
  converged Ritz vectors selective orthogonalization keeps (:mod:`~geomprobe.linalg.orthogonality`; never with the
  delayed loop's two, which run only once every step is a whole-basis pass). Where they do not fit, the
  metrics run Lanczos with ``selective=False`` (whole-basis steps instead).
- **host vectors** (:mod:`~geomprobe.engine.host_stream`): none of the d-vectors above on the device (the
  gradient, the HVP's vectors, Lanczos' working vectors and basis live in host memory); an HVP holds its
  double backward's temporaries and one input and one output piece of the largest parameter
  (``largest_param_bytes``) at a time; a graph rebuilt per HVP holds its gradient (``v``) until its roots
  are taken; where every graph is rebuilt the double backward's temporaries count ``REBUILT_HVP_FACTOR s m``
  (``_FULL`` for float32 and float64; it frees the graph as it goes). HVPs go one vector at a time. With
  ``working_vectors="device"`` (asked for through ``overrides``, or chosen where the plan moved the vectors to
  the host itself and this fits) Lanczos keeps its working vectors on the device, its basis in host memory
  (``lean``, :func:`~geomprobe.linalg.lanczos.lanczos`): two d-vectors beside each product
  (:func:`~geomprobe.linalg.lean_vectors.lean_work_bytes`), three between products (``lean_step_bytes``).
  ``working_vectors="streamed"`` is the same with each product reading its input from the stored host row: one
  d-vector beside each product (its output); the input crosses the bus inside each product.
- **per-example gradients** (``noise``, ``isotropy``): rows of ``2 d itemsize + PERSAMPLE_GRAPH_FACTOR s``
  bytes (the per-parameter results and their flattening, one example's forward and backward; the statistics
  take rows to float64 a slice of columns at a time), and the statistics' ``STATS_VECTORS`` float64 d-vectors.
  Only when a metric of the probe streams gradient samples.

The graphs stay for the whole probe; the other three phases follow one another, so the probe's peak is the
graphs plus the largest phase. The budget for it is the least of

- ``peak_ratio x training peak - allocated`` where the training step's peak is known (default ratio 1.5),
- the memory the device can still give (free plus cached by torch's allocator; on the CPU, available RAM),
- ``memory_cap - allocated`` for a cap the user sets,

times :data:`HEADROOM` for fragmentation (a lean plan takes the training-peak target whole: :func:`_lean_plan`).
:func:`plan_memory` then chooses, each only as far as needed:

1. where the Lanczos basis lives: whole on the device if it fits beside one piece's graph; else, when the
   metrics' Lanczos can bound its basis, ``max_basis`` vectors on the device (at least
   :data:`MIN_BOUNDED_BASIS`); else in host memory (``basis_device="cpu"``, whole, or bounded to what
   :data:`HOST_SHARE` of the host's RAM holds). A model on the CPU has no host to move it to. When even the
   basis in host memory leaves too many d-vectors on the device (the HVP's input and output and Lanczos'
   working vectors) and the model is on CUDA in one process, the vectors go to host memory too
   (``vectors="host"``): slower (``d`` elements over PCIe each way per HVP and probe batch, the Krylov
   arithmetic on the CPU), but nothing of length ``d`` stays on the device;
2. pieces of the probe batches (``micro_batch_size``: the largest that keeps the most samples' graphs beside
   that basis, the others recomputed per HVP) and how many pieces keep their graph (``graph_budget_bytes``);
3. the vector chunk of batched HVPs (``chunk_size``, up to 16) in what the graphs leave;
4. the bytes per-example gradients may take at once (``persample_bytes``).

An explicit setting wins and is recorded as such. A budget nothing fits gives the smallest plan (one vector at
a time; the largest pieces within 10 % of the least need, so a batch is not cut to single samples where the
d-vectors, not the graph, overflow) and a warning, never an error: the probe's out-of-memory handling stays
the safety net. The arithmetic is a model, not a measurement; the record keeps both (``items`` and
``peak_bytes`` beside the peak the probe measured), so the constants below can be checked on a GPU.

>>> GiB = 2**30
>>> p = plan_memory(dim=10**8, itemsize=4, batch_sizes=[8], graph_bytes_per_sample=GiB,
...                 available_bytes=80 * GiB, allocated_bytes=2 * GiB, train_peak_bytes=16 * GiB)
>>> p.budget_source, p.micro_batch_size, p.chunk_size, p.basis_device, p.fits
('training peak', None, 1, 'cpu', True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ConfigurationError
from ..linalg.delayed_lanczos import DELAYED_EXTRA_VECTORS
from ..linalg.lean_vectors import LEAN_MODES, lean_step_bytes, lean_work_bytes
from ..linalg.orthogonality import SELECTIVE_VECTORS
from .memory_readings import device_memory, host_available_bytes, read_training_peak
from .plan_limits import (
    DEFAULT_PEAK_RATIO,
    HEADROOM,
    HOST_SHARE,
    MIN_BOUNDED_BASIS,
    _halvings,
    _pieces,
    budget_bytes,
    place_basis,
    selective_room,
)

__all__ = [
    "MemoryBudget", "MemoryPlan", "plan_memory", "budget_bytes", "device_memory", "host_available_bytes",
    "read_training_peak", "persample_row_bytes", "DEFAULT_PEAK_RATIO", "DEFAULT_CHUNK_SIZE", "HEADROOM", "HOST_SHARE",
    "MIN_BOUNDED_BASIS", "place_basis", "selective_room",
]

DEFAULT_CHUNK_SIZE = 16       # vectors per batched HVP when memory allows
DEFAULT_BASIS_VECTORS = 301   # Lanczos' default max_iter (300) plus its start vector
HVP_VECTORS = 3               # d-vectors per vector of an HVP: V, the per-parameter results, their flattening
HVP_GRAPH_FACTOR = 1.0        # a double backward's temporaries per vector, relative to the piece's saved bytes
# the same for a graph rebuilt per HVP with host vectors, which the double backward frees as it goes: measured
# beyond the graph and two pieces on the 1.1B Llama (one sample per graph, H200), 0.04 (fp32: 6.85 GB in all for
# a 6.57 GB graph) and 0.27 (bf16: 3.77 GB for 2.77 GB) of the graph's bytes, where 1.0 had planned 13.7 and
# 5.8 GB (benchmarks/RESULTS.md section 6, seventeenth, eighteenth and twentieth rounds)
REBUILT_HVP_FACTOR = 0.35      # half types
REBUILT_HVP_FACTOR_FULL = 0.1  # float32 and float64
STATS_VECTORS = 6            # float64 d-vectors the gradient-noise statistics hold (see plan_memory)
LANCZOS_WORK_VECTORS = 4      # w, the newest and previous basis vectors, a Ritz vector
PERSAMPLE_GRAPH_FACTOR = 2.0  # one example's forward and backward in vmap, relative to its saved bytes


@dataclass
class MemoryBudget:
    """What is known about the memory a probe may use, before planning it (JSON-ready).

    ``cap_bytes``: an absolute cap on device memory in use during the probe; ``train_peak_bytes``: the
    training step's peak, when known; ``peak_ratio``: the probe's peak may reach this multiple of it;
    ``graph_bytes_per_sample``: saved bytes of the first-order graph per sample, when a previous probe measured
    them (skips the measuring forward); ``bounded_basis``: the Lanczos runs of the probe can be told to hold at
    most ``max_basis`` vectors (else a basis that does not fit moves to host memory); ``basis_vectors``: the most
    vectors a Lanczos run of the probe stores (0: none runs; None: 301, Lanczos' default); ``overrides``: settings
    fixed by someone other than the plan, name -> (value, who): e.g. ``{"basis_device": ("cpu", "oom-ladder")}``;
    ``warn``: the Landscape warns when the plan does not fit (the probe warns once per run itself);
    ``gradient_samples``: a metric of the probe streams gradient samples (``noise``, ``isotropy``), so their
    phase is planned; False leaves it out (a probe without such metrics must not shrink for it).
    ``graph_bytes_per_sample`` is the figure with torch's attention; ``recompute_graph_bytes_per_sample`` the
    one with geomprobe's recomputing attention, and ``attention_calls`` the attention calls that one takes
    (:mod:`~geomprobe.engine.attention_plan`), when a previous probe measured them.
    """

    cap_bytes: int | None = None
    train_peak_bytes: int | None = None
    peak_ratio: float = DEFAULT_PEAK_RATIO
    graph_bytes_per_sample: float | None = None
    bounded_basis: bool = False
    basis_vectors: int | None = None
    overrides: dict[str, tuple[Any, str]] = field(default_factory=dict)
    warn: bool = True
    gradient_samples: bool = True
    recompute_graph_bytes_per_sample: float | None = None
    attention_calls: int | None = None


@dataclass
class MemoryPlan:
    """The settings a probe runs with and the arithmetic that chose them (bytes), JSON-ready by :meth:`to_dict`.

    ``budget_bytes`` is what the probe may add to ``allocated_bytes`` (None: no limit known);
    ``items`` the modelled bytes of each part and phase (see the module docstring), ``peak_bytes`` their
    planned peak above ``allocated_bytes``; ``sources`` says for each setting whether the plan, the user or
    the out-of-memory safety net chose it; ``fits`` is False when even the smallest plan exceeds the budget.
    ``samples_kept``: samples whose first-order graph is kept (the others are rebuilt at every HVP call);
    ``attention``: which attention the graphs are built with and why (:mod:`~geomprobe.engine.attention_plan`).
    ``vectors``: ``"host"`` when the HVP vectors live in host memory (:mod:`~geomprobe.engine.host_stream`).
    """

    budget_bytes: int | None
    budget_source: str
    allocated_bytes: int | None
    available_bytes: int | None
    train_peak_bytes: int | None
    peak_ratio: float
    cap_bytes: int | None
    host_available_bytes: int | None
    dim: int
    itemsize: int
    batch_sizes: list[int]
    graph_bytes_per_sample: float | None
    micro_batch_size: int | None
    graph_budget_bytes: int | None
    chunk_size: int
    basis_device: str | None
    max_basis: int | None
    persample_bytes: int | None
    basis_vectors: int
    bounded_basis: bool
    peak_bytes: int
    fits: bool
    items: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    graph_source: str | None = None
    # d-vectors (model dtype) left on the device beside the graphs, one HVP and Lanczos' working vectors, for
    # what a metric stores itself (a Lanczos basis, a trace's Krylov basis and sketches); None: no limit
    device_vectors: int | None = None
    samples_kept: int | None = None
    attention: dict | None = None
    # "host": HVP vectors, the gradient and the Lanczos vectors in host memory, streamed through each double
    # backward parameter by parameter (engine/host_stream.py); "device": on the model's device
    vectors: str = "device"
    # with host vectors, where Lanczos' working vectors live: "host" (the Krylov arithmetic on the CPU),
    # "device" (two d-vectors on the model's device, the basis in host memory: lanczos(lean=True)) or "streamed"
    # (the same, each product reading its input from the host row: lanczos(lean="streamed")); None otherwise
    working_vectors: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def persample_row_bytes(dim: int, itemsize: int, graph_bytes_per_sample: float | None) -> int:
    """Bytes one per-example gradient costs while it streams into the noise statistics (module docstring)."""
    # the per-parameter results and their flattening in the model's dtype; the statistics take rows to float64
    # a slice of columns at a time, so no float64 copy of a row
    return int(dim * 2 * itemsize + PERSAMPLE_GRAPH_FACTOR * (graph_bytes_per_sample or 0.0))


# ---------------------------------------------------------------------------------------------- planning
def plan_memory(
    *,
    dim: int,
    itemsize: int,
    batch_sizes: Sequence[int],
    graph_bytes_per_sample: float | None,
    available_bytes: int | None,
    allocated_bytes: int | None = 0,
    train_peak_bytes: int | None = None,
    peak_ratio: float = DEFAULT_PEAK_RATIO,
    cap_bytes: int | None = None,
    host_bytes: int | None = None,
    basis_vectors: int = DEFAULT_BASIS_VECTORS,
    basis_itemsize: int | None = None,
    bounded_basis: bool = False,
    can_split: bool = True,
    gradient_samples: bool = True,
    host_is_device: bool = False,
    max_chunk: int = DEFAULT_CHUNK_SIZE,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
    graph_source: str | None = None,
    persample_graph_bytes_per_sample: float | None = None,
    host_vectors: bool = False,
    largest_param_bytes: int | None = None,
    target_headroom: float = HEADROOM,
) -> MemoryPlan:
    """The settings that keep a probe within its budget, and the arithmetic behind them (module docstring).

    Pure: every figure is an argument, so a plan for an 80 GiB GPU can be computed and tested on a laptop.
    ``overrides`` maps any of ``micro_batch_size``, ``graph_budget_bytes``, ``chunk_size``, ``basis_device``,
    ``max_basis``, ``persample_bytes`` to ``(value, who)``: the value is used as given and ``who`` recorded.
    ``gradient_samples=False``: no metric streams gradient samples, so that phase (rows of per-example gradients
    and the statistics' float64 moments) is not planned and ``persample_bytes`` is None.
    ``bounded_basis``: the Lanczos kernel can hold at most ``max_basis`` vectors. ``can_split``: probe batches
    may be cut into micro-batches (not in train mode with BatchNorm). ``host_is_device``: the model is on the CPU,
    so host memory is the budget itself and a basis moved there saves nothing.
    ``persample_graph_bytes_per_sample``: the graph figure of per-example gradients when it differs from the
    HVP graph's (they run torch's attention, whichever attention the HVP graphs use); default the same.
    ``host_vectors``: the HVP vectors may move to host memory (a CUDA model in one process, exact HVPs); taken
    only when no plan with device vectors fits, or when ``overrides`` sets ``vectors`` to ``"host"``.
    ``largest_param_bytes``: the largest parameter's bytes, a host-vector HVP's piece in flight (None: not counted).
    ``target_headroom``: the share of the training-peak limit planned for (:func:`budget_bytes`).
    Costs nothing (no HVP, no allocation).
    """
    args = dict(locals())  # this call's arguments, for the lean variant (_lean_plan)
    if dim < 1 or itemsize < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigurationError(
            f"a memory plan needs dim >= 1, itemsize >= 1 and non-empty batches, got dim={dim}, "
            f"itemsize={itemsize}, batch_sizes={list(batch_sizes)}"
        )
    given = {k: v for k, v in (overrides or {}).items() if v is not None and v[0] is not None}
    for name in ("micro_batch_size", "chunk_size", "max_basis"):
        if name in given and int(given[name][0]) < 1:
            raise ConfigurationError(f"{name} must be >= 1, got {given[name][0]}")
    if given.get("vectors", ("device",))[0] not in ("device", "host"):
        raise ConfigurationError(f"vectors must be 'device' or 'host', got {given['vectors'][0]!r}")
    if given.get("working_vectors", ("host",))[0] not in ("host", *LEAN_MODES):
        raise ConfigurationError(
            f"working_vectors must be 'host', 'device' or 'streamed' (the host-vector mode's Lanczos vectors), got "
            f"{given['working_vectors'][0]!r}")
    budget, source = budget_bytes(available_bytes=available_bytes, allocated_bytes=allocated_bytes,
                                  train_peak_bytes=train_peak_bytes, peak_ratio=peak_ratio, cap_bytes=cap_bytes,
                                  target_headroom=target_headroom)
    v = dim * itemsize
    bv = dim * (basis_itemsize or itemsize)
    m_req = min(int(basis_vectors), dim + 1)
    s = float(graph_bytes_per_sample or 0.0)
    n_max = max(batch_sizes)
    total = sum(batch_sizes)
    sources = {k: who for k, (_, who) in given.items()}
    warns: list[str] = []
    lanczos_work = LANCZOS_WORK_VECTORS * v
    # d-vectors on the device in the default mode: the flat gradient, each kept graph's gradient, an HVP's
    # vectors; host vectors leave none there (a graph's gradient leaves it parameter by parameter as it forms)
    flat, kept_v, rebuilt_v, hvp_vectors = v, v, v, HVP_VECTORS * v
    host = given.get("vectors", (None,))[0] == "host"
    # the gradient-sample phase, only where a metric streams gradient samples
    # float64 d-vectors of the statistics: mean and variance, and in the second pass a group's sums (two),
    # a view's scaled variance and the variance without the group
    stats_fixed = STATS_VECTORS * dim * 8 if gradient_samples else 0
    s_row = s if persample_graph_bytes_per_sample is None else float(persample_graph_bytes_per_sample)
    row = persample_row_bytes(dim, itemsize, s_row) if gradient_samples else 0

    def value(name: str, default: Any) -> Any:
        if name in given:
            return given[name][0]
        sources.setdefault(name, "plan")
        return default

    # ---- graphs: the micro-batch size and how many pieces keep their graph
    if "micro_batch_size" in given:
        candidates = [int(given["micro_batch_size"][0])]
    else:
        candidates = _halvings(n_max) if can_split else [n_max]

    def layout(m: int, room: float | None) -> tuple[int, int, int, int | None]:
        """(kept bytes, rebuilt-piece bytes, kept samples, graph budget) for pieces of ``m`` within ``room``."""
        pieces = _pieces(batch_sizes, m)
        piece_bytes = [int(s * p) + kept_v for p in pieces]
        if "graph_budget_bytes" in given:
            cap = given["graph_budget_bytes"][0]
        elif room is None or sum(piece_bytes) <= room:
            cap = None
        else:
            cap = max(1, int(room))
        kept, kept_samples, rebuilt = 0, 0, 0
        for p, b in zip(pieces, piece_bytes):
            # a graph is kept only where it fits, the first too: under a budget below one graph every graph
            # is rebuilt per HVP, which keeps the vectors on the device (GPT-2 355M at 1.5x: a product 1.79 s
            # against 3.9 s for host vectors, benchmarks/RESULTS.md §6)
            if cap is None or kept + b <= cap:
                kept += b
                kept_samples += p
            else:
                rebuilt = max(rebuilt, int(s * p) + rebuilt_v)
        return kept, rebuilt, kept_samples, cap

    def minimal_phase(m: int, reserve: int) -> int:
        """The least any phase needs: one HVP with a Lanczos run's working vectors and ``reserve`` bytes of its
        basis on the device, or one example's row."""
        one_hvp = hvp_vectors + int(HVP_GRAPH_FACTOR * s * m)
        return max(one_hvp + lanczos_work + reserve, stats_fixed + row)

    def search(reserve: int) -> tuple | None:
        best = None
        for m in candidates:
            if budget is None:
                return (m, *layout(m, None))
            least = minimal_phase(m, reserve)
            kept, rebuilt, kept_samples, cap = layout(m, budget - flat - least)
            if rebuilt:
                # some graphs are rebuilt: one of them lives beside the kept ones during its HVPs
                kept, rebuilt, kept_samples, cap = layout(m, budget - flat - least - (int(s * m) + rebuilt_v))
            if flat + kept + rebuilt + least <= budget and (best is None or kept_samples > best[3]):
                best = (m, kept, rebuilt, kept_samples, cap)
            if best is not None and best[3] == total:
                break  # every graph kept: smaller pieces would only recompute more
        return best

    # Lanczos keeps its whole basis on the device where it fits beside the graphs (kept graphs come second),
    # else its smallest bounded basis, else the basis goes to host memory; only then do graphs crowd it out.
    reserves = [m_req * bv]
    if bounded_basis and m_req > MIN_BOUNDED_BASIS:
        reserves.append(MIN_BOUNDED_BASIS * bv)
    if not host_is_device:
        reserves.append(0)
    if given.get("basis_device", (None,))[0] == "cpu":
        reserves = [0]

    def to_host() -> None:
        nonlocal host, flat, kept_v, rebuilt_v, hvp_vectors, lanczos_work, reserves
        # a graph is built with its gradient taken off parameter by parameter (host_stream.RootCapture)
        host, flat, kept_v, rebuilt_v, lanczos_work, reserves = True, 0, 0, 0, 0, [0]
        hvp_vectors = 2 * int(largest_param_bytes or 0)  # one input piece and one output piece in flight

    if host:
        to_host()
    best = None
    for reserve in reserves:
        best = search(reserve)
        if best is not None:
            break
    if best is None and host_vectors and not host_is_device and "vectors" not in given:
        # even the basis in host memory leaves too many d-vectors on the device: the vectors go there too
        to_host()
        best = search(0)
    fits = best is not None
    if best is None:
        # Nothing fits: the pieces that need least, but no smaller than they must be. Where the d-vectors
        # rather than the graph overflow, cutting the batch to single samples saves little and recomputes
        # almost every graph at every HVP, so the largest pieces within 10 % of the least need are taken.
        needs = []
        for m in candidates:
            kept, rebuilt, kept_samples, cap = layout(m, 0)
            needs.append((v + kept + rebuilt + minimal_phase(m, reserves[-1]), m, kept, rebuilt, kept_samples, cap))
        least = min(n[0] for n in needs)
        best = next(n[1:] for n in needs if n[0] <= 1.1 * least)
    m, kept, rebuilt, samples_kept, graph_cap = best
    micro = value("micro_batch_size", m if m < n_max else None)
    graph_budget = value("graph_budget_bytes", graph_cap)
    graphs = flat + kept + rebuilt
    rest = None if budget is None else budget - graphs

    # ---- batched HVPs: the widest chunk that fits beside the graphs (host vectors go one at a time)
    # host vectors with every graph rebuilt: a rebuilt graph's double backward frees its saved tensors as it
    # goes, so its working memory beyond the graph is a fraction of it (REBUILT_HVP_FACTOR); a kept graph's
    # (retain_graph) comes on top of it whole
    factor = (REBUILT_HVP_FACTOR if itemsize < 4 else REBUILT_HVP_FACTOR_FULL) if host and kept == 0 and rebuilt > 0 \
        else HVP_GRAPH_FACTOR
    one_hvp = hvp_vectors + int(factor * s * m)
    per_vector = one_hvp + v  # in a block of several, V's per-parameter slices are copies
    if rest is None and not host:
        k = max_chunk
    elif not fits or host:
        k = 1
    else:
        k = int(min(max_chunk, max(1, rest // per_vector)))
    chunk = int(value("chunk_size", k))

    # ---- the Lanczos basis: on the device in full, bounded on the device, in host memory, or bounded there
    room = None if rest is None else rest - one_hvp - lanczos_work
    # host vectors: Lanczos runs on the host, so its basis lives there (in full where the host holds it)
    where, cap_basis, placed = place_basis(m_req, bv, 0 if host and not host_is_device else room, host_bytes,
                                           bounded_basis=bounded_basis, host_is_device=host_is_device)
    if not placed:
        warns.append(
            f"a Lanczos basis of {m_req} vectors ({_gib(m_req * bv)}) does not fit the budget"
            + ("" if host_is_device else f" nor {HOST_SHARE:.0%} of the host's available {_gib(host_bytes or 0)}")
            + "; Lanczos may run out of memory: lower the metrics' max_iter"
        )
    basis_device = value("basis_device", where)
    max_basis = value("max_basis", cap_basis)
    stored = m_req if max_basis is None else min(m_req, int(max_basis))
    basis_on_device = 0 if basis_device == "cpu" else stored * bv

    # ---- per-example gradients: what the phase may take once the graphs are in place
    if rest is None or not gradient_samples:
        per_bytes = None
    else:
        per_bytes = int(max(row, rest - stats_fixed))
    per_bytes = value("persample_bytes", per_bytes)

    hvp_phase = one_hvp if chunk == 1 else chunk * per_vector
    # passes over a basis offloaded from a CUDA device run beside the products (linalg/delayed_lanczos.py) where
    # the budget holds the two more d-vectors that loop keeps on the device; else between the products
    delayed_work = 0
    if basis_device == "cpu" and not host and not host_is_device:
        extra = DELAYED_EXTRA_VECTORS * v
        if budget is None or graphs + one_hvp + lanczos_work + extra <= budget:
            delayed_work = extra
    left = None if budget is None else budget - graphs - one_hvp - lanczos_work - basis_on_device
    selective_work = selective_room(SELECTIVE_VECTORS * v, itemsize, not host, left)
    # host vectors whose Lanczos runs keep their working vectors on the device (lean, linalg/lanczos.py): the
    # newest vector and the product's output beside each product (the output alone where the product reads its
    # input from the host row, "streamed"), w, the newest vector and the previous row between them. Where asked
    # (``working_vectors``); chosen by :func:`_lean_plan` where the plan moved the vectors to the host itself
    working = value("working_vectors", "host") if host else None
    lean_work = lean_work_bytes(dim, itemsize, working) if working in LEAN_MODES else 0
    hvp_phase = hvp_phase + lean_work
    lanczos_phase = one_hvp + lanczos_work + basis_on_device + max(delayed_work, selective_work)
    persample_phase = stats_fixed + (row if per_bytes is None or row == 0 else max(row, (per_bytes // row) * row))
    peak = graphs + max(hvp_phase, lanczos_phase, persample_phase)
    if lean_work:  # between products: w, the newest vector and the previous row, beside the kept graphs only
        peak = max(peak, flat + kept + lean_step_bytes(dim, itemsize))
    if budget is not None and peak > budget:
        fits = False
    vectors = value("vectors", "host" if host else "device")
    if budget is not None and not fits:
        limit = {"training peak": f"{peak_ratio:g} x the training step's peak",
                 "free memory": "the device's free memory", "memory cap": "memory_cap"}[source]
        explicit = sorted(k for k, who in sources.items() if who != "plan")
        what = f"the settings given ({', '.join(explicit)})" if explicit else "the smallest plan"
        if budget <= 0:
            warns.insert(0, f"{limit} is already used up before the probe starts (budget {_gib(budget)})")
        warns.insert(0,
            f"the probe needs about {_gib(peak)} beyond the {_gib(allocated_bytes or 0)} allocated, but "
            f"{limit} leaves {_gib(budget)}; it runs with {what} (micro-batches of {micro or n_max}, chunks "
            f"of {chunk}, basis {'in host memory' if basis_device == 'cpu' else 'on the device'}"
            f"{', vectors in host memory' if host else ''}) and may run "
            "out of memory (recorded; training continues). Use fewer probe samples, or raise memory_cap / "
            "peak_ratio"
        )
    items = {
        "vector": v,
        "graph_per_piece": int(s * m) + kept_v,
        "graphs_kept": kept,
        "graph_rebuilt": rebuilt,
        "hvp_per_vector": per_vector,
        "hvp_phase": hvp_phase,
        "lanczos_work": lanczos_work,
        "lean_work": lean_work,
        "delayed_work": delayed_work,
        "selective_work": selective_work,
        "basis_on_device": basis_on_device,
        "basis_full": m_req * bv,
        "lanczos_phase": lanczos_phase,
        "persample_row": row,
        "persample_phase": persample_phase,
        "hvp_vectors": hvp_vectors,
        "device_vectors_fixed": flat,
    }
    if host and budget is not None and "vectors" not in given and "working_vectors" not in given:
        lean = _lean_plan(args, given)
        if lean is not None:
            return lean
    return MemoryPlan(
        budget_bytes=budget, budget_source=source, allocated_bytes=allocated_bytes,
        available_bytes=available_bytes, train_peak_bytes=train_peak_bytes, peak_ratio=float(peak_ratio),
        cap_bytes=cap_bytes, host_available_bytes=host_bytes, dim=int(dim), itemsize=int(itemsize),
        batch_sizes=[int(b) for b in batch_sizes], graph_bytes_per_sample=graph_bytes_per_sample,
        micro_batch_size=micro, graph_budget_bytes=graph_budget, chunk_size=chunk, basis_device=basis_device,
        max_basis=max_basis, persample_bytes=per_bytes, basis_vectors=m_req, bounded_basis=bool(bounded_basis),
        peak_bytes=int(peak), fits=bool(fits), items=items, sources=sources, warnings=warns,
        graph_source=graph_source, device_vectors=None if room is None else max(0, int(room // v)),
        samples_kept=int(samples_kept), vectors=vectors, working_vectors=working,
    )


def _lean_plan(args: dict, given: dict) -> MemoryPlan | None:
    """The plan of the same call with the vectors in host memory and Lanczos' working vectors on the device (lean),
    where it fits the budget: first with the graphs laid out as without them, then with every graph rebuilt, first
    with each product's input on the device, then read from its host row (``"streamed"``: one d-vector less beside
    the product, the input crossing the bus in it); None where none fits. Where it fits, lean is the faster of the
    two placements: its products read and write device vectors and its arithmetic runs on the device, where the
    host placement streams every product's input and output and runs each step's passes on the host (1.1B Llama
    fp32, H200: 2.15 s against 4.4 s a product; a probe 56.8 / 30.8 s first / later against 71.3 / 62.4 s,
    benchmarks/RESULTS.md section 6, nineteenth round), worth more than a kept graph, which saves one forward of
    its piece per product. It takes the training-peak target whole (no :data:`HEADROOM`, kept for free memory and a
    cap): the headroom is for fragmentation, which that target (allocated bytes) does not count; its items err high
    already (the 1.1B Llama fp32: planned 16.6 GB above its start, measured 15.7 GB, 1.44x its training step,
    twentieth round)."""
    tries = [{}] + ([] if "graph_budget_bytes" in given else [{"graph_budget_bytes": (0, "plan")}])
    for mode in LEAN_MODES:
        for extra in tries:
            over = {**given, **extra, "vectors": ("host", "plan"), "working_vectors": (mode, "plan")}
            plan = plan_memory(**{**args, "overrides": over, "target_headroom": 1.0})
            if plan.fits:
                return plan
    return None


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
