"""A probe's cost before it runs (the plan) and its progress while it runs (HVPs, and forward passes where a
metric plans them, done of planned, per metric).

The plan comes from each metric's registered planner (:meth:`geomprobe.metrics.registry.Metric.plan`):
HVPs (exact, or the most an iteration may spend), gradients, and the bytes of the vectors of length ``d``
it holds at once, and the forward passes at other parameters (the views' points). Progress counts HVPs by
wrapping the Landscape's ``hvp`` for the probe's life: a call with a block of ``b`` vectors counts ``b``, as
:attr:`Landscape.hvps` does, so the progress of a metric ends at the ``hvps`` the metric reports; forward
passes the same way, through :meth:`Landscape.note_forwards`, ending at the ``forwards`` a view reports.

:class:`GeometryProbe` takes ``progress=``: ``None`` (default) reports nothing, so a training loop's output
is left alone, as a logging library does unless asked; ``True`` prints one line per probe on stderr once it
ends; a callable receives every :class:`ProgressEvent` (the CLI draws its progress bars from them).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import ConfigurationError
from ..linalg.vectors import matvec_into
from ..metrics import registry
from ..metrics.registry import PlanContext
from .metric_order import planned_sharing
from .shadow import shadow

__all__ = ["ProgressEvent", "LineReporter", "ProbeProgress", "count_hvps", "plan_probe", "planned_text",
           "resolve_progress"]


@dataclass(frozen=True)
class ProgressEvent:
    """One moment of a probe.

    ``kind``: ``"plan"`` before the probe (``plan`` maps each metric to its planned cost), ``"start"`` as a
    metric begins, ``"advance"`` after each HVP call, ``"end"`` as a metric ends (``hvps`` is then its
    total, ``seconds`` its time), ``"done"`` after the probe (``hvps``: every HVP of the probe). ``hvps``
    counts HVPs of the current metric so far; ``planned`` and ``exact`` are the metric's plan (``planned``
    is an upper bound when ``exact`` is False, ``None`` when the metric has no planner). ``forwards`` and
    ``planned_forwards`` are the same for forward passes at other parameters (a view's points times the probe
    batches; ``planned_forwards`` is 0 for a metric that plans none, an upper bound for ``direction``, which
    spends them only once there is a last step); on ``"done"`` ``forwards`` is the probe's total.
    """

    kind: str
    step: int
    metric: str | None = None
    hvps: int = 0
    planned: int | None = None
    exact: bool = True
    plan: Mapping[str, dict] | None = None
    seconds: float | None = None
    forwards: int = 0
    planned_forwards: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def plan_probe(metric_options: Mapping[str, Mapping[str, Any]], space: Any, *, chunk_size: int = 16,
               dtype: torch.dtype = torch.float32, batches: int = 1, seed: int | None = None) -> dict[str, dict]:
    """Each metric's planned cost in the parameter space ``space`` (``dim``, ``blocks``) with parameters of
    ``dtype`` on ``batches`` probe batches: ``hvps``, ``exact``, ``gradients``, ``vector_bytes`` (``vectors * d
    * itemsize``, ``None`` where unknown) and ``forwards`` (forward passes at other parameters); ``cost`` (the
    registered description) for a metric without a planner, whose ``hvps`` and ``forwards`` are then ``None``.

    A part of a metric's work that a metric run before it computes identically (:mod:`.metric_order`; ``seed``
    is the probe's, given to metrics without one) is counted once, with the metric that computes it: the
    receiving metric's ``hvps`` leaves it out and ``shared`` names it (``["raw spectrum from spectrum"]``),
    ``shared_hvps`` its planned HVPs. Costs nothing (no HVPs, no forward passes)."""
    context = PlanContext(space.dim, list(space.blocks), chunk_size, dtype, batches)
    sharing = planned_sharing(metric_options, context, seed)
    itemsize = dtype.itemsize
    out: dict[str, dict] = {}
    for name, options in metric_options.items():
        metric = registry.get(name)
        cost = metric.plan(dict(options), context)
        if cost is None:
            out[name] = {"hvps": None, "exact": False, "gradients": None, "vector_bytes": None, "forwards": None,
                         "cost": metric.cost}
            continue
        received = sharing.get(name, [])
        hvps = cost.hvps - sum(part.hvps for part, _ in received)
        exact = cost.exact and all(part.exact for part, _ in received)  # a part received in part: a bound
        out[name] = {"hvps": hvps, "exact": exact or hvps == 0, "gradients": cost.gradients,
                     "vector_bytes": cost.vectors * space.dim * itemsize if cost.vectors is not None else None,
                     "forwards": cost.forwards}
        if received:
            out[name]["shared"] = [f"{part.what} from {source}" for part, source in received]
            out[name]["shared_hvps"] = {part.what: part.hvps for part, _ in received}
    return out


def planned_text(hvps: int | None, exact: bool) -> str:
    """``"96"`` for an exact plan, ``"<=300"`` for an upper bound, ``"?"`` when unknown."""
    if hvps is None:
        return "?"
    return str(hvps) if exact else f"<={hvps}"


def count_hvps(land: Any, on_hvps: Callable[[int], None]) -> None:
    """From now on, ``land.hvp`` calls ``on_hvps(n)`` after each product of ``n`` vectors.

    The Landscape's method is shadowed by an instance attribute for the Landscape's remaining life (a probe
    builds one per probe); the products themselves are unchanged.
    """
    def wrap(inner: Callable) -> Callable:
        def hvp(v, out=None):  # out passed on: a Krylov kernel's reused buffer (linalg.vectors.matvec_into)
            out = inner(v) if out is None else matvec_into(inner.target(), v, out)
            on_hvps(1 if v.dim() == 1 else int(v.shape[0]))
            return out

        return hvp

    shadow(land, "hvp", wrap)  # no reference back to the Landscape: nothing of it outlives the probe


def _forwards_text(done: int, planned: int | None) -> str:
    return f"{done}/{planned if planned is not None else '?'} forwards"


class LineReporter:
    """One line on ``stream`` (default: stderr) per probe, once it ends: the HVPs of each metric against
    its plan, its forward passes against their plan where it plans any (views), and the probe's seconds."""

    def __init__(self, stream: Any = None):
        self.stream = stream
        self._parts: list[str] = []

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "plan":
            self._parts = []
        elif event.kind == "end":
            part = f"{event.metric} {event.hvps}/{planned_text(event.planned, event.exact)}"
            if event.planned_forwards or event.forwards:
                part += f" HVPs, {_forwards_text(event.forwards, event.planned_forwards)}"
            self._parts.append(part)
        elif event.kind == "done":
            stream = self.stream if self.stream is not None else sys.stderr
            detail = f" ({', '.join(self._parts)})" if self._parts else ""
            fw = f", {event.forwards} forwards" if event.forwards else ""
            print(f"geomprobe: step {event.step}: {event.hvps} HVPs{fw} in {event.seconds:.2f} s{detail}",
                  file=stream, flush=True)


