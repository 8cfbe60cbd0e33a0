"""When to probe: the schedules a GeometryProbe consults at every optimizer step.

A schedule answers ``should_probe(step, now)`` before a step's probe and learns from
``observe(step, probe_seconds, now)``, which the probe calls after every probe it ran. There are two kinds:

* **triggers** name the steps to probe: :func:`every`, :func:`log_spaced`, :func:`at`;
* **limits** veto probes that would cost too much: :func:`budget`.

They combine with ``|`` and ``&``:

* ``a | b`` fires when any *trigger* among its operands fires **and** every *limit* among them allows. So a
  budget in a ``|`` chain is a cap, never an extra reason to probe: ``every(200) | budget(0.05)`` reads
  "every 200 steps, but never over 5 % of wall time", as in DESIGN.md. Nested ``|`` chains are flattened, so
  every budget in a chain caps every trigger in it. A chain of limits only (``budget(0.05)`` alone, or
  ``budget(a) | budget(b)``) fires whenever all of them allow: as often as the budget permits.
* ``a & b`` fires only when every operand fires (a limit "fires" when it allows). ``every(200) & budget(0.05)``
  therefore means the same as ``every(200) | budget(0.05)``; ``every(10) & at(range(0, 100))`` probes every
  10 steps up to step 99. A ``&`` holding at least one trigger is itself a trigger, so
  ``(every(200) & budget(0.05)) | at([5])`` probes at step 5 whatever the budget says.

Every operand is evaluated at every call (no short-circuit), so a budget sees the first step even when no
trigger fires there, and ``observe`` reaches every operand, so a budget counts all probe time, including
probes it did not gate.

After each ``should_probe`` call, ``vetoed_by`` names the limits (by their ``reason``, e.g. ``"overhead
budget 5 %"``) that vetoed a step the triggers selected, and is empty otherwise; the probe counts these
skipped probes in its records so a report can say how many were scheduled and why they did not run.

>>> s = every(10) | budget(0.5, clock=lambda: 0.0)
>>> s.observe(0, 1.0, 0.0); s.should_probe(10, 1.0), s.vetoed_by
(False, ('overhead budget 50 %',))
>>> s.should_probe(11, 1.0), s.vetoed_by                     # not selected by every(10): not a skipped probe
(False, ())

>>> s = every(100) | budget(0.05)
>>> s
every(100) | budget(0.05)
>>> [step for step in range(301) if every(100).should_probe(step)]
[0, 100, 200, 300]
>>> log_spaced(1, 1000, 4).steps
(1, 10, 100, 1000)
"""

from __future__ import annotations

import abc
import math
import numbers
import operator
import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import ConfigurationError

__all__ = [
    "Schedule",
    "Every",
    "LogSpaced",
    "At",
    "Budget",
    "AnyOf",
    "AllOf",
    "every",
    "log_spaced",
    "at",
    "budget",
]


def _as_step(value: object, what: str) -> int:
    """``value`` as a non-negative integer step, or a clear error naming ``what``."""
    # bool is an int subclass, but every(True) is a mistake rather than every(1).
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a non-negative integer, got the bool {value!r}")
    try:
        step = operator.index(value)  # accepts int and numpy integers, refuses 2.5 and "3"
    except TypeError:
        raise ConfigurationError(
            f"{what} must be a non-negative integer, got {value!r} of type {type(value).__name__}"
        ) from None
    if step < 0:
        raise ConfigurationError(f"{what} must be a non-negative integer, got {step}")
    return step


