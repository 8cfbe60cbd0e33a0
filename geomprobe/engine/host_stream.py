"""Host vectors: the exact HVP of a model on one device whose input and output vectors live in host memory.

A Lanczos run on a 1B-parameter model holds a handful of d-vectors besides its HVP (input, output, the
three-term step's working vectors: 1.7 GB each in bf16), which is what keeps a probe above 1.5x the training
step even with its basis in host memory. In this mode no d-vector lives on the device: :meth:`HostVectors.hvp`
runs one double backward per probe batch (through its kept graph, or one rebuilt for the pass) in which

- each parameter's piece of the host input ``v`` is copied to the device when autograd is about to use it (a
  pre-hook on the node of each gradient root swaps it in for a zero-stride placeholder,
  :class:`~geomprobe.engine.sharded_stream.StreamPass`), and dropped once used;
- each contribution to a parameter's output ``(Hv)_i`` is added into the host output where it is produced (a
  post-hook on the producing node, :meth:`StreamPass._intercept`; a weight gets two, from the forward's product
  and from the first-order backward's, and autograd would keep the first in its buffers until the second came:
  about 0.84 of a whole gradient at once), and what still reaches the parameter is added there (a hook on the
  parameter, which hands autograd a zero-stride placeholder back).

The double backward is ``torch.autograd.grad`` with the parameters as inputs, as in the device mode: it never
runs a parameter's gradient accumulator, so the user's ``.grad`` is never written and the user's
post-accumulate-grad hooks (an optimizer stepping inside backward, DDP's reducer) never fire. The hooks this
mode adds are removed after every pass, after a failure too, and each parameter's hook table is put back as
found. Kept graphs are held as :class:`~geomprobe.engine.sharded_stream.Root` edges only: no whole gradient.

Cost per HVP: the double backwards of the device mode, plus ``d`` elements copied host to device and about
``2 d`` device to host (the contributions) per probe batch (each output copy waits for the device: the pass synchronizes once per
parameter), and the additions of the outputs on the host; the Krylov arithmetic around the HVPs runs on the
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
from .doublecheck import check_broken_nodes, no_double_backward
from .sharded_stream import Root, StreamPass, placeholder

__all__ = ["HostLayout", "HostStreamPass", "HostVectors", "ParamHooks", "RootCapture", "host_mode", "host_vectors_possible",
           "resolve_vector_device", "vectors_record"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HostLayout:
    """The one-process layout a :class:`StreamPass` takes: parameter pieces as views of a flat vector, copied
    to the model's device when gathered and added (copied, in a pass's first batch) into the flat output."""

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

    def scatter_param_add(self, i: int, whole: torch.Tensor | None, out: torch.Tensor, fresh: bool = False) -> None:
        """Add parameter ``i``'s output ``whole`` (on the device; None: nothing) into ``out``, its view of the flat
        output. ``fresh``: ``out`` still holds zeros, so the output is copied straight into it (no temporary)."""
        if whole is None:
            return
        if fresh:
            out.copy_(whole)
        else:
            out.add_(whole.to(device=out.device, dtype=out.dtype))


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
    first use, outputs taken off as autograd finishes them. Reuses :class:`StreamPass`'s roots and placeholders;
    the schedule of collectives it keeps for several ranks has no use here, so pieces move when autograd asks.

    ``fresh``: ``out`` holds zeros (the first batch of a vector), so outputs are copied, not added. Use as a
    context manager; the hooks go on entry and are removed on exit, after an error too."""

    def __init__(self, layout: HostLayout, leaves: Sequence[torch.Tensor], v: torch.Tensor, out: torch.Tensor,
                 fresh: bool = False, intercept: bool = True):
        # intercept: each weight's contributions are taken where they are produced (StreamPass._intercept) and
        # added into the output at once, instead of the first waiting in autograd's buffers for the second
        super().__init__(layout, leaves, v, out, partials_device="cpu" if intercept else None)  # type: ignore[arg-type]
        self.out_pieces = self._schedule.out_pieces  # the views of out the base class made
        self.fresh = fresh and not intercept  # with contributions added as they come, nothing is copied over
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
        if exc_type is None and self.layout.device.type == "cuda":
            # an input copied asynchronously from pinned memory must land before the caller reuses v
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
        """Parameter ``i``'s finished output: into the flat output at once; autograd keeps a placeholder. None
        when every contribution was taken at its producer."""
        if g is None:
            return None
        self.outputs_seen.append(i)
        self._held.add(_nbytes(g))
        self.layout.scatter_param_add(i, g, self.out_pieces[i], fresh=self.fresh)
        self._held.now -= _nbytes(g)
        return placeholder(g.shape, g.dtype, g.device)

    def _add_partial(self, i: int, x: torch.Tensor) -> None:
        """A contribution to parameter ``i``'s output taken at its producer: added into the output at once."""
        self.layout.scatter_param_add(i, x.detach().reshape(self.leaves[i].shape), self.out_pieces[i])

    def finish(self) -> None:
        """Nothing is left to issue: every piece moved when autograd asked for it."""


