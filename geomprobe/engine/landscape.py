"""Landscape: the loss surface of one model, at its current parameters, on fixed probe batches.

A Landscape builds the first-order graph once and answers ``loss``, ``grad`` and ``hvp`` for as long as it
lives; every metric takes a Landscape and returns plain numbers. Over several batches the loss is the
sample-weighted mean ``L = sum_b n_b L_b / sum_b n_b``, so unequal batches give exactly the Hessian of the
concatenated batch. HVPs are double backward through the retained graph (``retain_graph=True``), blocks of
vectors through ``is_grads_batched=True``, chunked to bound memory."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError, NonFiniteLossError
from ..linalg.krylov_basis import warm_lean_rows
from ..linalg.lean_vectors import LEAN_MODES
from ..linalg.vectors import matvec_into
from .attention_plan import measure_graph, requested_label
from .autodiff.fastdouble import fast_double_backward
from .batch_products import BatchProducts
from .batches import batch_size, call_model, is_pair, resolve_batches, split_batches, to_device
from .distributed import make_reducer, refuse_sharded
from .doublecheck import (
    CustomBackwardWatch,
    check_broken_nodes,
    custom_function_nodes,
    cut_discrepancy,
    refuse_cut,
)
from .finite_difference import fd_hvp, fd_step
from .host_stream import host_mode, resolve_vector_device, vectors_record, wide_host_vectors
from .hvp_out import check_out
from .landscape_plan import plan_within
from .loss import loss_reduction, resolve_loss_form
from .memory_plan import DEFAULT_CHUNK_SIZE, MemoryBudget, MemoryPlan
from .paramspace import Block, ParamSpace, select_parameters, unwrap_model
from .pruned_outputs import part_mask
from .saved_bytes import SavedBytes
from .sharded import fully_sharded
from .state import MODES, frozen

__all__ = ["HVP_METHODS", "Landscape", "unwrap_model"]


# "auto": exact double backward for a model whose ranks hold whole parameters; for an FSDP2 model, the exact
# route when its memory fits, else finite differences of FSDP's own gradients (engine/sharded_landscape.py)
HVP_METHODS = ("autograd", "finite-difference", "auto")


class Landscape(BatchProducts):
    """The loss surface of ``model`` at its current parameters on fixed probe batches.

    Args:
        model: the network (DDP and ``torch.compile`` wrappers are unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` (e.g. ``nn.CrossEntropyLoss()``), or ``loss_fn(model, batch)``
            returning a scalar (detected when its first argument is named ``model``, or when batches are not
            ``(inputs, targets)`` pairs; or say ``loss_form``).
            Over several batches the losses are combined by ``reduction``: a mean over each batch's samples (as
            torch's losses are by default) is weighted ``n_b / N``, a sum is summed, so the result is the loss of
            the union of the batches either way.
        batches: one ``(inputs, targets)`` pair, a list of batches, or a DataLoader (with ``max_batches``).
        params: glob pattern(s) selecting parameters by name (default: every trainable parameter).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"`` (BatchNorm batch
            statistics, dropout masks frozen for the Landscape's life).
        group_by: blocks are parameter tensors (``"parameter"``) or modules (``"module"``).
        chunk_size: vectors per batched HVP call; memory grows with it. ``None``: the memory plan's choice
            (16 when memory allows).
        graph_budget_bytes: keep first-order graphs of batches while their saved tensors and gradients fit
            this budget; graphs beyond it are rebuilt for each HVP (correct, slower). ``None``: all kept, or
            the memory plan's choice.
        memory: how settings left at ``None`` (``chunk_size``, ``micro_batch_size``, ``graph_budget_bytes``)
            are chosen. ``"auto"`` (default): a :class:`~geomprobe.engine.memory_plan.MemoryPlan` within the
            memory the device can still give; a :class:`~geomprobe.engine.memory_plan.MemoryBudget`: within it
            (a cap, the training step's peak and its ratio); a ``MemoryPlan``: exactly its settings; ``None``:
            no plan (16 vectors per chunk, whole batches, every graph kept). Explicit settings always win. The
            plan is :attr:`plan`; it measures the graph's bytes per sample on a slice of the first batch
            (about ``1/8`` of a gradient) unless the budget gives them or sets no limit, and once more with the
            recomputing attention only where ``recompute_attention=None`` needs it (see that argument).
        reduction: how the loss reduces over a batch's samples, ``"mean"`` or ``"sum"``; ``"auto"`` reads a
            torch loss module's own ``reduction`` and takes ``"mean"`` otherwise (:func:`~geomprobe.engine.loss.loss_reduction`).
        hvp_method: ``"autograd"`` (double backward, exact) or ``"finite-difference"``, the central difference
            ``(grad(w + eps v) - grad(w - eps v)) / 2 eps``: a flagged last resort for smooth models whose
            layers have no double backward. Wrong on ReLU networks, where a crossed kink gives errors of 100x.
            ``"auto"`` (default): ``"autograd"``; for an FSDP2 model the exact route when its memory fits, else
            finite differences of FSDP's own gradients with an error estimate
            (:mod:`geomprobe.engine.sharded_landscape`).
        seed: fixes dropout masks in ``train`` mode.
        process_group: the ranks whose probe data together make the loss (see :mod:`geomprobe.engine.distributed`).
            A model sharded by FSDP2 (``fully_shard``) gets a :class:`~geomprobe.engine.sharded_landscape.ShardedLandscape`,
            whose flat vectors are this rank's parameter shards.
            ``None``: the default group when torch.distributed is initialized with several ranks, else this
            process alone; ``False``: this process alone. Each rank passes its own shard as ``batches``; the
            loss, gradient and HVPs are those of the union, identical on every rank.
        micro_batch_size: split every probe batch into pieces of at most this many samples. The Hessian is
            the same (the loss is sample-weighted), but the double backward works on one piece at a time, so
            with ``graph_budget_bytes`` the probe fits in the memory of a training step. Not allowed in
            ``train`` mode with BatchNorm, whose batch statistics would change.
        fast_double_backward: build convolutions, ``layer_norm`` and ``gelu`` with a double backward of their
            own (:mod:`geomprobe.engine.autodiff.fastdouble`): convolutions on torch's forward, backward-input and
            backward-weight kernels instead of torch's formula, whose weight term runs on a slow CUDA kernel;
            layer norm and GELU in closed form, fused by inductor (CUDA only). On an H100 (strict fp32) an HVP
            drops from 5.1 to 2.3 gradients on ResNet-18 and from 2.9 to 2.3 on a transformer. Same products
            to rounding; ``False`` keeps torch's paths.
        recompute_attention: with ``fast_double_backward``, scaled-dot-product attention runs torch's fused
            kernel and recomputes its probabilities in bounded tiles for each HVP instead of keeping them
            (:mod:`geomprobe.engine.autodiff.attndouble`): on GPT-2 124M (8 x 512, bf16, H200) it cut the graph
            from 10.2 to 6.5 GB but made an HVP 1.36x slower (benchmarks/RESULTS.md §6). ``None`` (default,
            "auto"): the memory plan decides (:mod:`geomprobe.engine.attention_plan`): torch's attention
            where its plan fits keeping every graph, the recomputing one where that lowers a peak that does
            not fit or is predicted faster; :attr:`attention` says which and why. ``True``/``False`` force it.
        vector_device: where HVP vectors and the gradient live (:attr:`vector_device`). ``"cpu"``: host memory
            (:mod:`~geomprobe.engine.host_stream`): ``hvp`` takes and returns host vectors and streams them through
            the double backward parameter by parameter, so no d-vector lives on the device (a block goes one
            vector at a time; device vectors are still accepted and answered on the device). On a CPU model it
            forces the same streamed passes, with no-op copies. The model's device: device vectors. ``None``
            (default): the memory plan takes host vectors where nothing else fits (``plan.vectors``).

    A graph that would drop second-order terms silently is refused by name (:mod:`~geomprobe.engine.doublecheck`):
    a once-differentiable Function, or a custom autograd Function whose backward leaves autograd (numpy,
    ``.detach()``, ``torch.no_grad``). With custom Functions in the model, building costs one more HVP and four
    gradients (the check against differences of the gradient).

    The model is returned exactly as found after every forward pass: training flags, buffers, RNG state and
    ``.grad`` are untouched. Parameters must not change while the Landscape is used; build a new one.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Linear(3, 1, bias=False).double()
    >>> X = torch.randn(8, 3, dtype=torch.float64)
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(8, 1, dtype=torch.float64)))
    >>> H = 2 * X.T @ X / 8                     # the MSE Hessian in closed form
    >>> torch.allclose(land.hvp(torch.eye(3)), H)
    True
    """

    # set by the sharded subclass: vectors are then slices, inner products reduced (see engine/sharded_landscape)
    vector_space = None
    sharded = False
    # the class measuring FSDP2 models; engine/sharded_landscape.py registers it (imported by the package)
    sharded_class: type | None = None

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> Landscape:  # noqa: PYI034
        # A model under FSDP2 gets the sharded Landscape: same arguments, vectors sharded like the parameters.
        # (model may be absent when copy or pickle recreate an instance: they get the class they copy.)
        if (cls is Landscape and Landscape.sharded_class is not None and isinstance(model, nn.Module)
                and fully_sharded(unwrap_model(model))):
            return super().__new__(Landscape.sharded_class)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        batches: Any,
        *,
        params: str | Sequence[str] | None = None,
        mode: str = "eval",
        group_by: str = "parameter",
        max_batches: int | None = None,
        loss_form: str = "auto",
        chunk_size: int | None = None,
        graph_budget_bytes: int | None = None,
        hvp_method: str = "auto",
        fd_eps: float | None = None,
        seed: int = 0,
        process_group: Any = None,
        micro_batch_size: int | None = None,
        fast_double_backward: bool = True,
        recompute_attention: bool | None = None,
        memory: MemoryBudget | MemoryPlan | str | None = "auto",
        reduction: str = "auto",
        vector_device: str | torch.device | None = None,
    ):
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
        if hvp_method not in HVP_METHODS:
            raise ConfigurationError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = unwrap_model(model)
        if hvp_method == "auto" and not self.sharded:
            hvp_method = "autograd"
        self.loss_fn = loss_fn
        self.loss_form = resolve_loss_form(loss_fn, loss_form)
        self.reduction = loss_reduction(loss_fn, reduction)
        self.mode = mode
        self.seed = int(seed)
        self.hvp_method = hvp_method
        self.fd_eps = fd_eps
        self.graph_budget_bytes = graph_budget_bytes
        self.fast_double_backward = bool(fast_double_backward)
        if recompute_attention is not None and not isinstance(recompute_attention, bool):
            raise ConfigurationError(f"recompute_attention must be True, False or None (auto), got {recompute_attention!r}")
        self.recompute_attention = bool(recompute_attention) and self.fast_double_backward
        # which attention the graphs are built with and why; the memory plan's choice where it makes one
        self.attention: dict = {"requested": requested_label(recompute_attention), "recompute": self.recompute_attention,
                                "reason": "requested" if recompute_attention is not None else "no memory plan: torch's attention",
                                "attention_calls": None}
        # graph bytes per sample with torch's attention and with the recomputing one, where measured
        self.graph_figures: dict[str, float | None] = {"math": None, "recompute": None}
        self.param_names, self.params = self._select(params, process_group)
        self.space = ParamSpace(self.param_names, [p.shape for p in self.params], group_by=group_by)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.batches = [to_device(b, self.device) for b in resolve_batches(batches, max_batches)]
        self._vectors_requested = resolve_vector_device(self, vector_device)  # the plan records the choice
        if loss_form == "auto" and self.loss_form == "outputs" and not is_pair(self.batches[0]):
            # loss_fn(outputs, targets) cannot take a dict or a longer tuple: the user meant loss_fn(model, batch)
            self.loss_form = "model"
        self.plan = self._plan(memory, chunk_size, micro_batch_size, graph_budget_bytes, recompute_attention)
        if self.plan is not None:  # explicit settings win over a plan given whole, as over a planned one
            chunk_size = chunk_size if chunk_size is not None else self.plan.chunk_size
            micro_batch_size = micro_batch_size if micro_batch_size is not None else self.plan.micro_batch_size
            if graph_budget_bytes is None:
                self.graph_budget_bytes = self.plan.graph_budget_bytes
        self.chunk_size = int(chunk_size or DEFAULT_CHUNK_SIZE)
        self.host = host_mode(self)  # the streamed host-vector mode (HostVectors), or None
        if micro_batch_size is not None:
            self.batches = split_batches(self.batches, micro_batch_size, self.model, mode)
        self.micro_batch_size = micro_batch_size
        self.batch_sizes = [batch_size(b) for b in self.batches]
        # over every rank's shard, so that the weights below make the loss of the union of the shards
        self.n_samples = self.reducer.sum_int(sum(self.batch_sizes))
        # a mean loss weighs each batch by its share of the samples; a sum loss adds up: either way the
        # combined loss is the loss of the union of the batches (a sum weighted as a mean was 33-50 % off)
        self.weights = [1.0 if self.reduction == "sum" else n / self.n_samples for n in self.batch_sizes]
        self.hvps = 0
        self.forwards = 0  # forward passes at other parameters (views, a loss change): note_forwards
        self.graph_rebuilds = 0
        self.widest_block = 0  # the most vectors one hvp call has been given (the probe resets it per metric)
        # Results computed at these parameters that another metric of the same probe may ask for again
        # (a seeded Lanczos run): the parameters cannot change under a Landscape, so they stay valid.
        self.results: dict = {}
        self.graph_bytes = 0
        self._kept_bytes = 0  # saved tensors and gradients of the kept graphs, what graph_budget_bytes bounds
        self.graph_bytes_per_sample: float | None = None  # measured on the first piece built
        self.batched_hvp = True
        self.custom_functions: list[str] = []  # user autograd Functions in the graph (checked at build)
        self._graphs: list[list[torch.Tensor | None] | None] = []
        self._versions = [p._version for p in self.params]
        if self.plan is not None and self.plan.working_vectors in LEAN_MODES and self.device.type == "cuda":
            # a lean run's first page-locked row (and its sketches' store and kernels), mapped and loaded while the
            # graph builds; more rows warmed here took the 1.1B Llama's bf16 build from 3.1 to 10.3 s
            # (registration contends with its copies; RESULTS.md section 6)
            warm_lean_rows(self.dim, self.dtype, self.device)
        try:
            self._build()
        except Exception as e:
            # The probe's out-of-memory safety net starts from the settings this build ran with.
            e.memory_plan = self.plan  # type: ignore[attr-defined]
            raise

    def _select(self, params: Any, process_group: Any) -> tuple[list[str], list[torch.Tensor]]:
        """The measured parameters (names, tensors) and the reducer over the ranks holding the probe data."""
        names, tensors = select_parameters(self.model, params)
        refuse_sharded(self.model, zip(names, tensors))
        self.reducer = make_reducer(process_group)
        return names, tensors

    # ------------------------------------------------------------------ memory plan
    def _plan(self, memory: Any, chunk_size: int | None, micro_batch_size: int | None,
              graph_budget_bytes: int | None, recompute: bool | None = None) -> MemoryPlan | None:
        if memory is None or self.hvp_method != "autograd":
            if self.hvp_method != "autograd" and recompute is None:
                self.attention["reason"] = "no double backward (finite differences): torch's attention"
            return None
        if isinstance(memory, MemoryPlan):
            chosen = (memory.attention or {}).get("recompute")
            if recompute is None and chosen is not None and self.fast_double_backward:
                self.recompute_attention = bool(chosen)  # a plan given whole: its attention too
                self.attention.update(recompute=self.recompute_attention, reason="the given plan's choice")
            return memory
        plan, self.attention, figures = plan_within(self, memory, chunk_size, micro_batch_size, graph_budget_bytes,
                                                    recompute)
        self.recompute_attention = bool(self.attention["recompute"])
        self.graph_figures.update(figures)
        return plan

    def plan_figures(self) -> dict:
        """What this Landscape measured of its graph that a plan at other parameters can reuse, as
        :class:`~geomprobe.engine.memory_plan.MemoryBudget` fields: bytes per sample with torch's attention and
        with the recomputing one (None where not measured), and the attention calls the latter takes."""
        figures = dict(self.graph_figures)
        if self.graph_bytes_per_sample is not None and all(f is None for f in figures.values()):
            figures["recompute" if self.recompute_attention else "math"] = self.graph_bytes_per_sample
        return {"graph_bytes_per_sample": figures["math"], "recompute_graph_bytes_per_sample": figures["recompute"],
                "attention_calls": self.attention.get("attention_calls")}

    def _measure_graph_per_sample(self, can_split: bool, recompute: bool = False) -> tuple:
        """The memory plan's measuring forward on a slice of the first batch (:func:`~.attention_plan.measure_graph`)."""
        return measure_graph(self, can_split, recompute)

    # ------------------------------------------------------------------ construction
    def frozen(self, batch_index: int = 0):
        """The state guard for a forward pass on probe batch ``batch_index`` (its dropout masks fixed)."""
        return frozen(self.model, self.mode, seed=self.seed + batch_index)

    def loss_on(self, batch: Any) -> torch.Tensor:
        """The scalar loss of ``model`` on ``batch``, with its graph; call inside :meth:`frozen`."""
        if self.loss_form == "model":
            loss = self.loss_fn(self.model, batch)
        else:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ConfigurationError(
                    "loss_fn(outputs, targets) needs (inputs, targets) batches; for other batch shapes pass "
                    "loss_fn(model, batch) (first argument named 'model') or loss_form='model'"
                )
            loss = self.loss_fn(call_model(self.model, batch[0]), batch[1])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigurationError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        return loss.reshape(())

    def _graph(self, b: int, create_graph: bool, watch: bool = False,
               capture: Any = None) -> tuple[list[torch.Tensor | None], torch.Tensor, int]:
        counter = SavedBytes(self.params)
        fast = fast_double_backward(self.fast_double_backward and create_graph, self.recompute_attention, self.model)
        with self.frozen(b), counter.hooks(), fast as calls:
            loss = self.loss_on(self.batches[b])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss on probe batch {b} is {loss.item()} at the current parameters; nothing can be "
                    "measured here (check the learning rate, the data, or probe an earlier step)"
                )
            nodes = custom_function_nodes([loss]) if watch else []
            with CustomBackwardWatch(nodes) as watcher, capture or contextlib.nullcontext():
                grads = torch.autograd.grad(
                    loss * self.weights[b], self.params, create_graph=create_graph, allow_unused=True
                )
        if watch:
            watcher.check()
            self.custom_functions = list(dict.fromkeys(watcher.names))
            if self.attention["attention_calls"] is None and self.fast_double_backward:
                self.attention["attention_calls"] = calls.takeable
        return list(grads), loss.detach(), counter.bytes

    def _build(self) -> None:
        create = self.hvp_method == "autograd"
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        grad = self.host.new_grad() if self.host else torch.zeros(self.space.dim, dtype=self.dtype, device=self.device)
        try:
            for b in range(len(self.batches)):
                self._build_batch(b, create, loss, grad)
        except Exception:  # every rank must learn of a failure on one, or the others wait forever
            self.reducer.report_failure()
            raise
        self.reducer.check_others()
        self.reducer.sum_(loss)
        self.reducer.sum_(grad)
        if not torch.isfinite(grad).all():
            raise NonFiniteLossError("the gradient has non-finite entries at the current parameters")
        self._loss = float(loss)
        self._grad = grad
        if create and self.reducer.sum_int(len(self.custom_functions)) > 0:
            self._verify_custom_backward()

    def _verify_custom_backward(self, directions: int = 3) -> None:
        """Refuse custom autograd Functions whose backward leaves autograd: one HVP against central differences
        of the gradient at two steps (:func:`~geomprobe.engine.doublecheck.cut_discrepancy`), 4 gradients, on
        a seeded random direction; another direction (up to ``directions``) only when a step crossed a kink.
        Detects a missing term above ``100 sqrt(u)`` of ``|H v|`` (1.5e-6 in float64, 3.5e-2 in float32)."""
        if self.dtype.itemsize < 4:
            warnings.warn(
                f"the model's custom autograd Function(s) {', '.join(self.custom_functions)} cannot be checked for "
                f"a differentiable backward in {self.dtype}: the Hessian is exact only if their backward is "
                "written in differentiable torch operations", RuntimeWarning, stacklevel=4)
            return
        tol = 100 * math.sqrt(torch.finfo(self.dtype).eps)
        blocks = [(blk.name, blk.slice) for blk in self.space.blocks]
        gen = torch.Generator().manual_seed(self.seed + 104729)
        for _ in range(directions):
            v = torch.randn(self.dim, generator=gen, dtype=torch.float64)
            v = (v / v.norm()).to(device=self.device, dtype=self.dtype)
            hv = self.reducer.sum_(self._hvp_chunk(v[None]))[0]
            found = cut_discrepancy(hv, lambda e, v=v: self.reducer.sum_(fd_hvp(self, v, e)), fd_step(self, v), tol, blocks)
            if found.consistent:
                refuse_cut(found, self.custom_functions)
            if not found.relative > tol:
                return

    def _build_batch(self, b: int, create: bool, loss: torch.Tensor, grad: torch.Tensor) -> None:
        """Add batch ``b``'s weighted loss and gradient to ``loss`` and ``grad``; keep its graph if it fits."""
        if self.host is not None:  # roots and the host gradient taken parameter by parameter (host_stream)
            grads, loss_b, nbytes = self.host.graph(b, watch=b == 0, grad=grad)
        else:
            grads, loss_b, nbytes = self._graph(b, create, watch=create and b == 0)
            grad += self.space.flatten([g.detach() if g is not None else None for g in grads])
        loss += loss_b.double() * self.weights[b]
        if b == 0 and create:
            if self.host is None:  # host vectors check their roots (host_stream)
                check_broken_nodes(grads)
            self.graph_bytes_per_sample = nbytes / max(1, self.batch_sizes[0])
            self.graph_figures["recompute" if self.recompute_attention else "math"] = self.graph_bytes_per_sample
        kept = nbytes + (0 if self.host else sum(g.numel() * g.element_size() for g in grads if g is not None))
        fits = self.graph_budget_bytes is None or self._kept_bytes + kept <= self.graph_budget_bytes
        if create and fits:  # the first graph too: a budget below one graph rebuilds every graph per HVP
            self._graphs.append(grads)
            self.graph_bytes += nbytes
            self._kept_bytes += kept
        else:
            self._graphs.append(None)

    # ------------------------------------------------------------------ queries
    @property
    def dim(self) -> int:
        """Number of parameters measured, ``d``."""
        return self.space.dim

    @property
    def blocks(self) -> list[Block]:
        return self.space.blocks

    @property
    def loss(self) -> float:
        """The sample-weighted mean loss over the probe batches."""
        return self._loss

    @property
    def grad(self) -> torch.Tensor:
        """The gradient of :attr:`loss` as a flat vector of length ``d`` (detached), on :attr:`vector_device`."""
        return self._grad

    @property
    def vector_device(self) -> torch.device:
        """Where this Landscape's vectors live: the host (``cpu``) in the host-vector mode, else :attr:`device`."""
        return torch.device("cpu") if self.host is not None else self.device

    @property
    def approximate(self) -> bool:
        """True when HVPs are finite differences rather than exact double backward."""
        return self.hvp_method != "autograd"

    def info(self) -> dict:
        """The probe policy and costs so far, JSON-ready (for run metadata and records)."""
        return {
            "mode": self.mode,
            "batches": len(self.batches),
            "batch_sizes": self.batch_sizes,
            "n_samples": self.n_samples,
            "dim": self.dim,
            "hvp_method": self.hvp_method,
            "seed": self.seed,
            "hvps": self.hvps,
            "graph_bytes": self.graph_bytes,
            "graphs_kept": sum(g is not None for g in self._graphs),
            "graph_rebuilds": self.graph_rebuilds,
            "recompute_attention": self.recompute_attention,
            "attention": {k: self.attention.get(k) for k in ("requested", "recompute", "reason", "attention_calls")},
            "vector_device": str(self.vector_device), "vectors": vectors_record(self),
        }

    def matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Alias of :meth:`hvp`, the matvec the Krylov kernels take. With ``out``, the product is written into it
        through :func:`~geomprobe.linalg.vectors.matvec_into`: a wrapper set on ``hvp`` that has no ``out`` (a
        probe's counters) is called without it and its result copied in."""
        return self.hvp(v) if out is None else matvec_into(self.hvp, v, out)

    def hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Hessian-vector products ``H v`` for one flat vector ``(d,)`` or a block ``(k, d)``.

        Cost: ``k`` HVPs (counted in :attr:`hvps`), each about 1-2.5 gradients, less for a block of Hessian
        columns (parts zero in every row are left out: :mod:`~.pruned_outputs`); vectors go through
        ``is_grads_batched`` in chunks of :attr:`chunk_size`; with host vectors, one streamed pass per vector and
        probe batch, answered on the host (:mod:`~.host_stream`). Exact up to floating-point rounding (finite
        differences, if chosen, have truncation error O(eps^2) on smooth models).

        ``out``: the result's shape (``v``'s), dtype (the Landscape's; float32 for float32 host vectors of a half
        model, rounded on their way to the device, summed in float32) and device (:attr:`device`, or for host
        vectors also the host), not overlapping ``v``; written into and returned. On the exact route no d-sized
        tensor is allocated beside autograd's per-parameter results (each probe batch's are copied, then added, into
        ``out``): a reused buffer spares the CPU a fresh mapping of a large vector, and its page faults, at every
        product. Host vectors and finite differences compute their result and copy it in (the same bits). A bad
        ``out`` is refused before any work; a failure midway leaves it partly written.
        """
        if v.dim() not in (1, 2) or v.shape[-1] != self.dim:
            raise ConfigurationError(f"hvp takes a vector (d,) or a block (k, d) with d = {self.dim}, got {tuple(v.shape)}")
        self._check_unchanged()
        single, host = v.dim() == 1, self.host is not None and v.device.type == "cpu"  # host vectors stay there
        dtype = v.dtype if host and wide_host_vectors(self.dtype, v.dtype) else self.dtype  # (host_stream)
        if out is not None:
            check_out(out, v, dtype, v.device if host and getattr(out, "device", None) == v.device else self.device)
        V = v.reshape(-1, self.dim).to(device=v.device if host else self.device, dtype=dtype)
        # noted before the work, so that an out-of-memory failure can tell whether batching was involved
        self.widest_block = max(self.widest_block, V.shape[0])
        res = None if out is None else out.view(V.shape)  # (1, d) for a vector: a view, out is written
        mask = part_mask(self, V)  # a block's zero parts, read once: their outputs are left out (pruned_outputs)
        if V.shape[0] <= self.chunk_size:
            res = self._hvp_chunk(V, res, mask)  # no output buffer beside the result: at 1B parameters each is GBs
        else:
            res = torch.empty_like(V) if res is None else res
            for s in range(0, V.shape[0], c := self.chunk_size):
                self._hvp_chunk(V[s : s + c], res[s : s + c], None if mask is None else mask[s : s + c])
        self.reducer.sum_(res)  # one collective per block of vectors, not per vector
        self.hvps += V.shape[0]
        if out is not None:
            return out
        return res[0] if single else res

    def note_forwards(self, n: int) -> None:
        """Count ``n`` forward passes spent at other parameters than the Landscape's (by
        :func:`geomprobe.engine.evaluate.losses_at`), in :attr:`forwards`, as :meth:`hvp` counts HVPs."""
        self.forwards += n

    def close(self) -> None:
        """Release the retained graphs, the results cached for other metrics (:attr:`results`) and wrappers set
        on its methods (a probe's); an HVP then raises ConfigurationError, while loss, grad and :meth:`info`
        remain. Closing twice is harmless. A Landscape is in no reference cycle: dropping it frees the rest."""
        self._graphs = [None] * len(getattr(self, "_graphs", ()))
        getattr(self, "results", {}).clear()  # in place: a metric may still hold the dict
        cls = type(self)
        for name in [k for k, v in vars(self).items() if callable(v) and callable(getattr(cls, k, None))]:
            delattr(self, name)  # a wrapper closing over this Landscape would be a cycle
        if getattr(self, "host", None) is not None:
            self.host.io.clear()  # the host mode's page-locked buffers
        self._closed = True

    def __enter__(self) -> Landscape:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_unchanged(self) -> None:
        if getattr(self, "_closed", False):
            raise ConfigurationError("this Landscape was closed; build a new one to measure again")
        if any(p._version != v for p, v in zip(self.params, self._versions)):
            raise ConfigurationError(
                "the model's parameters changed since this Landscape was built (an optimizer step?); "
                "build a new Landscape at the new parameters"
            )

    def _hvp_chunk(self, V: torch.Tensor, out: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """``H V`` for the rows of ``V`` (at most :attr:`chunk_size`; ``mask``: their nonzero parts, the others left
        out), into ``out`` if given (and returned): the first probe batch's products flattened, the others added."""
        if self.host is not None:
            return self.host.hvp_rows(V, out)  # into out where its copies can go (host_stream.hvp_rows)
        if self.hvp_method == "finite-difference":
            res = torch.stack([fd_hvp(self, v) for v in V])
            return res if out is None else out.copy_(res)
        if out is None:
            out = torch.empty_like(V)  # what the flattening allocated before: one result, no second buffer
        for b in range(len(self.batches)):
            grads = self._graphs[b]
            if grads is None:
                grads = self._graph(b, True)[0]
                self.graph_rebuilds += 1
            self._hvp_batch(grads, V, out, accumulate=b > 0, mask=mask)
            del grads  # a rebuilt graph is freed before the next is built, not held beside it
        return out