class Schedule(abc.ABC):
    """Decides at which optimizer steps to probe.

    Subclasses implement :meth:`should_probe`; adaptive ones also :meth:`observe`. ``is_limit`` is ``True``
    for schedules that only veto (a budget) and ``False`` for those that name steps; ``|`` treats the two
    kinds differently (see the module docstring).
    """

    is_limit: bool = False
    # The limits that vetoed a step the triggers selected, at the last should_probe call (module docstring).
    vetoed_by: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """How a limit is named when it vetoes a probe (its repr unless it says better)."""
        return repr(self)

    @abc.abstractmethod
    def should_probe(self, step: int, now: float | None = None) -> bool:
        """Whether to probe at ``step``; ``now`` is the current time on the schedule's clock.

        ``now=None`` lets a time-aware schedule read its own clock; schedules that only look at the step
        ignore it.
        """

    def gates(self) -> list["Budget"]:
        """The budgets that let the probe this schedule just fired in (its last :meth:`should_probe` returned
        True): a probe they allowed may be stopped at their allowance (:mod:`.allowance`). None for a trigger."""
        return []

    def observe(self, step: int, probe_seconds: float, now: float | None = None) -> None:
        """Learn from a probe that ran at ``step`` and took ``probe_seconds``; ``now`` is when it ended.

        The default does nothing: only adaptive schedules learn.
        """

    def __or__(self, other: object) -> Schedule:
        if not isinstance(other, Schedule):
            return NotImplemented
        return AnyOf(self, other)

    def __and__(self, other: object) -> Schedule:
        if not isinstance(other, Schedule):
            return NotImplemented
        return AllOf(self, other)


class Every(Schedule):
    """Fires at ``start, start + n, start + 2n, ...``."""

    def __init__(self, n: int, start: int = 0) -> None:
        n = _as_step(n, "every(n): n")
        if n == 0:
            raise ConfigurationError("every(n): n must be a positive number of steps, got 0; use every(1) "
                                     "to probe at every step")
        self.n = n
        self.start = _as_step(start, "every(n, start): start")

    def should_probe(self, step: int, now: float | None = None) -> bool:
        step = operator.index(step)
        return step >= self.start and (step - self.start) % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n})" if self.start == 0 else f"every({self.n}, start={self.start})"


class _StepSet(Schedule):
    """Fires exactly at the steps in ``self.steps`` (a sorted tuple of distinct non-negative ints)."""

    steps: tuple[int, ...]

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = tuple(sorted(set(steps)))
        self._set = frozenset(self.steps)  # O(1) membership: should_probe runs at every step

    def should_probe(self, step: int, now: float | None = None) -> bool:
        return operator.index(step) in self._set


class At(_StepSet):
    """Fires at the given steps only (duplicates ignored, order irrelevant)."""

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise ConfigurationError(f"at(steps): steps must be an iterable of integer steps, got {steps!r}")
        checked = [_as_step(s, f"at(steps): step #{i}") for i, s in enumerate(steps)]
        if not checked:
            raise ConfigurationError("at(steps): steps is empty, so the schedule would never probe; "
                                     "give at least one step, e.g. at([0, 100])")
        super().__init__(checked)

    def __repr__(self) -> str:
        return f"at({list(self.steps)!r})"