def resolve_progress(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    """The callback for GeometryProbe's ``progress=`` option (see the module docstring)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return LineReporter()
    if callable(progress):
        return progress
    raise ConfigurationError(
        f"progress must be None, True/False or a callable taking a ProgressEvent, got {type(progress).__name__} "
        f"{progress!r}; pass progress=True for one line per probe on stderr"
    )


class ProbeProgress:
    """Sends one probe's events to ``callback``: :meth:`begin`, then :meth:`start` / :meth:`advance` /
    :meth:`end` around each metric, then :meth:`finish`. A callback that raises is warned about and dropped
    for the rest of the probe, which goes on. ``batches``: the probe batches the plan's forward passes were
    planned on (a Landscape that splits them into micro-batches runs more, smaller ones: :meth:`count`)."""

    def __init__(self, callback: ProgressCallback, plan: Mapping[str, dict], step: int, batches: int = 1):
        self._callback, self.plan, self.step = callback, plan, step
        self.t0 = time.perf_counter()
        self.total = 0
        self.total_forwards = 0
        self._name: str | None = None
        self._done = 0
        self._forwards = 0
        self._planned_batches, self._batches = max(1, int(batches)), max(1, int(batches))

    def count(self, land: Any) -> None:
        """Follow ``land``'s HVPs (:func:`count_hvps`) and forward passes at other parameters from now on."""
        count_hvps(land, self.advance)
        self._batches = max(1, len(getattr(land, "batches", ())) or self._planned_batches)
        if getattr(land, "note_forwards", None) is None:
            return

        def wrap(inner: Callable) -> Callable:
            def note_forwards(n: int) -> None:
                inner(n)
                self.advance_forwards(n)

            return note_forwards

        shadow(land, "note_forwards", wrap)

    def callback(self, event: ProgressEvent) -> None:
        # a probe never kills training: a failing progress callback is dropped for the rest of this probe
        if self._callback is None:
            return
        try:
            self._callback(event)
        except Exception as e:
            self._callback = None
            warnings.warn(f"geomprobe: the progress callback failed ({type(e).__name__}: {e}); no more progress "
                          "events this probe", RuntimeWarning, stacklevel=2)

    def begin(self) -> None:
        self.callback(ProgressEvent("plan", self.step, plan=self.plan))

    def _event(self, kind: str, **kw: Any) -> ProgressEvent:
        p = self.plan.get(self._name or "", {})
        planned = p.get("forwards")
        if planned is not None:  # planned per probe batch as given; micro-batches multiply the passes, not the work
            planned = planned * self._batches // self._planned_batches
        return ProgressEvent(kind, self.step, self._name, self._done, p.get("hvps"), bool(p.get("exact", True)),
                             forwards=self._forwards, planned_forwards=planned, **kw)

    def start(self, name: str) -> None:
        self._name, self._done, self._forwards, self._t_metric = name, 0, 0, time.perf_counter()
        self.callback(self._event("start"))

    def advance(self, n: int) -> None:
        self._done += n
        self.total += n
        self.callback(self._event("advance"))

    def advance_forwards(self, n: int) -> None:
        self._forwards += n
        self.total_forwards += n
        self.callback(self._event("advance"))

    def end(self) -> None:
        self.callback(self._event("end", seconds=time.perf_counter() - self._t_metric))
        self._name = None

    def finish(self, hvps: int, seconds: float, forwards: int | None = None) -> None:
        total = self.total_forwards if forwards is None else forwards
        self.callback(ProgressEvent("done", self.step, hvps=hvps, seconds=seconds, forwards=total))
