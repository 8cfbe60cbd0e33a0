"""Probes the schedule selected but a limit vetoed: counted, with the reason, for every record of the run.

A report that says "probes 1" after ``every(200) | budget(0.05)`` selected 11 steps hides that ten probes
were skipped to stay within the overhead budget. :class:`SkipCounter` keeps, for one probe's lifetime, how
many steps the schedule's triggers selected, how many of them a limit vetoed, and which limit; each record
carries a copy under ``schedule`` (cumulative, so the last record of a run holds the totals), and, once a
probe was skipped, ``last_skip``: its step, the limits that vetoed it and, for a budget, the seconds it
expected the probe to take and where that came from (``"predicted"`` from the probe's plan before any probe
was measured, ``"measured"`` after, ``"no training step timed yet"``; :class:`~.schedule.Budget`).

>>> from geomprobe.probe.schedule import at, budget
>>> s, c = at([0, 5, 9]) | budget(0.5, clock=lambda: 0.0), SkipCounter()
>>> s.observe(0, 1.0, 0.0)
>>> for step in range(10):
...     c.note(s, s.should_probe(step, 1.0), step)
>>> c.to_dict()  # doctest: +NORMALIZE_WHITESPACE
{'scheduled': 3, 'skipped': 3, 'skipped_by': {'overhead budget 50 %': 3},
 'last_skip': {'step': 9, 'by': ['overhead budget 50 %'], 'expected_seconds': 1.0, 'cost_from': 'measured'}}
"""

from __future__ import annotations

from typing import Any

from .schedule import AllOf, AnyOf, Budget, Every, Schedule

__all__ = ["SkipCounter", "budgets", "open_ended"]


def budgets(schedule: Schedule) -> list[Budget]:
    """Every :class:`~.schedule.Budget` in ``schedule``, nested ``|`` and ``&`` included.

    >>> from geomprobe.probe.schedule import at, budget, every
    >>> budgets((every(2) & budget(0.1)) | at([5]) | budget(0.05))
    [budget(0.1), budget(0.05)]
    """
    if isinstance(schedule, Budget):
        return [schedule]
    if isinstance(schedule, (AnyOf, AllOf)):
        return [b for part in schedule.parts for b in budgets(part)]
    return []


def open_ended(schedule: Schedule) -> bool:
    """Whether the end of training falls anywhere between two of the schedule's probes (``every``, a
    budget), so that the last steps may go unmeasured; explicit step lists (``at``, ``log_spaced``) name
    the steps the user wants and are not.

    >>> from geomprobe.probe.schedule import at, budget, every
    >>> open_ended(every(200) | budget(0.05)), open_ended(at([0, 7]) | budget(0.05)), open_ended(budget(0.1))
    (True, False, True)
    """
    if isinstance(schedule, (Every, Budget)):
        return True
    if not isinstance(schedule, (AnyOf, AllOf)):
        return False
    # a limit in a chain only vetoes; a chain of limits alone fires whenever they allow, like a budget
    return schedule.is_limit or any(open_ended(p) for p in schedule.parts if not p.is_limit)


class SkipCounter:
    """Counts the steps a schedule selected (``scheduled``) and those a limit vetoed (``skipped``, by reason)."""

    def __init__(self) -> None:
        self.scheduled = 0
        self.skipped = 0
        self.skipped_by: dict[str, int] = {}
        self.last_skip: dict[str, Any] | None = None

    def note(self, schedule: Schedule, fired: bool, step: int | None = None) -> None:
        """Count one ``should_probe`` answer (``fired``) of ``schedule`` at ``step``, read with its
        ``vetoed_by`` and, for a skip, what its vetoing budgets expected the probe to cost."""
        if fired:
            self.scheduled += 1
            return
        reasons = tuple(getattr(schedule, "vetoed_by", ()) or ())
        if reasons:
            self.scheduled += 1
            self.skipped += 1
            for reason in reasons:
                self.skipped_by[reason] = self.skipped_by.get(reason, 0) + 1
            self.last_skip = {"step": step, "by": list(reasons)}
            vetoing = [b for b in budgets(schedule) if b.reason in reasons]
            if vetoing:  # the tightest budget's view of the probe it deferred
                b = min(vetoing, key=lambda b: b.fraction)
                self.last_skip.update(expected_seconds=b.last_cost, cost_from=b.cost_from)

    def to_dict(self) -> dict[str, Any]:
        """The counts so far and the last skip, JSON-ready."""
        out: dict[str, Any] = {"scheduled": self.scheduled, "skipped": self.skipped, "skipped_by": dict(self.skipped_by)}
        if self.last_skip is not None:
            out["last_skip"] = dict(self.last_skip)
        return out