class LogSpaced(_StepSet):
    """Fires at ``count`` distinct integer steps from ``start`` to ``end`` (both included), log-spaced.

    Steps are ``geomspace(start, end, count)`` rounded, or ``geomspace(1, end + 1, count) - 1`` when
    ``start`` is 0 (log 0 is undefined). Where rounding would repeat a step (the dense low end), the step is
    moved up to the next free integer, and never so far that the remaining steps no longer fit before
    ``end``; so there are always exactly ``count`` distinct steps.
    """

    def __init__(self, start: int, end: int, count: int) -> None:
        start = _as_step(start, "log_spaced(start, end, count): start")
        end = _as_step(end, "log_spaced(start, end, count): end")
        count = _as_step(count, "log_spaced(start, end, count): count")
        if end < start:
            raise ConfigurationError(f"log_spaced(start, end, count): end ({end}) is before start ({start}); "
                                     f"swap them: log_spaced({end}, {start}, {count})")
        available = end - start + 1
        if count == 0:
            raise ConfigurationError("log_spaced(start, end, count): count must be at least 1, got 0")
        if count > available:
            raise ConfigurationError(
                f"log_spaced({start}, {end}, {count}) asks for {count} distinct steps, but only {available} "
                f"integer steps lie in [{start}, {end}]; lower count or widen the range"
            )
        if count == 1 and end != start:
            raise ConfigurationError(
                f"log_spaced({start}, {end}, 1): one step cannot include both start and end; use count >= 2 "
                f"or at([{start}])"
            )
        self.start, self.end, self.count = start, end, count
        super().__init__(self._spaced(start, end, count))

    @staticmethod
    def _spaced(start: int, end: int, count: int) -> list[int]:
        if count == 1:
            return [start]
        offset = 1 if start == 0 else 0
        raw = np.rint(np.geomspace(start + offset, end + offset, count)) - offset
        steps: list[int] = []
        previous = start - 1
        for i, r in enumerate(raw):
            # At least one past the previous step (distinct), at most leaving room for the steps still to come.
            s = min(max(int(r), previous + 1), end - (count - 1 - i))
            steps.append(s)
            previous = s
        return steps

    def __repr__(self) -> str:
        return f"log_spaced({self.start}, {self.end}, {self.count})"


