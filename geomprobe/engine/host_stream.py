"""Host vectors: the exact HVP of a model on one device whose input and output vectors live in host memory.

A Lanczos run on a 1B-parameter model holds a handful of d-vectors besides its HVP (input, output, the
three-term step's working vectors: 1.7 GB each in bf16), which is what keeps a probe above 1.5x the training
step even with its basis in host memory. In this mode no d-vector lives on the device: :meth:`HostVectors.hvp`
runs one double backward per probe batch (through its kept graph, or one rebuilt for the pass) in which

- each parameter's piece of the host input ``v`` is copied to the device when autograd is about to use it (a
  pre-hook on the node of each gradient root swaps it in for a zero-stride placeholder,
  :class:`~geomprobe.engine.sharded_stream.StreamPass`), and dropped once used;
- each contribution to a parameter's output ``(Hv)_i`` is taken where it is produced (a post-hook on the
  producing node, :meth:`StreamPass._intercept`; a weight gets two, from the forward's product and from the
  first-order backward's, and autograd would keep the first in its buffers until the second came: about 0.84
  of a whole gradient at once). A first contribution waits for the next in a reused page-locked host buffer
  (or on the device, within ``partials_device_bytes``), the two are added on the device, and each parameter's
  complete sum is added into the host output at once (:mod:`~geomprobe.engine.partial_sums`); what still
  reaches the parameter is summed the same way (a hook on the parameter, which hands autograd a zero-stride
  placeholder back). On a CPU model every contribution goes straight into the output.

The double backward is ``torch.autograd.grad`` with the parameters as inputs, as in the device mode: it never
runs a parameter's gradient accumulator, so the user's ``.grad`` is never written and the user's
post-accumulate-grad hooks (an optimizer stepping inside backward, DDP's reducer) never fire. The hooks this
mode adds are removed after every pass, after a failure too, and each parameter's hook table is put back as
found. Kept graphs are held as :class:`~geomprobe.engine.sharded_stream.Root` edges only: no whole gradient.

Cost per HVP: the double backwards of the device mode, plus per probe batch ``d`` elements copied host to
device (the input, from a page-locked copy, asynchronously), about ``d`` each way for the waiting partial sums
(asynchronous, page-locked), ``d`` device to host for the complete sums (through a reused page-locked buffer,
one wait per parameter) and their addition on the host; the Krylov arithmetic around the HVPs runs on the
CPU (:func:`geomprobe.metrics.spectrum`). Device memory beyond the graphs: the double backward's temporaries,
one parameter's input piece and one output piece at a time (``2 x`` the largest parameter); building or
building or rebuilding a graph never holds its whole gradient either: each parameter's gradient is taken off as
autograd finishes it (:class:`RootCapture`), added into the host gradient at the build, and only its root kept.

On a CPU model (the tests) host and device are one: the copies are no-ops and the streamed passes are the same
code as on CUDA, which is what lets CPU tests check this mode against the device mode to rounding.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Sequence
from typing import Any, Self

import torch

from ..errors import ConfigurationError
from ..linalg.lean_vectors import take_pending
from .doublecheck import check_broken_nodes, no_double_backward
from .partial_sums import HostIO
from .sharded_stream import Root, StreamPass, placeholder

__all__ = ["HostLayout", "HostStreamPass", "HostVectors", "ParamHooks", "RootCapture", "host_mode", "host_vectors_possible",
           "resolve_vector_device", "vectors_record"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HostLayout:
    """The one-process layout a :class:`StreamPass` takes: parameter pieces as views of a flat vector, copied
    to the model's device when gathered (outputs go into the flat output through :class:`HostStreamPass`)."""

    def __init__(self, shapes: Sequence[torch.Size], device: torch.device):
        self.shapes = [torch.Size(s) for s in shapes]
        self.offsets = list(itertools.accumulate((int(s.numel()) for s in self.shapes), initial=0))
        self.dim, self.device = self.offsets[-1], torch.device(device)

    def split_local(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Views of the flat vector ``v`` ``(d,)`` shaped like each parameter (no copy)."""
        if v.shape != (self.dim,):
            raise ConfigurationError(f"a streamed HVP takes one flat vector of length {self.dim}, got {tuple(v.shape)}")
        return [v[a:b].view(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def gather_param(self, i: int, piece: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s piece on the model's device (asynchronous from pinned host memory)."""
        if piece.device == self.device:
            return piece
        return piece.to(self.device, non_blocking=piece.is_pinned())


class ParamHooks:
    """A hook ``fn(i, grad)`` on each parameter for the length of a ``with``, taken off after, a failure too. A
    parameter without hooks of its own gets its hook table back as None (an empty table would stay on the
    user's tensor). A parameter's hooks run on the gradient ``torch.autograd.grad`` captures for it, and what
    the hook returns replaces that gradient."""

    def __init__(self, params: Sequence[torch.Tensor], fn: Any):
        self.params = list(params)
        # a bound method is held weakly: its owner holds this object, and a strong reference back would make a
        # cycle that keeps the owner's roots (a whole graph) alive until Python's garbage collector runs
        self._fn = weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda: fn)
        self._handles: list = []
        self._had_none: list[bool] = []

    @property
    def fn(self) -> Any:
        return self._fn()

    def __enter__(self) -> Self:
        for i, p in enumerate(self.params):
            self._had_none.append(p._backward_hooks is None)
            self._handles.append(p.register_hook(lambda g, i=i: self.fn(i, g)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for p, had_none in zip(self.params, self._had_none):
            if had_none and not p._backward_hooks:
                p._backward_hooks = None
        self._handles, self._had_none = [], []


class HostStreamPass(StreamPass):
    """One double backward of a streamed HVP in one process (module docstring): inputs copied to the device on
    first use, outputs taken where they are produced and summed (:class:`~geomprobe.engine.partial_sums.PartialSums`),
    each parameter's complete sum added into the host output at once. Reuses :class:`StreamPass`'s roots,
    placeholders and producers' hooks; the schedule of collectives it keeps for several ranks has no use here,
    so pieces move when autograd asks.

    ``fresh``: ``out`` holds zeros (the first batch of a vector), so a parameter's first output is copied, not
    added. ``io``: the reused host buffers of the copies; ``partials_device_bytes``: how many bytes of partial
    sums may wait on the device; ``direct``: each contribution goes into the output at once, nothing waits
    (default: a model on the CPU); ``spill_partials``: as :class:`StreamPass`'s. Use as a context manager; the hooks go on entry and are removed on exit,
    after an error too."""

    def __init__(self, layout: HostLayout, leaves: Sequence[torch.Tensor], v: torch.Tensor, out: torch.Tensor,
                 fresh: bool = False, intercept: bool = True, io: HostIO | None = None,
                 partials_device_bytes: float = 0, direct: bool | None = None, spill_partials: bool | None = None):
        # intercept: each weight's contributions are taken where they are produced (StreamPass._intercept) and
        # summed on their own, instead of the first waiting in autograd's buffers for the second
        super().__init__(layout, leaves, v, out, partials_device="cpu" if intercept else None,  # type: ignore[arg-type]
                         io=io, partials_device_bytes=partials_device_bytes, spill_partials=spill_partials)
        self.out_pieces = self._schedule.out_pieces  # the views of out the base class made
        self.fresh = fresh
        # where the output lives with the model (a CPU model), adding each contribution at once costs nothing
        # more than summing it first, and holds nothing
        self.direct = (self.device.type != "cuda") if direct is None else bool(direct)
        self._written: set[int] = set()
        self._outputs = ParamHooks(self.leaves, self._capture)

    def __enter__(self) -> Self:
        self._outputs.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:  # the roots' pre-hooks and the producers' post-hooks
            h.remove()
        self._handles = []
        self._outputs.__exit__()
        self._gathered.clear()
        self._held.now = 0
        if exc_type is None:
            self.finish()
        else:
            self._sums.clear()
        if self.layout.device.type == "cuda":
            # an input copied asynchronously from page-locked memory must land before the caller reuses v
            torch.cuda.current_stream(self.layout.device).synchronize()

    def _input(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        self.inputs_seen.append(i)
        piece = self._gathered.get(i)
        if piece is None:
            piece = self.layout.gather_param(i, self.v_pieces[i])
            if self._uses[i] > 1:  # held for the parameter's other roots (several graphs in one pass)
                self._gathered[i] = piece
                self._held.add(_nbytes(piece))
        self._uses[i] -= 1
        if self._uses[i] == 0 and i in self._gathered:
            del self._gathered[i]
            self._held.now -= _nbytes(piece)
        return piece.to(grad.dtype)

    def _capture(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s output as it reaches the parameter (what no producer's hook took): into the sum, or
        straight into the host output when nothing is intercepted; autograd keeps a placeholder."""
        if g is None:
            return None
        self._held.add(_nbytes(g))
        if self.partials_device is not None:
            self.accumulated += 1
            self._add_partial(i, g)
        else:
            self._sum_done(i, g.detach())
        self._held.now -= _nbytes(g)
        return placeholder(g.shape, g.dtype, g.device)

    def _add_partial(self, i: int, x: torch.Tensor) -> None:
        if self.direct:
            self._sum_done(i, x.detach().reshape(self.leaves[i].shape))
        else:
            super()._add_partial(i, x)

    def _sum_done(self, i: int, total: torch.Tensor) -> None:
        """Parameter ``i``'s output (complete, or a part of it): into the host output."""
        self.outputs_seen.append(i)
        out = self.out_pieces[i]
        if self.fresh and i not in self._written:
            if self.io is None:
                out.copy_(total)
            else:
                self.io.copy_to_host(out, total)
        elif self.io is None:
            out.add_(total.to(device=out.device, dtype=out.dtype))
        else:
            self.io.add_to_host(out, total)
        self._written.add(i)

    def finish(self) -> None:
        """The sums still waiting (producers that sent nothing, counts unknown) go into the output."""
        for i, total in self._sums.drain():
            self._sum_done(i, total)


class RootCapture:
    """Around a first-order ``torch.autograd.grad(..., create_graph=True)``: a hook on each parameter takes its
    gradient's :class:`Root` as soon as autograd has summed it, adds its value into the host gradient ``grad``
    (when given) and hands autograd a zero-stride placeholder back, so the gradient's values are freed one
    parameter at a time and no whole gradient (a d-vector on the device) ever exists; the graph behind each
    root stays. The roots are in :attr:`roots` afterwards (None for a parameter the loss does not reach or whose
    gradient does not depend on the parameters). Hook tables are put back as found, after a failure too."""

    def __init__(self, params: Sequence[torch.Tensor], layout: HostLayout | None = None,
                 grad: torch.Tensor | None = None, io: HostIO | None = None):
        self.params = list(params)
        self.io = io
        self.roots: list[Root | None] = [None] * len(self.params)
        self.pieces = layout.split_local(grad) if grad is not None and layout is not None else None
        self._hooks = ParamHooks(self.params, self._take)

    def _take(self, i: int, g: torch.Tensor) -> torch.Tensor:
        self.roots[i] = Root(g) if g.requires_grad else None
        if self.pieces is not None:
            if self.io is not None:
                self.io.add_to_host(self.pieces[i], g.detach())
            else:
                self.pieces[i].add_(g.detach().to(device=self.pieces[i].device, dtype=self.pieces[i].dtype))
        return placeholder(g.shape, g.dtype, g.device)

    def __enter__(self) -> Self:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__()


class HostVectors:
    """The host-vector mode of a :class:`~geomprobe.Landscape` (module docstring): its streamed HVPs, its
    gradient assembled on the host, and what the passes held (:attr:`stats`)."""

    def __init__(self, land: Any):
        # the Landscape holds this object (land.host): a strong reference back would be a cycle keeping its
        # graphs and vectors alive after the last user reference goes, until Python's garbage collector runs
        self._land = weakref.ref(land)
        self.layout = HostLayout([p.shape for p in land.params], land.device)
        self.host = torch.device("cpu")
        self.io = HostIO(pin=land.device.type == "cuda")  # reused (page-locked) buffers of the copies
        # bytes of the double backward's partial sums that may wait on the device (the rest wait on the host)
        self.partials_device_bytes = 0
        self.direct: bool | None = None  # HostStreamPass's: None, its default (contributions wait on a CUDA model)
        self.spill_partials: bool | None = None
        self.stats = {"passes": 0, "peak_held_bytes": 0}  # and the passes' partial sums (StreamPass.note_partials)

    @property
    def land(self) -> Any:
        """The Landscape these vectors serve (held weakly: it owns them)."""
        land = self._land()
        if land is None:
            raise ConfigurationError("the Landscape of these host vectors is gone; build a new Landscape to measure again")
        return land

    # ------------------------------------------------------------------ build
    def new_grad(self) -> torch.Tensor:
        """The flat gradient's host buffer (zeros)."""
        return torch.zeros(self.layout.dim, dtype=self.land.dtype, device=self.host)

    def graph(self, b: int, watch: bool = False, grad: torch.Tensor | None = None) -> tuple[list[Root | None], torch.Tensor, int]:
        """Probe batch ``b``'s first-order graph as :class:`Root` edges, its loss and saved bytes, built without
        ever holding the whole gradient (:class:`RootCapture`); each parameter's gradient is added into the
        host ``grad`` as it finishes, when given. Cost: one gradient with its graph."""
        capture = RootCapture(self.land.params, self.layout, grad, io=self.io)
        _, loss, nbytes = self.land._graph(b, True, watch=watch, capture=capture)
        if watch:
            check_broken_nodes(capture.roots)  # a Root answers grad_fn like the gradient it stands for
        return capture.roots, loss, nbytes

    # ------------------------------------------------------------------ products
    def hvp_rows(self, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``H v`` for each row of ``V`` ``(k, d)``, one streamed vector at a time, on ``V``'s device (the host,
        or the model's device for metrics that keep their vectors there). Cost: ``k`` double backward passes
        per probe batch, ``d`` elements copied each way per pass when ``V`` is on the host, and about ``d`` more
        each way for the partial sums that wait in host memory. ``out``: written into and returned when the
        copies can go there as they would into the page-locked result (page-locked itself, or no page-locking
        in use, or on the device: a lean Lanczos run's output, its input streamed from a host row); else the result
        is formed as without it and copied in."""
        if out is not None:
            if V.device.type != "cpu" or not self.io.pin or out.is_pinned() or out.device.type != "cpu":
                return self._rows_into(V, out)
            return out.copy_(self.hvp_rows(V))
        if V.device.type == "cpu" and self.io.pin:
            try:  # page-locked (torch caches such blocks): complete sums are copied straight into it
                out = torch.empty(V.shape, dtype=V.dtype, pin_memory=True)
            except RuntimeError:
                out = None
        return self._rows_into(V, torch.empty_like(V) if out is None else out)

    def _rows_into(self, V: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for x, y in zip(V, out):
            y.zero_()
            # a lean Lanczos row whose copy from the device may still run: read after it (lean_vectors.py)
            ready = take_pending(x)
            if ready is not None and not self.io.input_is(x, dtype=self.land.dtype):
                ready.synchronize()  # copied on the host below: its values must be there first
                ready = None
            # page-locked (a reused buffer): each piece goes to the device asynchronously; float32 vectors of a
            # half-precision model are rounded to its type here, so half the bytes cross the bus
            x = self.io.input(x, dtype=self.land.dtype)
            for b in range(len(self.land.batches)):
                self._pass(b, x, y, fresh=b == 0, ready=ready if b == 0 else None)
        return out

    def _pass(self, b: int, v: torch.Tensor, out: torch.Tensor, fresh: bool,
              ready: torch.cuda.Event | None = None) -> None:
        land = self.land
        graph, retain = land._graphs[b], True
        if graph is None:
            graph, retain = self.graph(b)[0], False  # no whole gradient: roots taken as autograd finishes each
            land.graph_rebuilds += 1
        if ready is not None:  # v's copy from the device ran beside the rebuild; the pieces' copies come after it
            torch.cuda.current_stream(self.layout.device).wait_event(ready)
        with HostStreamPass(self.layout, land.params, v, out, fresh=fresh, io=self.io,
                            partials_device_bytes=self.partials_device_bytes, direct=self.direct,
                            spill_partials=self.spill_partials) as sp:
            outputs, placeholders = sp.roots([graph])
            if outputs:
                try:
                    torch.autograd.grad(outputs, land.params, placeholders, retain_graph=retain, allow_unused=True)
                except RuntimeError as e:
                    refusal = no_double_backward(e)
                    if refusal is None:
                        raise
                    raise refusal from e
        del graph
        self.stats["passes"] += 1
        st = self.stats
        st["peak_held_bytes"] = max(st["peak_held_bytes"], sp.peak_held_bytes)
        sp.note_partials(st)


def wide_host_vectors(model_dtype: torch.dtype, vector_dtype: torch.dtype) -> bool:
    """Whether host vectors of ``vector_dtype`` are float32 vectors of a half-precision model (a Lanczos basis
    kept in float32 on the host), which the host mode takes as they are (:meth:`HostVectors.hvp_rows`: rounded
    to the model's type as they are copied for the device, the results summed in float32) instead of
    converting them whole to the model's type."""
    return vector_dtype == torch.float32 and model_dtype in (torch.float16, torch.bfloat16)


def resolve_vector_device(land: Any, vector_device: Any) -> str | None:
    """``"host"``/``"device"`` for an explicit ``vector_device`` of ``land`` (a Landscape before its plan), None
    when the plan is to choose. ``"cpu"`` asks for host vectors, the model's device for device vectors. Refuses
    what the mode cannot serve: a sharded model (its HVPs stream between ranks already), finite differences,
    several ranks (the host vectors would need their own reductions)."""
    if vector_device is None:
        return None
    try:
        dev = torch.device(vector_device)
    except (RuntimeError, TypeError):
        raise ConfigurationError(
            f"vector_device must be 'cpu' (vectors in host memory), the model's device, or None (the memory plan "
            f"chooses), got {vector_device!r}") from None
    if dev.type != "cpu":
        model = land.device
        if dev.type != model.type or (dev.index is not None and model.index is not None and dev.index != model.index):
            raise ConfigurationError(
                f"vector_device={vector_device!r} is neither 'cpu' (host vectors) nor the model's device {model}; "
                "vectors live on one of the two")
        return "device"
    if land.sharded:
        raise ConfigurationError(
            "vector_device='cpu' is for a model on one device; an FSDP2 model's HVPs already stream its vectors "
            "between ranks parameter by parameter: leave vector_device at None")
    if land.hvp_method != "autograd":
        raise ConfigurationError(
            "vector_device='cpu' streams the exact HVP's vectors through the double backward; finite differences "
            "hold whole vectors on the device: use hvp_method='autograd' or leave vector_device at None")
    if land.reducer.world_size > 1:
        raise ConfigurationError(
            f"vector_device='cpu' measures one process's data, but the probe data is spread over "
            f"{land.reducer.world_size} ranks: leave vector_device at None (or pass process_group=False)")
    return "host"


def host_mode(land: Any) -> HostVectors | None:
    """The host-vector mode of ``land`` (after its plan) when the user or the plan chose it, else None. A plan
    given whole that chose it for a model this process cannot stream alone (sharded, several ranks, finite
    differences) is not followed there."""
    chosen = land._vectors_requested or getattr(land.plan, "vectors", "device")
    if chosen != "host" or land.sharded or land.hvp_method != "autograd" or land.reducer.world_size > 1:
        return None
    return HostVectors(land)


def host_vectors_possible(land: Any) -> bool:
    """Whether the memory plan may choose host vectors for ``land``: a model on CUDA, in one process, exact HVPs."""
    return (land.device.type == "cuda" and not land.sharded and land.hvp_method == "autograd"
            and land.reducer.world_size == 1)


def vectors_record(land: Any) -> dict:
    """Where ``land``'s vectors live and who chose it (``"user"``, the memory plan, or the default), for
    :meth:`~geomprobe.Landscape.info`."""
    where = "host" if land.host is not None else "device"
    if land._vectors_requested is not None:
        return {"where": where, "source": "user"}
    plan = land.plan
    if plan is not None and getattr(plan, "vectors", "device") == where:
        return {"where": where, "source": (plan.sources or {}).get("vectors", "plan")}
    return {"where": where, "source": "default"}
