"""One pass of the streamed exact route of an FSDP2 model: the input gathered and the output reduce-scattered
parameter by parameter, inside the backward, so that no whole d-vector is ever held. :class:`StreamPass` is
one double backward (an HVP); :class:`BuildPass` one first-order backward (building a graph and its gradient).

The exact route differentiates the gradient ``g`` (built through whole parameter tensors) once more:
``Hv = d <g, v> / d theta``. A :class:`StreamPass` runs that double backward with

- **placeholders** (zero-stride zeros, no memory) as the gradients of the roots ``g_i`` (graph edges: the
  values of ``g_i`` need not be kept, :class:`Root`), and a pre-hook on each root's node that swaps in the
  whole piece ``v_i``, all-gathered from the ranks' slices only when autograd is
  about to use it, and dropped as soon as the last root of that parameter has used it;
- a post-accumulate-grad hook on each whole parameter leaf that takes its finished output ``(Hv)_i`` off the
  leaf and reduce-scatters it into this rank's output slice at once.

**Order.** Every rank must issue the same collectives in the same order, but the hooks fire when autograd
reaches them, at times that differ between ranks (and a parameter may get no root, or no output, on one
rank only: data-dependent graphs). So the collectives follow a fixed schedule that timing cannot change:
the all-gathers of every parameter in ``gather_order``, then the reduce-scatters of every parameter in
``scatter_order``. A hook that needs a piece gathers the schedule up to it (pieces gathered ahead wait, and
a parameter this rank does not use is gathered and dropped); an output that is ready before its turn, or
before the last all-gather, waits in ``staged``; whatever the backward left undone is issued by
:meth:`StreamPass.finish`, with zeros for outputs that never came. Each collective therefore happens exactly
once per pass on every rank, in one order, whatever happens inside autograd, and ``finish`` runs even after
a failure, so the other ranks are never left waiting. The default orders match how the double backward runs
(it uses the first layer's gradient first, and finishes the last layer's output first, like a training
backward), so little waits; the most that waited is kept (:attr:`StreamPass.peak_held_bytes`).

Cost per pass: one all-gather and one reduce-scatter per parameter (``d`` elements each in all). Memory
beyond the graph: the pieces in flight and waiting, and this rank's output slice.

**Vectors in host memory.** ``v`` and ``out`` may live in host memory while the graph and the collectives are
on the device: each parameter's piece of ``v`` is copied to the device just before its all-gather, and each
reduce-scattered piece of the output is added into ``out`` where it lives, so the device holds no slice-sized
vector during the pass.

**Partial sums in host memory** (``partials_device="cpu"``). A weight reaches the double backward twice: from
the forward's product and from the first-order backward's, which used it to pass the gradient on. Both
contributions meet in one node's input buffer (the transpose ``W.T``, or the weight's own accumulator), and
autograd runs every node the first-order backward created before any forward node, so nearly every weight's
first contribution waits there for its second: about 0.84 of a whole gradient at once on an MLP, whatever
the batch. With ``partials_device`` set, each contribution is taken from the node that produces it (a
post-hook that pushes it through the unary view and cast nodes below, down to the weight, and hands autograd
no gradient in its place; the walk also counts each parameter's producers). A first contribution waits for
the next in a reused page-locked host buffer (or on the device, within ``partials_device_bytes``), the two
are added on the device, and a parameter's sum goes to the reduce-scatter schedule as soon as its last
producer has sent (:mod:`~geomprobe.engine.partial_sums`; sums whose count is unknown at the end of the
backward). The device then holds only the contributions in flight and the complete sums waiting for their
turn; the price is about ``d`` elements copied each way, asynchronously.

**The build** (:class:`BuildPass`): the first-order backward of one probe piece with ``create_graph``, a hook
on each whole parameter taking its gradient ``g_i`` as soon as autograd has finished it, keeping only its
:class:`Root` (the edge the double backward starts from) and reduce-scattering ``g_i`` into this rank's
gradient slice, on the same kind of fixed schedule (reduce-scatters in ``scatter_order``, staged until their
turn, the rest completed with zeros by :meth:`BuildPass.finish`, also after a failure). The whole gradient is
never held at once: one or a few parameters' gradients wait at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Self

import torch

from ..errors import GeomprobeError
from .partial_sums import HostIO, PartialSums
from .sharded import ShardLayout

__all__ = ["BuildPass", "Root", "ScatterSchedule", "StreamPass", "placeholder", "roots_of"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of ``shape`` that take no memory (one element, zero strides): what a hook hands autograd in place of a
    gradient it has taken away, and the gradient a streamed pass's roots start from."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class Root:
    """A root of the double backward without its value: the edge into the graph that produced a gradient
    ``g_i`` (built with ``create_graph``) and ``g_i``'s shape. The double backward needs the graph behind
    ``g_i``, not ``g_i`` itself, so a kept graph need not hold its whole gradient (a d-vector per graph);
    dropping the tensors frees them (autograd does not save a gradient's value to differentiate it)."""

    __slots__ = ("device", "dtype", "node", "output_nr", "shape")

    def __init__(self, g: torch.Tensor):
        edge = torch.autograd.graph.get_gradient_edge(g)
        self.node, self.output_nr = edge.node, edge.output_nr
        self.shape, self.dtype, self.device = g.shape, g.dtype, g.device

    @property
    def edge(self) -> torch.autograd.graph.GradientEdge:
        return torch.autograd.graph.GradientEdge(self.node, self.output_nr)

    @property
    def grad_fn(self):
        """The node that produced ``g_i``: a graph walk (engine/doublecheck.py) starts here as from ``g_i``."""
        return self.node


def roots_of(grads: Sequence[torch.Tensor | None]) -> list[Root | None]:
    """The :class:`Root` of each gradient that depends on the parameters (None for the others)."""
    return [Root(g) if g is not None and g.requires_grad else None for g in grads]


# nodes that pass a gradient on unchanged but for its view or dtype: a contribution on its way to a parameter
# can be pushed through them by hand (each is linear, one input, one output)
_FUNNEL_NODES = frozenset({
    "TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0", "ToCopyBackward0", "ExpandBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "CloneBackward0",
})


def _funnel_of(node, acc: dict, memo: dict):
    """(parameter index, the funnel nodes from ``node`` down) when ``node`` leads to a parameter's accumulator
    (in ``acc``) through funnel nodes only, else None; memoized in ``memo``. A module-level function, not a
    closure calling itself: such a closure is a reference cycle (function, cell) that would keep ``memo``'s
    graph nodes alive until Python's garbage collector runs."""
    if node in memo:
        return memo[node]
    found = None
    if node in acc:
        found = (acc[node], ())
    elif type(node).__name__ in _FUNNEL_NODES:
        below = [f for f, _ in node.next_functions if f is not None]
        under = _funnel_of(below[0], acc, memo) if len(below) == 1 else None
        found = None if under is None else (under[0], (node, *under[1]))
    memo[node] = found
    return found


class _Held:
    """Bytes of pieces waiting in a pass (gathered ahead of use, outputs staged before their turn) and their peak."""

    __slots__ = ("now", "peak")

    def __init__(self):
        self.now = self.peak = 0

    def add(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)


class ScatterSchedule:
    """The reduce-scatters of one pass, every parameter once, in ``order``, whatever order their values come
    in: a value that comes before its turn is staged (counted in ``held``), and :meth:`finish` issues what
    never came with zeros. ``out_pieces``: this rank's shard of each parameter in the output slice (device or
    host memory); ``device``: where the collectives run."""

    def __init__(self, layout: ShardLayout, out_pieces: Sequence[torch.Tensor], order: Sequence[int],
                 device: torch.device, held: _Held, io: HostIO | None = None):
        self.layout, self.out_pieces, self.order, self.device, self.held = layout, list(out_pieces), list(order), device, held
        self.io = io
        if sorted(self.order) != list(range(len(self.out_pieces))):
            raise ValueError("the scatter order must list every parameter index once")
        self._staged: dict[int, torch.Tensor] = {}
        self._unheld: set[int] = set()
        self._issued: set[int] = set()
        self._next = 0

    @property
    def done(self) -> bool:
        return self._next == len(self.order)

    def stage(self, i: int, g: torch.Tensor, held: bool = True) -> None:
        """Parameter ``i``'s whole value, to be reduce-scattered at its turn (``held``: counted as waiting on
        the device). A second value for a parameter still waiting is added to the first."""
        if i in self._issued:
            raise GeomprobeError(f"parameter {i}'s output came after its reduce-scatter was issued; the pass's "
                                 "count of its contributions was wrong")
        if i in self._staged:
            self._staged[i] = self._staged[i] + g.to(self._staged[i].device)  # out of place: g may be autograd's
            return
        self._staged[i] = g
        if held:
            self.held.add(_nbytes(g))
        else:
            self._unheld.add(i)

    def flush(self) -> None:
        """Issue the reduce-scatters whose turn has come and whose values are here."""
        while not self.done and self.order[self._next] in self._staged:
            j = self.order[self._next]
            self._scatter(j, self._staged.pop(j))

    def _scatter(self, j: int, g: torch.Tensor | None) -> None:
        self._next += 1
        self._issued.add(j)
        self.layout.scatter_param_add(j, g, self.out_pieces[j], device=self.device, io=self.io)
        if g is not None and j not in self._unheld:
            self.held.now -= _nbytes(g)

    def finish(self) -> None:
        """The rest of the schedule: staged values at their turn, zeros for values that never came."""
        while not self.done:
            j = self.order[self._next]
            self._scatter(j, self._staged.pop(j, None))

    def clear(self) -> None:
        self._staged.clear()


class StreamPass:
    """One double backward whose input ``v`` (this rank's slice) is gathered, and whose output is added to
    ``out`` (this rank's slice), parameter by parameter (module docstring). Use as a context manager: the
    hooks are removed, the schedule completed and the leaves' ``.grad`` cleared on exit, also after an error.

    ``leaves``: the whole parameter tensors the graphs were built through (requires_grad leaves, one per
    parameter of ``layout``). ``v``: ``(d_local,)``, needed even by a pass with no graph (a rank with fewer
    probe batches than another), whose slice the other ranks gather. ``v`` and ``out`` may be in host memory
    (module docstring); the collectives run on the leaves' device. ``partials_device``: where the outputs'
    partial sums wait between contributions (module docstring, "Partial sums in host memory"; up to
    ``partials_device_bytes`` of them on the device); None: in autograd's buffers. ``io``: the reused host
    buffers of the copies (:class:`~geomprobe.engine.partial_sums.HostIO`; None: plain copies).
    ``spill_partials``: whether partial sums beyond ``partials_device_bytes`` wait in ``io``'s host buffers
    (default: on a CUDA model).
    """

    def __init__(self, layout: ShardLayout, leaves: Sequence[torch.Tensor], v: torch.Tensor,
                 out: torch.Tensor, gather_order: Sequence[int] | None = None,
                 scatter_order: Sequence[int] | None = None, partials_device: torch.device | str | None = None,
                 io: HostIO | None = None, partials_device_bytes: float = 0, spill_partials: bool | None = None):
        n = len(leaves)
        self.layout = layout
        self.leaves = list(leaves)
        self.device = self.leaves[0].device
        self.v_pieces = layout.split_local(v)
        self.gather_order = list(range(n)) if gather_order is None else list(gather_order)
        scatter_order = list(range(n - 1, -1, -1)) if scatter_order is None else list(scatter_order)
        if sorted(self.gather_order) != list(range(n)) or sorted(scatter_order) != list(range(n)):
            raise ValueError("gather_order and scatter_order must each list every parameter index once")
        self._held = _Held()
        self.io = io
        self._schedule = ScatterSchedule(layout, layout.split_local(out), scatter_order, self.device, self._held, io)
        self._uses = [0] * n
        self._gathered: dict[int, torch.Tensor] = {}
        self._next_gather = 0
        self._handles: list = []
        # the order autograd used the inputs and finished the outputs in (what the schedule should follow)
        self.inputs_seen: list[int] = []
        self.outputs_seen: list[int] = []
        self.partials_device = None if partials_device is None else torch.device(partials_device)
        self._sums = PartialSums({}, self._sum_done, self.device, partials_device_bytes, io, spill_partials)
        self.intercepted = 0  # contributions taken from their producers
        self.accumulated = 0  # outputs that still came through a parameter's accumulator

    @property
    def peak_held_bytes(self) -> int:
        """The most bytes of pieces gathered ahead of use plus outputs waiting for their turn, at once."""
        return self._held.peak

    def note_partials(self, stats: dict) -> None:
        """Add this pass's partial-sum figures into ``stats`` (counts summed over passes, the device peak as a
        maximum): contributions taken at their producers and through accumulators, sums that waited in host
        memory, sums handed on as soon as their last producer sent."""
        sums = self._sums
        for key, n in (("partials_intercepted", self.intercepted), ("partials_accumulated", self.accumulated),
                       ("partials_spilled", sums.spilled), ("partials_completed_early", sums.completed)):
            stats[key] = stats.get(key, 0) + n
        stats["partials_peak_device_bytes"] = max(stats.get("partials_peak_device_bytes", 0), sums.peak_device_bytes)

    # ------------------------------------------------------------------ set-up
    def roots(self, graphs: Sequence[Sequence[torch.Tensor | Root | None]]) -> tuple[list, list[torch.Tensor]]:
        """The roots of the double backward over ``graphs`` (each a per-parameter list of gradients built with
        ``create_graph``, or their :class:`Root`) as graph edges, and their placeholder gradients; a pre-hook
        on each root's node swaps the gathered piece in for the placeholder."""
        outputs, grads = [], []
        for graph in graphs:
            for i, g in enumerate(graph):
                if g is None or (isinstance(g, torch.Tensor) and not g.requires_grad):
                    continue
                root = g if isinstance(g, Root) else Root(g)
                self._uses[i] += 1
                outputs.append(root.edge)
                grads.append(placeholder(root.shape, root.dtype, root.device))
                self._handles.append(root.node.register_prehook(
                    lambda gs, i=i, nr=root.output_nr: (*gs[:nr], self._input(i, gs[nr]), *gs[nr + 1 :])))
        if self.partials_device is not None and outputs:
            self._sums.expected = self._intercept([e.node for e in outputs])
        return outputs, grads

    def _intercept(self, roots: Sequence) -> dict[int, int]:
        """A post-hook on every node that sends a gradient towards a parameter, through unary view and cast
        nodes (the funnel) or straight into its accumulator: the contribution is taken there (one walk of
        the double backward's graph). Returns how many producers send to each parameter, for the parameters
        every contribution of which is taken this way (one whose gradient path starts at a root is left out:
        autograd itself feeds that root, so its count is unknown)."""
        acc = {torch.autograd.graph.get_gradient_edge(leaf).node: i for i, leaf in enumerate(self.leaves)}
        funnel: dict = {}
        seen, stack, sites, uncounted, starts = set(), list(roots), {}, set(), set(roots)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            found = _funnel_of(node, acc, funnel)
            if found is not None:
                if node in starts:
                    uncounted.add(found[0])
                continue  # reached through its producers, which hand it nothing
            for k, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                f = _funnel_of(nxt, acc, funnel)
                if f is not None:
                    sites.setdefault(node, []).append((k, *f))
                else:
                    stack.append(nxt)
        counts: dict[int, int] = {}
        for node, edges in sites.items():
            self._handles.append(node.register_hook(self._producer_hook(edges)))
            for _, i, _ in edges:
                counts[i] = counts.get(i, 0) + 1
        return {i: c for i, c in counts.items() if i not in uncounted}

    def _producer_hook(self, edges: list):
        def hook(grad_inputs, grad_outputs):
            grads = list(grad_inputs)
            for k, i, chain in edges:
                x = grads[k]
                if x is None:
                    continue
                grads[k] = None
                for node in chain:
                    x = node(x)
                    x = x[0] if isinstance(x, tuple) else x
                self.intercepted += 1
                self._add_partial(i, x)
            return tuple(grads)

        return hook

    def _add_partial(self, i: int, x: torch.Tensor) -> None:
        leaf = self.leaves[i]
        self._sums.add(i, x.detach().reshape(leaf.shape).to(leaf.dtype))

    def _sum_done(self, i: int, total: torch.Tensor) -> None:
        """Parameter ``i``'s output is complete: to the reduce-scatter schedule at once."""
        self.outputs_seen.append(i)
        self._schedule.stage(i, total)
        self._flush()

    def __enter__(self) -> Self:
        for i, leaf in enumerate(self.leaves):
            leaf.grad = None
            self._handles.append(leaf.register_post_accumulate_grad_hook(lambda t, i=i: self._output(i, t)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for leaf in self.leaves:
            leaf.grad = None
        if exc_type is None:
            self.finish()
            return
        # the other ranks go on through the schedule: this one must too, or they wait forever; the error
        # that stopped the backward is the one to report
        with contextlib.suppress(Exception):
            self.finish()
        self._gathered.clear()
        self._sums.clear()
        self._schedule.clear()

    # ------------------------------------------------------------------ hooks
    def _gather_next(self) -> None:
        j = self.gather_order[self._next_gather]
        self._next_gather += 1
        piece = self.layout.gather_param(j, self.v_pieces[j], device=self.device)
        if self._uses[j] > 0:
            self._gathered[j] = piece
            self._held.add(_nbytes(piece))

    def _input(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        self.inputs_seen.append(i)
        while i not in self._gathered:
            self._gather_next()
        piece = self._gathered[i]
        self._uses[i] -= 1
        if self._uses[i] == 0:
            del self._gathered[i]
            self._held.now -= _nbytes(piece)
        return piece.to(grad.dtype)

    def _output(self, i: int, leaf: torch.Tensor) -> None:
        g, leaf.grad = leaf.grad, None
        if g is None:
            return
        if self.partials_device is not None:  # a contribution no producer's hook took: into the sum too
            self.accumulated += 1
            self._add_partial(i, g)
            return
        self.outputs_seen.append(i)
        self._schedule.stage(i, g)
        self._flush()

    def _flush(self) -> None:
        if self._next_gather < len(self.gather_order):
            return  # every all-gather comes before the first reduce-scatter
        self._schedule.flush()

    # ------------------------------------------------------------------ completion
    def finish(self) -> None:
        """Issue what the backward left of the schedule: the remaining all-gathers (pieces dropped), then the
        remaining reduce-scatters (zeros where an output never came)."""
        while self._next_gather < len(self.gather_order):
            self._uses[self.gather_order[self._next_gather]] = 0
            self._gather_next()
        self._gathered.clear()
        for i, total in self._sums.drain():
            self._schedule.stage(i, total)
        self._schedule.finish()
        if self.io is not None and self.device.type == "cuda":
            # the input's page-locked buffer is reused for the next vector: its pieces must have landed
            torch.cuda.current_stream(self.device).synchronize()


class BuildPass:
    """The first-order backward of one probe piece (module docstring, "The build"): run :meth:`backward` on
    the piece's weighted loss inside the context. Each whole parameter's gradient ``g_i`` is taken by a hook
    on its leaf as soon as autograd has finished it: its :class:`Root` is kept in :attr:`roots` (the graph
    behind it, for the double backward; None where ``g_i`` does not depend on the parameters), its value
    reduce-scattered into ``out`` (this rank's gradient slice, device or host memory) at its turn in
    ``scatter_order``, and autograd is handed a placeholder (zero strides, no memory) instead, so the
    gradient list ``autograd.grad`` returns holds nothing. ``out=None``: no collective (a graph rebuilt on
    this rank alone; the values are dropped). On exit the hooks are removed and the schedule completed, with
    zeros for parameters without gradient, also after an error, so the other ranks are never left waiting.

    Memory beyond the graph: the gradients waiting for their turn (:attr:`peak_held_bytes`; the default order,
    last parameter first, is about the order a backward finishes them in: a few parameters' at a time, e.g. a
    Llama layer's MLP weights, which finish before its norm's) and a reduce-scatter's buffers.
    Cost: one reduce-scatter per parameter (``d`` elements in all) per pass."""

    def __init__(self, layout: ShardLayout, leaves: Sequence[torch.Tensor], out: torch.Tensor | None,
                 scatter_order: Sequence[int] | None = None, io: HostIO | None = None):
        n = len(leaves)
        self.leaves = list(leaves)
        self.device = self.leaves[0].device
        self._held = _Held()
        order = list(range(n - 1, -1, -1)) if scatter_order is None else list(scatter_order)
        self._schedule = (None if out is None else
                          ScatterSchedule(layout, layout.split_local(out), order, self.device, self._held, io))
        self.roots: list[Root | None] = [None] * n
        self.received = [False] * n
        self.outputs_seen: list[int] = []  # the order autograd finished the gradients in
        self.late_gradients = 0  # gradients autograd returned whole instead of handing them to the hooks
        self._handles: list = []

    @property
    def peak_held_bytes(self) -> int:
        """The most bytes of gradients that waited for their reduce-scatter at once."""
        return self._held.peak

    def __enter__(self) -> Self:
        for i, leaf in enumerate(self.leaves):
            self._handles.append(leaf.register_hook(lambda g, i=i: self._take(i, g)))
        return self

    def _take(self, i: int, g: torch.Tensor) -> torch.Tensor:
        self.received[i] = True
        self.outputs_seen.append(i)
        self.roots[i] = Root(g) if g.requires_grad else None
        if self._schedule is not None:
            self._schedule.stage(i, g.detach())
            self._schedule.flush()
        return placeholder(g.shape, g.dtype, g.device)

    def backward(self, loss: torch.Tensor) -> None:
        """The backward of ``loss`` with ``create_graph`` through the leaves. Cost: one backward pass."""
        res = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        # a gradient the hook did not see (autograd versions that skip tensor hooks of captured inputs) is
        # taken now, after the fact: the same result, only its memory was held longer
        late = [(i, r) for i, r in enumerate(res) if r is not None and not self.received[i]]
        del res
        self.late_gradients += len(late)
        for i, r in late:
            self._take(i, r)

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._schedule is None:
            return
        if exc_type is None:
            self._schedule.finish()
            return
        with contextlib.suppress(Exception):  # the others go on through the schedule: so must this rank
            self._schedule.finish()
        self._schedule.clear()
