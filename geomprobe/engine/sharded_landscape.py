"""The Landscape of a model sharded by FSDP2 (``fully_shard``): vectors sharded like the parameters, two HVP
routes.

``Landscape(model, ...)`` returns this class for an FSDP2 model; every rank passes its own shard of the probe
data, as with DDP, and the loss is that of the union. Every flat vector (the gradient, HVP inputs and
outputs, Lanczos vectors) is this rank's *slice*: the concatenation of its parameter shards, ``d_local`` about
``d / world`` elements (:class:`~geomprobe.engine.sharded.ShardLayout`). :attr:`vector_space` is the
:class:`~geomprobe.linalg.space.ShardedSpace` the Krylov kernels take: inner products and norms all-reduced,
random vectors equal to the world-size-independent global vector restricted to the slice.

HVP routes (``hvp_method``):

- ``"autograd"`` (exact): each parameter is all-gathered once when the Landscape is built (``full_tensor``)
  and the first-order graph is built through those whole tensors with FSDP's hooks off
  (:func:`~geomprobe.engine.sharded.fsdp_hooks_off`), one graph per probe batch (or micro-batch), kept while
  the memory plan allows and else rebuilt at every HVP; the gradient goes to the shards parameter by
  parameter (a reduce-scatter per parameter and batch). An HVP of one vector is *streamed*
  (:mod:`~geomprobe.engine.sharded_stream`): the double backward on this rank's data gathers each piece of
  ``v`` when autograd needs it and reduce-scatters each parameter's output as soon as it is finished, on a
  schedule every rank follows; no whole d-vector exists. The build is streamed the same way
  (:class:`~geomprobe.engine.sharded_stream.BuildPass`): each parameter's gradient is reduce-scattered into
  this rank's gradient slice as soon as autograd has finished it, and only the graph's edges are kept, so
  the whole gradient never exists either. Exact to rounding. Memory: the whole parameters, each kept
  graph's saved tensors, a few parameters in flight and slices (:mod:`~geomprobe.engine.sharded_plan`); the
  double backward needs every layer's saved tensors at once, so per-layer gathering cannot bound the graph.
  A wider block with a wider chunk goes whole (one all-gather of the block, batched double backward, one
  reduce-scatter, and kept graphs that hold their whole gradients) where the plan finds room.
- ``"finite-difference"``: Richardson-extrapolated central differences of FSDP's own sharded gradients,
  ``D(h) = (g(theta + h v) - g(theta - h v)) / 2h``, ``Hv ~ D(h) + (D(h) - D(2h)) / 3`` with the error
  estimate ``2 ||D(h) - D(2h)||`` (it holds the truncation ``~3 c h^2`` of ``D(h)``, of which the
  extrapolation keeps ``O(h^4)``, and the rounding noise, of which it keeps about ``1.3x``). ``h`` is
  ``u^(1/3) (rms_v(theta) + rms(theta)) / ||v||`` for the unit roundoff ``u`` of the parameters' dtype
  (:meth:`ShardedLandscape._fd_step`). Cost: 4 gradients
  (FSDP forward and backward passes) per vector; memory: what a training step needs, since FSDP gathers one
  unit at a time. The estimates are kept (:attr:`hvp_errors`) and enter every Lanczos bound (Lanczos with a
  perturbed matvec: some eigenvalue lies within ``beta |u_m| + sqrt(sum_j err_j^2)`` of each Ritz value).
- ``"auto"``: the exact route when its memory plan fits the budget (free memory, a cap, the training peak
  times its ratio) on every rank, else finite differences; the choice and the numbers behind it are in :meth:`info` (``route``). Parameters in a
  half type (bf16, fp16) always take the exact route, with a warning where it may not fit: their unit
  roundoff (4e-3 in bf16) makes the differences mostly rounding (on a 7B Llama in bf16 the error estimate was
  358x the HVP's norm, benchmarks/RESULTS.md §8), so finite differences would only return bounds wider than
  the spectrum; ``hvp_method="finite-difference"`` still runs them when asked.

**Where vectors live** (:attr:`ShardedLandscape.vector_device`): on the model's device, or with
``vector_device="cpu"`` in host memory: the gradient slice, every HVP's input and output and (through
``metrics.spectrum``) Lanczos' vectors and basis. A streamed HVP then copies each parameter's piece of ``v``
to the device just before its all-gather and adds each reduce-scattered piece of the output into the host
slice, so the device holds the whole parameters, the graphs and the pieces in flight, no slice. The exact
route's memory plan takes this mode when the slices do not fit the budget on the device; the keyword
argument forces it either way (recorded as the user's in :meth:`info`). Inner products of host slices
are still reduced over the process group (a few scalars copied to the device for NCCL).

The user's state is as found afterwards: parameter shards (restored bit for bit after each perturbation),
``.grad`` (the finite-difference route lets FSDP write fresh gradients and puts the user's tensors back),
buffers, training flags and RNG (:func:`~geomprobe.engine.state.frozen`). A failure while computing an HVP on
one rank is agreed on: every rank raises :class:`~geomprobe.errors.GeomprobeError` for that HVP instead of
leaving the others in a collective (for the finite-difference route, failures inside FSDP's own collectives
are the exception).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigurationError, GeomprobeError, NonFiniteLossError
from ..linalg.space import ShardedSpace
from .batches import batch_size, slice_batch
from .distributed import ProcessGroupReducer
from .doublecheck import no_double_backward
from .hvp_out import check_out
from .landscape import Landscape
from .memory_plan import MemoryBudget, MemoryPlan
from .memory_readings import device_memory, host_available_bytes
from .paramspace import select_parameters
from .partial_sums import HostIO
from .saved_bytes import SavedBytes
from .sharded import FSDPModule, ShardLayout, fsdp_hooks_off
from .sharded_build import ExactBuild
from .sharded_fd import FiniteDifferences
from .sharded_plan import GRAPH_FACTOR, plan_sharded_exact
from .sharded_stream import Root, StreamPass

__all__ = ["ShardedLandscape"]

# A caught exception kept in a local (``err = e``: the ranks agree on a failure before it is raised) is
# cleared once raised ("err = None" in a finally): its traceback holds the frame and the frame holds it, a
# reference cycle that only Python's garbage collector frees, and with it every tensor the frame held (a
# graph's roots, a pass's vectors).


class ShardedLandscape(ExactBuild, FiniteDifferences, Landscape):
    """A :class:`~geomprobe.Landscape` of an FSDP2 model; see the module docstring. Built by ``Landscape(...)``,
    which takes one more keyword argument for such a model:

    ``vector_device``: where slice-sized vectors live (the gradient, HVP inputs and outputs, the spectrum's
    Lanczos vectors): ``"cpu"`` in host memory, or the model's device; ``None`` (default): the exact route's
    memory plan chooses (host memory only when the slices do not fit the budget on the device), else the
    model's device. :meth:`hvp` takes slices anywhere and returns them on :attr:`vector_device`.
    """

    sharded = True

    # where slice-sized vectors live: set by _plan (the base class's read-only property answers for one device)
    vector_device = property(lambda self: self._vector_device or self.device,
                             lambda self, where: setattr(self, "_vector_device", where))

    def __init__(self, model: Any, loss_fn: Any, batches: Any, *, vector_device: Any = None, **kwargs: Any):
        self._vectors_asked = vector_device
        self.vector_device: torch.device | None = None  # set by _plan, before anything is built
        self.host_vectors = False
        self.host_io: HostIO | None = None
        # bytes of the double backward's partial sums that may wait on the device (the rest wait in host memory)
        self.partials_device_bytes = 0
        self.vector_device_source = "default"
        super().__init__(model, loss_fn, batches, **kwargs)

    def _select(self, params: Any, process_group: Any) -> tuple[list[str], list[torch.Tensor]]:
        if process_group is False:
            raise ConfigurationError(
                "process_group=False asks a rank to measure alone, but an FSDP2 model's parameters are sharded "
                "across ranks; every rank of the mesh must take part (leave process_group at None)")
        # A unit left gathered (the root after a forward without backward keeps its whole parameters
        # registered) goes back to its shards first: a local operation, the state FSDP starts a step from.
        self._reshard_all()
        names, dparams = select_parameters(self.model, params)
        self.layout = ShardLayout(names, dparams)
        self.reducer = ProcessGroupReducer(self.layout.group if process_group is None else process_group)
        if self.reducer.world_size != self.layout.world:
            raise ConfigurationError(
                f"the probe data is spread over {self.reducer.world_size} ranks but the parameters are sharded "
                f"over {self.layout.world}; geomprobe needs the two to be the same ranks (a 1-D FSDP2 mesh)")
        self._dparams = dparams
        self._dparams_all = list(self.model.parameters())  # the shards, whatever is selected
        self.vector_space = ShardedSpace(self.layout.dim, self.layout.ranges, self.reducer.sum_)
        self.hvp_errors: list[float] = []
        self.route: dict = {}
        # the streamed exact HVP: passes run, and the most bytes of pieces that waited in one (sharded_stream)
        self.stream_stats = {"passes": 0, "peak_held_bytes": 0}
        return names, dparams

    def _plan(self, memory: Any, chunk_size: int | None, micro_batch_size: int | None,
              graph_budget_bytes: int | None, recompute: bool | None = None) -> MemoryPlan | None:
        """The route, and for the exact route its memory plan (:mod:`~geomprobe.engine.sharded_plan`): the
        micro-batches, the graphs kept, the chunk and where the Lanczos basis lives, within the budget of the
        tightest rank. ``memory=None``: no plan, but ``"auto"`` still chooses the route by the free memory.
        Costs one FSDP forward on 2 samples (every rank) unless the budget gives the graph's bytes. The attention
        is not planned here (``recompute``: torch's unless forced)."""
        asked = self._asked_vector_device()
        plan = self._route_plan(memory, chunk_size, micro_batch_size, graph_budget_bytes, recompute, asked)
        planned = getattr(plan, "vector_device", None) if plan is not None else None
        if asked is not None:
            where, self.vector_device_source = asked, "user"
        elif plan is not None:
            where = planned
            self.vector_device_source = "the given plan" if isinstance(memory, MemoryPlan) else "plan"
        else:
            where = None
        self.vector_device = torch.device("cpu") if where == "cpu" else self.device
        self.host_vectors = where == "cpu"  # the host-memory mode, asked for or planned (on a CPU model too)
        # reused (page-locked) host buffers of the copies between the device and the host slices
        self.host_io = HostIO(pin=self.device.type == "cuda") if self.host_vectors else None
        return plan

    def _asked_vector_device(self) -> str | None:
        """The user's ``vector_device`` as ``"cpu"`` or the model's device (str), checked."""
        asked = self._vectors_asked
        if asked is None:
            return None
        try:
            dev = torch.device(asked)
        except (RuntimeError, TypeError) as e:
            raise ConfigurationError(f"vector_device must be 'cpu', the model's device ({self.device}) or None, "
                                     f"got {asked!r}") from e
        if dev.type == "cpu":
            return "cpu"
        if dev.type == self.device.type and dev.index in (None, self.device.index):
            return str(self.device)
        raise ConfigurationError(
            f"vector_device must be 'cpu' (host memory), the model's device ({self.device}) or None (the memory "
            f"plan's choice), got {asked!r}")

    def _route_plan(self, memory: Any, chunk_size: int | None, micro_batch_size: int | None,
                    graph_budget_bytes: int | None, recompute: bool | None, vectors: str | None) -> MemoryPlan | None:
        if recompute is None:
            self.attention["reason"] = "a sharded model's plan does not choose attention: torch's attention"
        if isinstance(memory, MemoryPlan):
            reason = "a memory plan was given" if self.hvp_method == "auto" else "requested"
            self.hvp_method = "autograd" if self.hvp_method == "auto" else self.hvp_method
            self.route = {"hvp_route": self.hvp_method, "reason": reason}
            return memory if self.hvp_method == "autograd" else None
        if isinstance(memory, str):
            if memory != "auto":
                raise ConfigurationError(f"memory must be 'auto', None, a MemoryBudget or a MemoryPlan, got {memory!r}")
            memory = MemoryBudget()
        elif memory is not None and not isinstance(memory, MemoryBudget):
            raise ConfigurationError(
                f"memory must be 'auto', None, a MemoryBudget or a MemoryPlan, got {type(memory).__name__}")
        if self.hvp_method == "finite-difference" or (memory is None and self.hvp_method == "autograd"):
            self.route = {"hvp_route": self.hvp_method, "reason": "requested"}
            return None
        overrides = {k: (v, "user") for k, v in (("chunk_size", chunk_size), ("micro_batch_size", micro_batch_size),
                                                  ("graph_budget_bytes", graph_budget_bytes),
                                                  ("vector_device", vectors)) if v is not None}
        budget = memory or MemoryBudget()
        overrides.update({k: v for k, v in budget.overrides.items() if v is not None and v[0] is not None})
        plan = self._exact_plan(budget, overrides)
        self._choose_route(plan)
        if memory is None or self.hvp_method != "autograd":
            return None
        if plan.warnings and budget.warn:
            warnings.warn(f"geomprobe memory plan: {'; '.join(plan.warnings)}", RuntimeWarning, stacklevel=4)
        return plan

    def _exact_plan(self, budget: MemoryBudget, overrides: dict) -> MemoryPlan:
        """The exact route's plan on this rank, from the figures of the tightest rank (least free memory, most
        allocated); the graph's bytes per sample from the budget or one FSDP forward (every rank runs it)."""
        per_sample, source = budget.graph_bytes_per_sample, "given"
        if per_sample is None:
            per_sample = GRAPH_FACTOR * self._forward_bytes_per_sample()
            source = f"an FSDP forward's saved bytes x {GRAPH_FACTOR}"
        available, allocated = device_memory(self.device)
        avail = self.reducer.gather_ints(-1 if available is None else int(available))
        allocated = max(self.reducer.gather_ints(int(allocated)))
        can_split = not (self.mode == "train" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()))
        return plan_sharded_exact(
            dim=self.layout.dim, local_dim=self.layout.local_dim, itemsize=self.dtype.itemsize,
            whole_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()),
            largest_param_bytes=max(p.numel() * p.element_size() for p in self._dparams),
            batch_sizes=[batch_size(b) for b in self.batches], graph_bytes_per_sample=per_sample,
            available_bytes=None if min(avail) < 0 else min(avail), allocated_bytes=allocated,
            train_peak_bytes=budget.train_peak_bytes, peak_ratio=budget.peak_ratio, cap_bytes=budget.cap_bytes,
            host_bytes=host_available_bytes(), bounded_basis=bool(budget.bounded_basis), can_split=can_split,
            host_is_device=self.device.type == "cpu", overrides=overrides, graph_source=source,
            **({} if budget.basis_vectors is None else {"basis_vectors": budget.basis_vectors}))

    def _reshard_all(self) -> None:
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @property
    def local_dim(self) -> int:
        """Length of this rank's slice of every flat vector."""
        return self.layout.local_dim

    # ------------------------------------------------------------------ construction
    def loss_on(self, batch: Any) -> torch.Tensor:
        if self.hvp_method == "autograd" and getattr(self, "_full", None) is not None:
            with fsdp_hooks_off(self.model, self._whole):
                return super().loss_on(batch)
        return super().loss_on(batch)

    def _build(self) -> None:
        self._passes = max(self.reducer.gather_ints(len(self.batches)))
        self._dversions = [p._version for p in self._dparams]
        if self.hvp_method == "autograd":
            self._full = [p.detach().full_tensor().requires_grad_(True) for p in self._dparams]
            self.params = self._full
            # every parameter stands in whole during the forward: the measured ones as leaves of the graph,
            # the others (not selected by params=) as constants
            self._whole = dict(zip(self.param_names, self._full))
            for n, p in self.model.named_parameters():
                if n not in self._whole:
                    self._whole[n] = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            self._build_exact()
        else:
            grad, loss = self._fsdp_grad()
            self._loss = float(self.reducer.sum_(loss))
            self._grad = grad.to(self.vector_device)
            if self.reducer.sum_int(int(not bool(torch.isfinite(grad).all()))):
                raise NonFiniteLossError("the gradient has non-finite entries at the current parameters")

    def _choose_route(self, plan: MemoryPlan) -> None:
        """``"auto"``: the exact route when its plan fits on every rank, else finite differences, except in
        half types (warned); an explicit route is kept. The plan's numbers are recorded either way."""
        fits = self.reducer.sum_int(int(not plan.fits)) == 0
        half = self.dtype in (torch.bfloat16, torch.float16)
        if self.hvp_method != "auto":
            reason = "requested"
        elif fits:
            self.hvp_method, reason = "autograd", "the exact route's memory fits"
        elif half:
            self.hvp_method = "autograd"
            reason = (f"the exact route's memory may not fit, but finite differences in {str(self.dtype)[6:]} "
                      "are mostly rounding")
            warnings.warn(
                f"geomprobe: the exact HVP route needs about {plan.peak_bytes / 2**30:.1f} GiB per GPU beyond what "
                f"is allocated, against {(plan.budget_bytes or 0) / 2**30:.1f} GiB of budget, and may run out of "
                f"memory (recorded; training continues); finite differences are not used for "
                f"{str(self.dtype)[6:]} parameters, whose rounding would swamp them: probe fewer samples per rank, "
                "or keep float32 master weights and pass hvp_method='finite-difference'",
                RuntimeWarning, stacklevel=4)
        else:
            self.hvp_method, reason = "finite-difference", "the exact route's memory does not fit"
        self.route = {
            "hvp_route": self.hvp_method, "reason": reason, "exact_bytes_estimate": plan.peak_bytes,
            "budget_bytes": plan.budget_bytes, "budget_source": plan.budget_source,
            "available_bytes": plan.available_bytes, "cap_bytes": plan.cap_bytes,
            "exact_plan": {k: getattr(plan, k) for k in (
                "micro_batch_size", "graph_budget_bytes", "chunk_size", "basis_device", "max_basis", "fits",
                "graph_bytes_per_sample", "graph_source", "items", "vector_device")},
        }

    def _forward_bytes_per_sample(self) -> float:
        """Saved bytes per sample of one FSDP forward on 2 samples of this rank's first batch (every rank runs
        it: the forward all-gathers). A backward of weight 0 follows: it completes FSDP's cycle, so that every
        unit is resharded (a root FSDP module stays unsharded after a forward alone)."""
        batch = self.batches[0]
        n = batch_size(batch)
        m = min(n, 2)
        counter = SavedBytes(self._dparams)
        with self._grads_set_aside(), self.frozen(0):
            with counter.hooks():
                loss = self.loss_on(slice_batch(batch, n, 0, m))
            (loss * 0.0).backward()
        return counter.bytes / m

    @contextlib.contextmanager
    def _grads_set_aside(self) -> Iterator[None]:
        """FSDP writes fresh ``.grad`` inside; the user's tensors (or None) are put back on exit."""
        found = [(p, p.grad) for p in self._dparams_all]
        for p, _ in found:
            p.grad = None
        try:
            yield
        except BaseException:
            # a pass that stopped midway may leave units gathered: back to the shards before anyone looks
            self._reshard_all()
            raise
        finally:
            for p, g in found:
                p.grad = g

    def _fsdp_grad(self, subtract_from: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the gradient of the union's loss, by FSDP's own forward and backward (the
        reduce-scatter sums the ranks), and the weighted local loss. Every rank runs the same number of
        passes (a rank with fewer batches adds passes of weight 0), and agrees on the loss before each
        backward. The user's ``.grad`` tensors are set aside and put back. ``subtract_from``: a slice the
        gradient is subtracted from in place, shard by shard (no flat copy: one slice less at the peak),
        and returned."""
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        world = self.layout.world
        with self._grads_set_aside():
            for b in range(self._passes):
                real = b < len(self.batches)
                i = b if real else 0
                with self.frozen(i):
                    err = None
                    try:
                        loss = self.loss_on(self.batches[i])
                        ok = bool(torch.isfinite(loss.detach()))
                    except Exception as e:  # noqa: BLE001 - agreed on below, so no rank waits in the backward
                        err, ok = e, False
                    bad = self.reducer.sum_int(int(not ok))
                    if bad:
                        try:
                            raise GeomprobeError(
                                f"the loss failed or is not finite on {bad} of {world} ranks at probe pass {b}"
                                + (f" (this rank: {type(err).__name__}: {err})" if err is not None else "")) from err
                        finally:
                            err = None  # no cycle of this frame and err's traceback (top of module)
                    w = self.weights[i] if real else 0.0
                    # FSDP averages gradients over the ranks; the probe weights already make a sum
                    (loss * (w * world)).backward()
                    loss_acc += loss.detach().double() * w
            grads = [p.grad.to_local() if p.grad is not None else None for p in self._dparams]
            if subtract_from is not None:
                for piece, g in zip(self.layout.split_local(subtract_from), grads):
                    if g is not None:
                        piece.sub_(g)
                return subtract_from, loss_acc
            like = self._dparams[0].to_local()
            return self.layout.flatten_local(grads, like.reshape(-1)).to(self.dtype), loss_acc

    # ------------------------------------------------------------------ queries
    def info(self) -> dict:
        out = super().info()
        out["sharded"] = {"world_size": self.layout.world, "local_dim": self.local_dim, **self.route,
                          "vector_device": str(self.vector_device), "vector_device_source": self.vector_device_source}
        out["vectors"] = {"where": "host" if self.host_vectors else "device", "source": self.vector_device_source}
        if self.hvp_method == "autograd":
            # the streamed HVPs: passes run (one per probe batch of the rank with most, per vector), and the
            # most bytes of gathered inputs and finished outputs that waited at once in one of them
            out["sharded"]["stream"] = {"passes_per_vector": self._passes, **self.stream_stats}
        return out

    def matvec_error(self, since: int = 0) -> float:
        """``sqrt(sum_j err_j^2)`` over the HVPs since index ``since`` of :attr:`hvp_errors`: what a Krylov
        run's bounds must grow by (0 on the exact route)."""
        return math.sqrt(sum(e * e for e in self.hvp_errors[since:]))

    def hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``H v`` for this rank's slice of one vector ``(d_local,)`` or a block ``(k, d_local)``, as slices.

        Cost, exact route: ``k`` double backward passes on this rank's data. A single vector, or any block when
        ``chunk_size`` is 1, is streamed (:meth:`_stream_pass`): its input gathered and its output
        reduce-scattered parameter by parameter inside the double backward, no whole d-vector held; a wider
        block with a wider chunk goes whole: one all-gather of the block, batched double backward passes
        (``is_grads_batched``), one reduce-scatter, holding about ``3 k d`` elements. Finite differences: 4 FSDP gradients per vector, each error estimate appended to
        :attr:`hvp_errors` (relative to ``||v||``). Every rank must call it with its slice of the same vectors.

        Slices are returned on :attr:`vector_device` (``v`` may be anywhere). In host memory a streamed HVP
        copies each parameter's piece of ``v`` to the device just before its all-gather and adds each
        reduce-scattered piece of the output into the host slice (no slice on the device); whole blocks and
        finite differences take the block to the device and back.

        ``out`` (``v``'s shape, the Landscape's dtype, on :attr:`vector_device`, not overlapping ``v``): the
        slices are written into it and it is returned; a streamed vector adds its pieces straight into it, whole
        blocks and finite differences copy their result in. Same values as without it.
        """
        if v.dim() not in (1, 2) or v.shape[-1] != self.local_dim:
            raise ConfigurationError(
                f"hvp takes this rank's slice, a vector (d_local,) or a block (k, d_local) with d_local = "
                f"{self.local_dim} (d = {self.dim} over {self.layout.world} ranks), got {tuple(v.shape)}")
        self._check_unchanged()
        if out is not None:
            check_out(out, v, self.dtype, self.vector_device)
        single = v.dim() == 1
        V = v.reshape(-1, self.local_dim).to(device=self.vector_device, dtype=self.dtype)
        self.widest_block = max(self.widest_block, V.shape[0])
        if self.hvp_method == "autograd" and (V.shape[0] == 1 or self.chunk_size == 1 or not self.batched_hvp):
            res = torch.zeros_like(V) if out is None else out.view(V.shape).zero_()
            for x, y in zip(V, res):
                x = x if self.host_io is None else self.host_io.input(x)  # page-locked: pieces go asynchronously
                for p in range(self._passes):
                    err = None
                    try:
                        self._stream_pass(p, x, y)
                    except Exception as e:  # noqa: BLE001 - the pass completed its collectives; agreed below
                        err = e
                    try:
                        self._agree_hvp(err)
                    finally:
                        err = None  # no cycle of this frame and err's traceback (top of module)
            self.hvps += V.shape[0]
            return out if out is not None else res[0] if single else res
        # whole blocks and finite differences work on the device; vectors kept in host memory go there and back
        Vd = V.to(self.device)
        full = self.layout.all_gather(Vd) if self.hvp_method == "autograd" else None
        err = None
        res = None
        try:
            if full is not None:
                res = torch.cat([self._hvp_chunk(full[s : s + self.chunk_size])
                                 for s in range(0, full.shape[0], self.chunk_size)])
            else:
                res = torch.stack([self._fd_one(x) for x in Vd])
        except Exception as e:  # noqa: BLE001 - every rank learns of it before the next collective
            err = e
        del Vd
        try:
            self._agree_hvp(err)
        finally:
            err = None  # no cycle of this frame and err's traceback (top of module)
        if full is not None:
            del full  # the gathered input is not needed for the reduce-scatter (a whole d-vector at 7B: 13 GB)
            res = self.layout.reduce_scatter(res)
        self.hvps += V.shape[0]
        if out is not None:
            out.view(V.shape).copy_(res)
            return out
        res = res.to(self.vector_device)
        return res[0] if single else res

    def _agree_hvp(self, err: BaseException | None) -> None:
        failed = self.reducer.sum_int(int(err is not None))
        if failed:
            raise GeomprobeError(
                f"the HVP failed on {failed} of {self.layout.world} ranks"
                + (f" (this rank: {type(err).__name__}: {err})" if err is not None else "")
                + "; every rank stops this measurement so that none waits in a collective") from err

    def _stream_pass(self, b: int, v: torch.Tensor, out: torch.Tensor) -> None:
        """Pass ``b`` of a streamed HVP (:mod:`~geomprobe.engine.sharded_stream`): the double backward
        through probe batch ``b``'s graph (kept, or rebuilt and freed), adding this rank's part of ``H v`` to
        ``out``; a rank with fewer batches than another takes part in the collectives with no graph. One pass
        per batch, not one backward through every kept graph at once: autograd would run one graph's part
        first and hold every gathered piece until the other graph used it (a whole d-vector). Cost: one
        all-gather and one reduce-scatter of ``d`` elements in all, per pass."""
        graph, retain, err = None, True, None
        if b < len(self._graphs):
            graph = self._graphs[b]
            if graph is None:
                # rebuilt before the pass's hooks are set (its backward must not reach them); a failure here
                # still lets the pass issue its collectives, so no rank waits
                try:
                    graph, retain = self._rebuild_roots(b), False
                    self.graph_rebuilds += 1
                except Exception as e:  # noqa: BLE001 - raised after the pass's schedule, agreed by hvp
                    err = e
        # with vectors in host memory the outputs' partial sums are formed there too (sharded_stream)
        partials = self.vector_device if self.host_vectors else None
        with StreamPass(self.layout, self._full, v, out, partials_device=partials, io=self.host_io,
                        partials_device_bytes=self.partials_device_bytes) as sp:
            if graph is not None and err is None:
                self._stream_backward(sp, [graph], retain)
        del graph
        if err is not None:
            try:
                raise err
            finally:
                err = None  # no cycle of this frame and err's traceback (top of module)
        stats = self.stream_stats
        stats["passes"] += 1
        stats["peak_held_bytes"] = max(stats["peak_held_bytes"], sp.peak_held_bytes)
        if partials is not None:
            sp.note_partials(stats)
        if "first_order" not in stats and sp.outputs_seen:
            # the order autograd used the inputs and finished the outputs (parameter indices) in the first pass
            # that ran a backward: the schedule holds least when it follows them
            stats["first_order"] = {"inputs": sp.inputs_seen, "outputs": sp.outputs_seen}

    def _hvp_chunk(self, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # whole blocks (and the custom-Function check) differentiate the gradient tensors: a graph kept as
        # roots only (chunk 1) is rebuilt for them
        if self.hvp_method != "autograd":
            return super()._hvp_chunk(V, out)
        out = torch.empty_like(V) if out is None else out
        for b in range(len(self.batches)):
            grads = self._graphs[b]
            if grads is None or any(isinstance(g, Root) for g in grads):
                grads = self._graph(b, True)[0]
                self.graph_rebuilds += 1
            self._hvp_batch(grads, V, out, accumulate=b > 0)
        return out

    def _stream_backward(self, sp: StreamPass, graphs: list, retain: bool) -> None:
        outputs, placeholders = sp.roots(graphs)
        if not outputs:
            return
        try:
            torch.autograd.backward(outputs, placeholders, retain_graph=retain, inputs=self._full)
        except RuntimeError as e:
            refusal = no_double_backward(e)
            if refusal is None:
                raise
            raise refusal from e

    def _check_unchanged(self) -> None:
        if getattr(self, "_closed", False):
            raise ConfigurationError("this Landscape was closed; build a new one to measure again")
        if any(p._version != v for p, v in zip(self._dparams, self._dversions)):
            raise ConfigurationError(
                "the model's parameters changed since this Landscape was built (an optimizer step?); "
                "build a new Landscape at the new parameters")

    def close(self) -> None:
        super().close()
        if self.host_io is not None:
            self.host_io.clear()
        self._full = self._whole = None
        self.params = self._dparams


Landscape.sharded_class = ShardedLandscape