class Budget(Schedule):
    """A limit: allows a probe only while cumulative probe time stays under ``fraction`` of wall time.

    Wall time runs from the first :meth:`should_probe` call (``t0``). With ``spent`` the probe seconds
    reported through :meth:`observe` and ``c`` the expected cost of the next probe, a probe is allowed at
    time ``t`` when::

        spent + c <= fraction * (t - t0 + c)

    i.e. when it would still be within budget once it has finished. Once a probe has been observed, ``c`` is
    the larger of the last probe's duration and an exponential average of all of them (weight 1/2 on the
    newest), so a probe that got slower is trusted at once and one that got faster only gradually. Before
    that, ``c`` is ``predict()``: a :class:`~geomprobe.GeometryProbe` gives each of its budgets its prediction
    from the probe's plan and the measured seconds of a training step (:mod:`.probe_cost`), so the first
    probe is deferred until it fits too; while ``predict()`` returns ``None`` (no training step timed yet)
    every probe is deferred. A budget without ``predict`` has nothing to go by and allows the first probe
    (``c`` = 0). With ``c`` covering what a probe costs, ``spent <= fraction * (t - t0)`` holds after every
    probe; a probe that overran is paid back by waiting. Used alone, a budget fires whenever it allows: it
    probes as often as the fraction permits.

    After each :meth:`should_probe`, ``last_cost`` is the ``c`` it used (``None`` when unknown) and
    ``cost_from`` says where it came from (``"measured"``, ``"predicted"``, ``"no training step timed
    yet"`` or ``"unknown"``), which the probe records with a skip (:mod:`.skips`). A ``predict`` that fails
    or returns no number of seconds defers probes, with one warning, until a probe has been measured.

    ``clock`` is read when ``now`` is not passed (seconds, monotonic); tests inject a controlled clock.
    The probe must call :meth:`observe` after each probe, or the budget never learns what probes cost.
    """

    is_limit = True

    def __init__(self, fraction: float, clock: Callable[[], float] = time.perf_counter,
                 predict: Callable[[], float | None] | None = None) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise ConfigurationError(
                f"budget(fraction): fraction must be a number in (0, 1), got {fraction!r}; "
                "e.g. budget(0.05) for 5 % of wall time"
            )
        fraction = float(fraction)
        if not 0.0 < fraction < 1.0:  # also refuses NaN
            raise ConfigurationError(
                f"budget(fraction): fraction must lie strictly between 0 and 1, got {fraction!r}; "
                "it is a share of wall time, e.g. budget(0.05) for 5 %"
            )
        if not callable(clock):
            raise ConfigurationError(f"budget(fraction, clock): clock must be callable, got {clock!r}")
        if predict is not None and not callable(predict):
            raise ConfigurationError(f"budget(fraction, predict=): predict must be callable or None, got {predict!r}")
        self.fraction = fraction
        self.predict = predict
        self.last_cost: float | None = None
        self.cost_from = "unknown"
        self._warned = False
        self.clock = clock
        self.spent = 0.0  # seconds of probing observed so far
        self.probes = 0  # probes observed so far
        self._t0: float | None = None
        self._last: float | None = None
        self._average: float | None = None
        self._floor = 0.0  # after a probe stopped at its allowance: the cost it is known to exceed

    def _time(self, now: float | None) -> float:
        return float(self.clock() if now is None else now)

    @property
    def expected_cost(self) -> float:
        """Seconds the next probe is expected to take, from the probes observed (0 before any)."""
        if self._last is None or self._average is None:
            return 0.0
        return max(self._last, self._average, self._floor)

    def allowance(self, now: float | None = None) -> float:
        """The most seconds a probe starting at ``now`` may take and still end within the budget: the largest
        ``c`` with ``spent + c <= fraction * (t - t0 + c)``. A probe allowed by :meth:`should_probe` whose cost
        was mispredicted can be stopped when it reaches this (:mod:`.allowance`), so the rule holds at all
        times, not only on average."""
        t = self._time(now)
        t0 = t if self._t0 is None else self._t0
        return max(0.0, (self.fraction * (t - t0) - self.spent) / (1.0 - self.fraction))

    def note_cut(self, seconds: float) -> None:
        """The probe just observed was stopped at its allowance after ``seconds``, unfinished: the next one is
        expected to cost at least twice that, and twice what the last cut one was expected to (a probe cut
        before its first HVP spends the same seconds every time, so the expectation must grow on its own,
        or the budget would retry and cut it forever)."""
        self._floor = max(2.0 * float(seconds), 2.0 * self._floor)

    def note_whole(self) -> None:
        """The probe just observed ran to its end within its allowance: its seconds say what a probe costs."""
        self._floor = 0.0

    def _cost(self) -> tuple[float | None, str]:
        """``c`` of the rule and where it came from (class docstring)."""
        if self._last is not None:
            return self.expected_cost, "measured"
        if self.predict is None:
            return 0.0, "unknown"
        try:
            predicted = self.predict()
        except Exception as e:  # user code asked from the optimizer hook: defer, never stop training
            predicted = f"{type(e).__name__}: {e}"
        if predicted is None:
            return None, "no training step timed yet"
        try:
            seconds = float(predicted)
        except (TypeError, ValueError):
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            # asked from the optimizer hook: a bad prediction defers the probe, it never stops training
            if not self._warned:
                self._warned = True
                warnings.warn(f"geomprobe: budget's predict() must return seconds >= 0 or None, got {predicted!r}; "
                              "the budget defers probes until one has been measured", RuntimeWarning, stacklevel=4)
            return None, f"predict() returned {predicted!r}"
        return seconds, "predicted"

    @property
    def reason(self) -> str:
        return f"overhead budget {100 * self.fraction:g} %"

    def elapsed(self, now: float | None = None) -> float:
        """Wall seconds since the first call (0 before it)."""
        return 0.0 if self._t0 is None else self._time(now) - self._t0

    def should_probe(self, step: int, now: float | None = None) -> bool:
        t = self._time(now)
        if self._t0 is None:
            self._t0 = t
        cost, self.cost_from = self._cost()
        self.last_cost = cost
        if cost is None:  # nothing to predict from yet: defer rather than guess
            return False
        return self.spent + cost <= self.fraction * (t - self._t0 + cost)

    def gates(self) -> list["Budget"]:
        return [self]

    def observe(self, step: int, probe_seconds: float, now: float | None = None, one_time: float = 0.0) -> None:
        """As :meth:`Schedule.observe`; ``one_time``: seconds of the probe that will not recur (kernels compiled on
        their first call, :func:`~geomprobe.engine.autodiff.normdouble.compile_seconds`). They count as spent,
        but not in what the next probe is expected to cost."""
        seconds = float(probe_seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigurationError(f"budget.observe: probe_seconds must be finite and >= 0, got {probe_seconds!r}")
        if self._t0 is None:
            # A probe ran before the budget was ever consulted: wall time began when that probe did.
            self._t0 = self._time(now) - seconds
        self.spent += seconds
        self.probes += 1
        cost = seconds - min(seconds, max(0.0, float(one_time)))
        self._last = cost
        self._average = cost if self._average is None else 0.5 * (self._average + cost)

    def __repr__(self) -> str:
        return f"budget({self.fraction!r})"


def observe(schedule: Schedule, step: int, probe_seconds: float, now: float | None, one_time: float = 0.0) -> None:
    """``schedule.observe`` with the probe's one-time seconds where the schedule takes them (budgets and their
    combinations); a user's own Schedule keeps its three-argument ``observe``."""
    if isinstance(schedule, (Budget, _Combined)):
        schedule.observe(step, probe_seconds, now, one_time=one_time)
    else:
        schedule.observe(step, probe_seconds, now)


class _Combined(Schedule):
    """Shared machinery of ``|`` and ``&``: flattening, evaluating every operand, forwarding observe."""

    _symbol = "?"

    def __init__(self, *parts: Schedule) -> None:
        flat: list[Schedule] = []
        for part in parts:
            if not isinstance(part, Schedule):
                raise ConfigurationError(f"can only combine schedules, got {part!r}")
            # (a | b) | c is a | b | c; the same for &. Keeps the budget-caps-all rule of | simple to state.
            flat.extend(part.parts if type(part) is type(self) else (part,))
        self.parts: tuple[Schedule, ...] = tuple(flat)

    def _votes(self, step: int, now: float | None) -> list[bool]:
        # A list, not a generator under any()/all(): every operand must see every step (a budget records t0).
        self._last_votes = [part.should_probe(step, now) for part in self.parts]
        return self._last_votes

    def _vetoes(self, votes: list[bool], triggered: bool) -> tuple[str, ...]:
        """The reasons of the limits that said no, when the triggers selected the step; else ()."""
        if not triggered:
            return ()
        return tuple(dict.fromkeys(p.reason for p, v in zip(self.parts, votes) if p.is_limit and not v))

    def observe(self, step: int, probe_seconds: float, now: float | None = None, one_time: float = 0.0) -> None:
        for part in self.parts:
            observe(part, step, probe_seconds, now, one_time)

    def __repr__(self) -> str:
        def show(part: Schedule) -> str:
            return f"({part!r})" if isinstance(part, _Combined) else repr(part)

        return f" {self._symbol} ".join(show(p) for p in self.parts)


class AnyOf(_Combined):
    """``a | b | ...``: fires when any trigger fires and every limit allows (see the module docstring)."""

    _symbol = "|"

    @property
    def is_limit(self) -> bool:  # type: ignore[override]
        return all(part.is_limit for part in self.parts)

    def should_probe(self, step: int, now: float | None = None) -> bool:
        votes = self._votes(step, now)
        triggers = [v for part, v in zip(self.parts, votes) if not part.is_limit]
        limits = [v for part, v in zip(self.parts, votes) if part.is_limit]
        fired = any(triggers) if triggers else True  # limits only: fire whenever they allow
        if triggers and fired:
            self.vetoed_by = self._vetoes(votes, True)
        else:  # no trigger fired, but one vetoed inside (a nested ``&`` with a budget) would have
            self.vetoed_by = tuple(dict.fromkeys(r for part in self.parts if not part.is_limit for r in part.vetoed_by))
        return fired and all(limits)

    def gates(self) -> list["Budget"]:
        # every limit caps every trigger; a trigger that fired without a budget of its own (``at([0]) |
        # (every(25) & budget(f))`` at step 0) asked for the probe outside any budget
        votes = getattr(self, "_last_votes", [False] * len(self.parts))
        out = [b for p in self.parts if p.is_limit for b in p.gates()]
        fired = [p.gates() for p, v in zip(self.parts, votes) if v and not p.is_limit]
        if fired and all(fired):
            out += [b for g in fired for b in g]
        return list(dict.fromkeys(out))


class AllOf(_Combined):
    """``a & b & ...``: fires only when every operand fires (a limit fires when it allows)."""

    _symbol = "&"

    @property
    def is_limit(self) -> bool:  # type: ignore[override]
        return all(part.is_limit for part in self.parts)

    def should_probe(self, step: int, now: float | None = None) -> bool:
        votes = self._votes(step, now)
        triggers = [(p, v) for p, v in zip(self.parts, votes) if not p.is_limit]
        # selected when every trigger fired or would have but for a limit of its own
        selected = bool(triggers) and all(v or p.vetoed_by for p, v in triggers)
        inner = tuple(r for p, v in triggers if not v for r in p.vetoed_by)
        self.vetoed_by = tuple(dict.fromkeys(inner + self._vetoes(votes, selected))) if selected else ()
        return all(votes)

    def gates(self) -> list["Budget"]:
        return list(dict.fromkeys(b for p in self.parts for b in p.gates()))


class Manual(Schedule):
    """Never fires by itself: the caller decides, calling ``GeometryProbe.probe(step)``. ``description`` says
    how it decides, for the run's metadata and reports."""

    def __init__(self, description: str = "") -> None:
        self.description = str(description)

    def should_probe(self, step: int, now: float | None = None) -> bool:
        return False

    def __repr__(self) -> str:
        return f"manual({self.description!r})" if self.description else "manual()"


def manual(description: str = "") -> Manual:
    """A schedule for code that calls ``probe.probe(step)`` itself (``description`` says when, for reports).

    >>> s = manual("at 6 backprop counts")
    >>> s.should_probe(0), s
    (False, manual('at 6 backprop counts'))
    """
    return Manual(description)


def every(n: int, start: int = 0) -> Every:
    """Probe at ``start, start + n, start + 2n, ...``; ``n`` must be positive.

    >>> [s for s in range(10) if every(3, start=1).should_probe(s)]
    [1, 4, 7]
    """
    return Every(n, start)


def log_spaced(start: int, end: int, count: int) -> LogSpaced:
    """Probe at ``count`` distinct log-spaced integer steps from ``start`` to ``end``, both included.

    >>> log_spaced(0, 999, 4).steps
    (0, 9, 99, 999)
    """
    return LogSpaced(start, end, count)


def at(steps: Iterable[int]) -> At:
    """Probe at exactly these steps.

    >>> at([30, 10, 10]).steps
    (10, 30)
    """
    return At(steps)


def budget(fraction: float, clock: Callable[[], float] = time.perf_counter,
           predict: Callable[[], float | None] | None = None) -> Budget:
    """Probe only while probe time stays under ``fraction`` of wall time (a limit; see :class:`Budget`).
    ``predict``: the seconds of a probe before one has been observed (a GeometryProbe sets its own).

    >>> t = [0.0]
    >>> b = budget(0.1, clock=lambda: t[0], predict=lambda: 1.0)
    >>> b.should_probe(0)          # a probe predicted at 1 s does not fit in 0 s of training
    False
    >>> t[0] = 9.0
    >>> b.should_probe(1)          # 0 + 1 <= 0.1 * (9 + 1): it fits
    True
    >>> t[0] = 10.0; b.observe(1, 1.0)     # it took 1 s: from now on measured costs decide
    >>> t[0] = 11.0
    >>> b.should_probe(2)          # 1 + 1 > 0.1 * (11 + 1)
    False
    >>> t[0] = 19.0
    >>> b.should_probe(3)          # 1 + 1 <= 0.1 * (19 + 1)
    True
    """
    return Budget(fraction, clock, predict)
