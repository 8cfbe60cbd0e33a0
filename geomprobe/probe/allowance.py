"""A budgeted probe stops when it reaches its allowance, so that ``budget(f)`` holds at all times.

A budget allows a probe when its *expected* cost fits (:class:`~.schedule.Budget`): before any probe, a prediction
from the plan (:mod:`.probe_cost`); after, the measured seconds. Either can be wrong: the first probe under a memory
plan that rebuilds graphs cost 8x the kept-graph HVPs its prediction assumed (GPT-2 124M, benchmarks/RESULTS.md §6).
So a probe the schedule fired carries a deadline, the smallest :meth:`~.schedule.Budget.allowance` of the budgets
that let it in: checked before every metric and around every HVP (a product that would end past it, at the last
product's cost or, for the first, the build's, is not started); past it, the metric in progress stops (its HVPs
raise :class:`OverAllowance`) and the metrics not yet run are skipped, each recorded under ``skipped`` with why.
The budget then sees the seconds spent and expects at least twice that next time, doubling again at every
consecutive cut (:meth:`~.schedule.Budget.note_cut`). Seconds spent compiling kernels on their first call
(:func:`~geomprobe.engine.autodiff.normdouble.compile_seconds`; 13 s of GPT-2 124M's first HVP on an H200) count
as spent but not as what probes cost: neither the next product's estimate nor the budget's expectation
includes them, or a first probe cut by a one-time compile would defer every later one for twice its length.

Not under a process group: a probe is collective there, and stopping one rank mid-HVP would leave the others
waiting; rank 0's schedule decides whether a probe starts, and a probe that starts finishes. Explicit
:meth:`GeometryProbe.probe` calls and the final probe at ``close()`` carry no deadline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Callable, Iterator

from ..engine.autodiff.normdouble import compile_seconds
from ..linalg.vectors import matvec_into
from .schedule import Budget, Schedule, observe
from .shadow import shadow

__all__ = ["Deadline", "OverAllowance", "budgeted", "deadline_for", "note_cut", "settle", "watch"]


class OverAllowance(RuntimeError):
    """A budgeted probe reached its allowance (module docstring)."""


class Deadline:
    """The clock time after which a probe stops (``at``), and whether it did (``cut``)."""

    def __init__(self, at: float, allowance: float, clock: Callable[[], float], budgets: Sequence[Budget] = ()):
        self.at, self.allowance, self.clock = at, allowance, clock
        self.compiled_at_start = compile_seconds()
        self.budgets = tuple(budgets)  # the budgets that let the probe in: told how it ended (note_cut)
        self.cut = False
        self.per_vector: float | None = None  # seconds of one HVP vector, from the last product (or the build)

    def passed(self) -> bool:
        if not self.cut and self.clock() > self.at:
            self.cut = True
        return self.cut

    def reason(self) -> str:
        return f"stopped at the overhead budget's allowance of {self.allowance:.3g} s for this probe"

    def skips(self, name: str, skipped: dict) -> bool:
        """Whether metric ``name`` is skipped because the deadline has passed (recorded in ``skipped``)."""
        if self.passed():
            skipped[name] = self.reason()
        return self.cut

    def check(self) -> None:
        """Raise :class:`OverAllowance` once the deadline has passed."""
        if self.passed():
            raise OverAllowance(self.reason())

    def watch(self, land: Any) -> None:
        """Check around every HVP of ``land`` (its method shadowed for the Landscape's life, as progress does):
        a product that would end past the deadline is not started. Its cost is the last product's per vector,
        and before the first one the seconds since the probe began (the Landscape's build: a forward and a
        gradient with its graph, which an HVP costs about as much as, more when the memory plan rebuilds
        graphs)."""
        self.per_vector = max(0.0, self.clock() - (self.at - self.allowance))

        def wrap(inner: Callable) -> Callable:
            def hvp(v, out=None):
                vectors = 1 if v.dim() == 1 else int(v.shape[0])
                start, compiled = self.clock(), compile_seconds()
                if not self.cut and start + self.per_vector * vectors > self.at:
                    self.cut = True
                self.check()
                out = inner(v) if out is None else matvec_into(inner.target(), v, out)
                # a product that compiled kernels on their first call costs that once: the next one will not
                once = compile_seconds() - compiled
                self.per_vector = max(0.0, self.clock() - start - once) / max(1, vectors)
                self.check()
                return out

            return hvp

        shadow(land, "hvp", wrap)  # no reference back to the Landscape (shadow.py)


def deadline_for(schedule: Schedule, now: float, clock: Callable[[], float], distributed: bool) -> Deadline | None:
    """The deadline of a probe the schedule just fired at ``now``: ``now`` plus the smallest allowance of the
    budgets that let it in (:meth:`~.schedule.Schedule.gates`: not those of a trigger that fired outside any
    budget, as ``at([0])`` in ``at([0]) | (every(25) & budget(f))``); None when no budget gated it or under a
    process group (module docstring)."""
    if distributed:
        return None
    gates = schedule.gates()
    if not gates:
        return None
    allowance = min(b.allowance(now) for b in gates)
    return Deadline(now + allowance, allowance, clock, gates) if math.isfinite(allowance) else None


def note_cut(deadline: Deadline | None, seconds: float) -> None:
    """Tell the budgets that let the probe in whether it stopped unfinished after ``seconds``
    (:meth:`~.schedule.Budget.note_cut`) or ran to its end (:meth:`~.schedule.Budget.note_whole`)."""
    if deadline is None:
        return
    for b in deadline.budgets:
        if deadline.cut:
            b.note_cut(seconds)
        else:
            b.note_whole()


def watch(deadline: Deadline | None, land: Any) -> Deadline | None:
    """:meth:`Deadline.watch` ``land`` when there is a deadline; returns it."""
    if deadline is not None:
        deadline.watch(land)
    return deadline


@contextlib.contextmanager
def budgeted(probe: Any, now: float) -> Iterator[None]:
    """Inside, ``probe`` (a GeometryProbe whose schedule just fired at ``now``) carries its deadline."""
    probe._deadline = deadline_for(probe.schedule, now, probe.clock, probe._reducer.world_size > 1)
    try:
        yield
    finally:
        probe._deadline = None


def settle(probe: Any, record: dict, step: int, seconds: float, compiled_before: float) -> None:
    """The schedule observes the probe (``seconds`` in all, of which the kernels compiled since
    ``compiled_before``, :func:`compile_seconds`, are one-time: recorded as ``one_time_seconds`` and left out
    of what the budgets expect next); its allowance and whether it was cut go into the record's cost, and a
    cut probe raises the budgets' expected cost (:func:`note_cut`) by its recurring seconds."""
    one_time = min(seconds, max(0.0, compile_seconds() - compiled_before))
    if one_time > 0:
        record["cost"]["one_time_seconds"] = one_time
    observe(probe.schedule, step, seconds, probe.clock(), one_time)
    d = probe._deadline
    if d is not None:
        record["cost"].update(allowance_seconds=d.allowance, cut=d.cut)
        note_cut(d, seconds - one_time)