class RootCapture:
    """Around a first-order ``torch.autograd.grad(..., create_graph=True)``: a hook on each parameter takes its
    gradient's :class:`Root` as soon as autograd has summed it, adds its value into the host gradient ``grad``
    (when given) and hands autograd a zero-stride placeholder back, so the gradient's values are freed one
    parameter at a time and no whole gradient (a d-vector on the device) ever exists; the graph behind each
    root stays. The roots are in :attr:`roots` afterwards (None for a parameter the loss does not reach or whose
    gradient does not depend on the parameters). Hook tables are put back as found, after a failure too."""

    def __init__(self, params: Sequence[torch.Tensor], layout: HostLayout | None = None,
                 grad: torch.Tensor | None = None):
        self.params = list(params)
        self.roots: list[Root | None] = [None] * len(self.params)
        self.pieces = layout.split_local(grad) if grad is not None and layout is not None else None
        self._hooks = ParamHooks(self.params, self._take)

    def _take(self, i: int, g: torch.Tensor) -> torch.Tensor:
        self.roots[i] = Root(g) if g.requires_grad else None
        if self.pieces is not None:
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
        self.pin = land.device.type == "cuda"
        self.stats = {"passes": 0, "peak_held_bytes": 0}

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
        capture = RootCapture(self.land.params, self.layout, grad)
        _, loss, nbytes = self.land._graph(b, True, watch=watch, capture=capture)
        if watch:
            check_broken_nodes(capture.roots)  # a Root answers grad_fn like the gradient it stands for
        return capture.roots, loss, nbytes

    # ------------------------------------------------------------------ products
    def hvp_rows(self, V: torch.Tensor) -> torch.Tensor:
        """``H v`` for each row of ``V`` ``(k, d)``, one streamed vector at a time, on ``V``'s device (the host,
        or the model's device for metrics that keep their vectors there). Cost: ``k`` double backward passes
        per probe batch, ``d`` elements copied each way per pass when ``V`` is on the host."""
        out = None
        if V.device.type == "cpu" and self.pin:
            try:  # page-locked: the device writes each output piece straight into it
                out = torch.empty(V.shape, dtype=V.dtype, pin_memory=True)
            except RuntimeError:
                self.pin = False
        out = torch.empty_like(V) if out is None else out
        for x, y in zip(V, out):
            y.zero_()
            for b in range(len(self.land.batches)):
                self._pass(b, x, y, fresh=b == 0)
        return out

    def _pass(self, b: int, v: torch.Tensor, out: torch.Tensor, fresh: bool) -> None:
        land = self.land
        graph, retain = land._graphs[b], True
        if graph is None:
            graph, retain = self.graph(b)[0], False  # no whole gradient: roots taken as autograd finishes each
            land.graph_rebuilds += 1
        with HostStreamPass(self.layout, land.params, v, out, fresh=fresh) as sp:
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
        self.stats["peak_held_bytes"] = max(self.stats["peak_held_bytes"], sp.peak_held_bytes)


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
