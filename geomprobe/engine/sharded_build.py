"""The exact route's construction for an FSDP2 model (mixed into
:class:`~geomprobe.engine.sharded_landscape.ShardedLandscape`): every probe batch's first-order graph through
the whole parameters and this rank's slice of the gradient.

With one vector per HVP (``chunk_size`` 1) the build is streamed (:class:`~geomprobe.engine.sharded_stream.BuildPass`):
each parameter's gradient is reduce-scattered into the gradient slice as soon as autograd has finished it and
only its root's edge is kept, so no whole gradient (a d-vector) is ever held, and graphs the memory plan does
not keep are rebuilt per HVP the same way without collectives. Wider chunks keep every graph's whole
gradients, which their batched double backward differentiates.

Every rank runs the same number of passes (one per probe batch of the rank with most; a rank without a batch
for a pass takes part with zeros) and agrees on a failure before each pass's collectives and after them, so
a failure on one rank makes every rank raise and none waits in a collective.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import NonFiniteLossError
from .autodiff.fastdouble import fast_double_backward
from .doublecheck import CustomBackwardWatch, check_broken_nodes, custom_function_nodes
from .saved_bytes import SavedBytes
from .sharded_stream import BuildPass

__all__ = ["ExactBuild"]


class ExactBuild:
    """The exact route's build; uses the Landscape's batches, weights, whole leaves (``_full``), layout,
    reducer and graph bookkeeping (``_graphs``, ``graph_budget_bytes``, ``stream_stats``)."""

    def _build_exact(self) -> None:
        """The first-order graph of every probe batch through the whole parameters (kept within
        ``graph_budget_bytes``, the others rebuilt per HVP) and the gradient, each batch's reduce-scattered
        parameter by parameter into this rank's slice (on :attr:`vector_device`): no whole gradient vector
        is formed. With one vector per HVP (``chunk_size`` 1) the build is streamed
        (:meth:`_build_pass`): each parameter's gradient is reduce-scattered as soon as autograd has finished
        it and the graph is kept as its roots' edges, so not even the per-parameter gradient list exists
        whole; wider chunks keep each graph's whole gradients for batched double backward, formed at once
        and reduce-scattered after the backward. Every rank runs the same number of passes (one per batch of
        the rank with most) and agrees on a failure before each pass's collectives and after them."""
        self._grad = torch.zeros(self.local_dim, dtype=self.dtype, device=self.vector_device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        streamed = self.chunk_size == 1
        for b in range(self._passes):
            if streamed:
                graph, loss_b, nbytes = self._build_pass(b)
                extra = 0  # the gradient's value is not kept, only its roots' edges
            else:
                graph, loss_b, nbytes = self._whole_gradient_pass(b)
                extra = sum(g.numel() * g.element_size() for g in graph if g is not None) if graph else 0
            if graph is not None:
                loss += loss_b.double() * self.weights[b]
                kept = nbytes + extra
                # a budget too small for any graph keeps none (every graph rebuilt per HVP, one at a time):
                # the least memory, what a user asking for graph_budget_bytes=0 wants on a sharded model
                if self.graph_budget_bytes is None or self._kept_bytes + kept <= self.graph_budget_bytes:
                    self._graphs.append(graph)
                    self.graph_bytes += nbytes
                    self._kept_bytes += kept
                else:
                    self._graphs.append(None)
            del graph
        self.reducer.sum_(loss)
        self._loss = float(loss)
        if self.reducer.sum_int(int(not bool(torch.isfinite(self._grad).all()))):
            raise NonFiniteLossError("the gradient has non-finite entries at the current parameters")
        if self.reducer.sum_int(len(self.custom_functions)) > 0:
            self._verify_custom_backward()

    def _whole_gradient_pass(self, b: int) -> tuple[list | None, torch.Tensor | None, int]:
        """Pass ``b`` of the build for whole blocks: every parameter's gradient formed at once (they are kept
        for batched double backward), then reduce-scattered parameter by parameter. Holds the whole gradient
        (a d-vector) while the graph lives. Cost: one forward and backward, a reduce-scatter per parameter."""
        grads, err, loss_b, nbytes = None, None, None, 0
        if b < len(self.batches):
            try:
                grads, loss_b, nbytes = self._graph(b, True, watch=b == 0)
                if b == 0:
                    check_broken_nodes(grads)
                    self.graph_bytes_per_sample = nbytes / max(1, self.batch_sizes[0])
            except Exception as e:  # noqa: BLE001 - every rank learns of it before the reduce-scatters
                err = e
        if err is not None:
            self.reducer.report_failure()
            try:
                raise err
            finally:
                err = None  # a caught exception kept in a local and its traceback would be a cycle with this frame
        self.reducer.check_others()
        pieces = self.layout.split_local(self._grad)
        for i in range(len(self._full) - 1, -1, -1):
            g = grads[i] if grads is not None else None
            self.layout.scatter_param_add(i, g.detach() if g is not None else None, pieces[i], device=self.device,
                                          io=self.host_io)
        return grads, loss_b, nbytes

    def _build_pass(self, b: int) -> tuple[list | None, torch.Tensor | None, int]:
        """Pass ``b`` of the streamed build (:class:`~geomprobe.engine.sharded_stream.BuildPass`): the forward
        of probe batch ``b``, an agreement that it worked on every rank (before any collective), its backward
        with ``create_graph`` in which each parameter's gradient is reduce-scattered into the gradient slice
        as soon as autograd has finished it and only its root's edge is kept, and a second agreement after
        the pass's collectives (a rank that failed inside completed them with zeros). A rank with fewer
        batches takes part with zeros. Returns the roots (None without a batch), the loss and the graph's
        saved bytes. Cost: one forward and one backward, one reduce-scatter per parameter."""
        real = b < len(self.batches)
        watch = real and b == 0
        err, loss, calls, nodes = None, None, None, []
        counter = SavedBytes(self.params)
        build = BuildPass(self.layout, self._full, self._grad, io=self.host_io)
        with contextlib.ExitStack() as stack:
            if real:
                try:
                    stack.enter_context(self.frozen(b))
                    stack.enter_context(counter.hooks())
                    calls = stack.enter_context(fast_double_backward(
                        self.fast_double_backward, self.recompute_attention, self.model))
                    loss = self.loss_on(self.batches[b])
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"the loss on probe batch {b} is {loss.item()} at the current parameters; nothing can "
                            "be measured here (check the learning rate, the data, or probe an earlier step)")
                    nodes = custom_function_nodes([loss]) if watch else []
                except Exception as e:  # noqa: BLE001 - agreed on below, before any collective of the backward
                    err = e
            if err is not None:
                self.reducer.report_failure()
                try:
                    raise err
                finally:
                    err = None  # no cycle of this frame and err's traceback (as above)
            self.reducer.check_others()
            with build:
                if real:
                    try:
                        with CustomBackwardWatch(nodes) as watcher:
                            build.backward(loss * self.weights[b])
                        if watch:
                            watcher.check()
                            self.custom_functions = list(dict.fromkeys(watcher.names))
                            check_broken_nodes(build.roots)
                    except Exception as e:  # noqa: BLE001 - the pass completes its schedule; agreed below
                        err = e
        stats = self.stream_stats
        stats["build_passes"] = stats.get("build_passes", 0) + 1
        stats["build_peak_held_bytes"] = max(stats.get("build_peak_held_bytes", 0), build.peak_held_bytes)
        stats["build_late_gradients"] = stats.get("build_late_gradients", 0) + build.late_gradients
        if err is not None:
            self.reducer.report_failure()
            try:
                raise err
            finally:
                err = None  # a caught exception kept in a local and its traceback would be a cycle with this frame
        self.reducer.check_others()
        if not real:
            return None, None, 0
        if watch:
            self.graph_bytes_per_sample = counter.bytes / max(1, self.batch_sizes[0])
            if self.attention["attention_calls"] is None and self.fast_double_backward and calls is not None:
                self.attention["attention_calls"] = calls.takeable
            stats["build_order"] = build.outputs_seen
        return build.roots, loss.detach(), counter.bytes

    def _rebuild_roots(self, b: int) -> list:
        """Probe batch ``b``'s graph again, as its roots (a graph the plan does not keep, for one HVP): the
        backward's gradients are dropped parameter by parameter as autograd finishes them, with no collective
        (this rank alone rebuilds). Cost: one forward and one backward."""
        with self.frozen(b), fast_double_backward(self.fast_double_backward, self.recompute_attention, self.model):
            loss = self.loss_on(self.batches[b])
            with BuildPass(self.layout, self._full, None) as build:
                build.backward(loss * self.weights[b])
        return build.roots
