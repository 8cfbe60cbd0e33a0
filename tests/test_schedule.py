"""Schedules fire at exactly the right steps; a budget keeps probe time under its fraction on a controlled clock."""

from __future__ import annotations

import numpy as np
import pytest

from geomprobe.errors import ConfigurationError
from geomprobe.probe.schedule import AllOf, AnyOf, Budget, Schedule, at, budget, every, log_spaced


def fired(schedule: Schedule, steps: int) -> list[int]:
    return [s for s in range(steps) if schedule.should_probe(s)]


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(schedule: Schedule, clock: FakeClock, steps: int, step_seconds: float, probe_seconds: float):
    """A training loop on ``clock``: each step costs ``step_seconds``, each probe ``probe_seconds``.

    Returns the probed steps and, after each probe, (probe time so far, wall time so far).
    """
    probed, history = [], []
    spent = 0.0
    for step in range(steps):
        clock.t += step_seconds  # the optimizer step; the probe hook runs after it
        if schedule.should_probe(step, clock()):
            clock.t += probe_seconds
            spent += probe_seconds
            schedule.observe(step, probe_seconds, clock())
            probed.append(step)
            history.append((spent, clock.t))
    return probed, history, spent


# ------------------------------------------------------------------------------------------------ triggers


def test_every_fires_at_multiples_from_start():
    assert fired(every(5), 23) == [0, 5, 10, 15, 20]
    assert fired(every(5, start=3), 23) == [3, 8, 13, 18]
    assert fired(every(1), 4) == [0, 1, 2, 3]
    assert every(np.int64(4)).should_probe(8)


def test_at_fires_only_at_given_steps():
    schedule = at([7, 0, 7, 19])
    assert schedule.steps == (0, 7, 19)
    assert fired(schedule, 30) == [0, 7, 19]
    assert fired(at(range(3, 6)), 10) == [3, 4, 5]


@pytest.mark.parametrize(
    ("start", "end", "count", "expected"),
    [
        (1, 1000, 4, [1, 10, 100, 1000]),
        (0, 999, 4, [0, 9, 99, 999]),
        (0, 10, 11, list(range(11))),  # every step in the range
        (5, 5, 1, [5]),
        (10, 20, 2, [10, 20]),
    ],
)
def test_log_spaced_exact_steps(start, end, count, expected):
    schedule = log_spaced(start, end, count)
    assert list(schedule.steps) == expected
    assert fired(schedule, end + 5) == expected


def test_log_spaced_dense_low_end_is_unique_and_complete():
    steps = log_spaced(0, 100, 40).steps
    assert len(steps) == 40 and len(set(steps)) == 40
    assert steps[0] == 0 and steps[-1] == 100
    assert list(steps) == sorted(steps)
    # Log spacing: the gaps never shrink (up to rounding) as steps grow.
    gaps = np.diff(steps)
    assert np.all(np.diff(gaps) >= -1)
    # On a wide range the ratios of successive steps are close to constant.
    wide = np.array(log_spaced(1, 10**6, 7).steps, dtype=float)
    assert np.allclose(wide[1:] / wide[:-1], 10.0, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: every(0), r"every\(n\): n must be a positive"),
        (lambda: every(-3), r"every\(n\): n must be a non-negative integer, got -3"),
        (lambda: every(2.5), r"every\(n\): n must be a non-negative integer, got 2\.5"),
        (lambda: every(True), r"got the bool True"),
        (lambda: every(5, start=-1), r"start must be a non-negative integer, got -1"),
        (lambda: log_spaced(100, 10, 5), r"end \(10\) is before start \(100\)"),
        (lambda: log_spaced(0, 5, 10), r"asks for 10 distinct steps, but only 6 integer steps"),
        (lambda: log_spaced(0, 5, 0), r"count must be at least 1"),
        (lambda: log_spaced(0, 5, 1), r"one step cannot include both start and end"),
        (lambda: at([]), r"steps is empty"),
        (lambda: at([3, -1]), r"at\(steps\): step #1 must be a non-negative integer, got -1"),
        (lambda: at(5), r"steps must be an iterable"),
        (lambda: at([1.5]), r"got 1\.5 of type float"),
        (lambda: budget(0.0), r"fraction must lie strictly between 0 and 1, got 0\.0"),
        (lambda: budget(1.0), r"fraction must lie strictly between 0 and 1, got 1\.0"),
        (lambda: budget(-0.1), r"strictly between 0 and 1"),
        (lambda: budget(float("nan")), r"strictly between 0 and 1, got nan"),
        (lambda: budget("5%"), r"fraction must be a number in \(0, 1\)"),
        (lambda: budget(0.05, clock=3.0), r"clock must be callable"),
        (lambda: AnyOf(every(2), 3), r"can only combine schedules"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()


def test_observe_rejects_negative_seconds():
    with pytest.raises(ConfigurationError, match=r"probe_seconds must be finite and >= 0"):
        budget(0.1).observe(0, -1.0)


def test_combining_with_a_non_schedule_is_a_type_error():
    with pytest.raises(TypeError):
        every(2) | 3  # noqa: B018


# ------------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize(("step_seconds", "probe_seconds"), [(0.125, 2.0), (0.0078125, 0.5), (1.0, 0.25)])
def test_budget_keeps_probe_time_under_fraction_and_still_probes(step_seconds, probe_seconds):
    clock = FakeClock()
    schedule = budget(0.05, clock=clock)
    steps = 20_000
    probed, history, spent = simulate(schedule, clock, steps, step_seconds, probe_seconds)
    total = clock.t
    assert spent <= 0.05 * total
    # From the second probe on, the budget holds at all times: this budget has no prediction, so its first probe
    # is unpriced (a GeometryProbe gives its budgets one: tests/test_budget_first_probe.py).
    # The times are binary fractions, so the sums are exact and the comparison needs no tolerance.
    for spent_so_far, wall in history[1:]:
        assert spent_so_far <= 0.05 * wall
    # And it does not starve: it uses most of what it is allowed (at least 80 % of the 5 %).
    assert spent >= 0.8 * 0.05 * total
    assert len(probed) >= 10


def test_budget_reads_its_clock_when_now_is_not_given():
    clock = FakeClock()
    schedule = budget(0.5, clock=clock)
    assert schedule.should_probe(0)  # first call: t0 = 0, cost unknown
    clock.t = 1.0
    schedule.observe(0, 1.0)
    assert not schedule.should_probe(1)  # 1 + 1 > 0.5 * (1 + 1)
    clock.t = 3.0
    assert schedule.should_probe(2)  # 1 + 1 <= 0.5 * (3 + 1)
    assert schedule.spent == 1.0 and schedule.probes == 1


def test_budget_trusts_a_slower_probe_at_once():
    schedule = budget(0.1)
    schedule.should_probe(0, now=0.0)
    schedule.observe(0, 1.0, now=1.0)
    schedule.observe(1, 4.0, now=10.0)
    assert schedule.expected_cost == 4.0
    schedule.observe(2, 1.0, now=20.0)
    assert schedule.expected_cost == 1.75  # the average (2.5 + 1) / 2 beats the last probe (1.0)


# ------------------------------------------------------------------------------------------------ combinations


def test_or_of_triggers_is_the_union():
    assert fired(every(10) | at([3, 15]), 31) == [0, 3, 10, 15, 20, 30]
    assert fired(every(4) | every(6), 13) == [0, 4, 6, 8, 12]


def test_and_of_triggers_is_the_intersection():
    assert fired(every(2) & every(3), 20) == [0, 6, 12, 18]
    assert fired(every(10) & at(range(25)), 100) == [0, 10, 20]


def test_or_with_budget_caps_instead_of_adding_probes():
    # DESIGN.md's reading: every(200) | budget(0.05) = every 200 steps, but never over 5 % of wall time.
    clock = FakeClock()
    schedule = every(200) | budget(0.05, clock=clock)
    assert isinstance(schedule, AnyOf) and not schedule.is_limit
    # Cheap probes (well under budget): exactly the every(200) steps; the budget adds none of its own.
    probed, _, _ = simulate(schedule, clock, 2001, step_seconds=0.1, probe_seconds=0.1)
    assert probed == list(range(0, 2001, 200))


def test_or_with_budget_skips_trigger_steps_when_over_budget():
    clock = FakeClock()
    schedule = every(10) | budget(0.05, clock=clock)
    # Each probe costs 5 steps of training: every(10) alone would spend 1/3 of wall time probing.
    probed, _, spent = simulate(schedule, clock, 10_000, step_seconds=0.125, probe_seconds=0.625)
    assert spent <= 0.05 * clock.t
    assert len(probed) >= 50
    assert all(step % 10 == 0 for step in probed)  # the budget only vetoes; it never probes off-trigger


def test_and_with_budget_means_the_same_as_or_with_budget():
    runs = []
    for combine in (lambda a, b: a | b, lambda a, b: a & b):
        clock = FakeClock()
        schedule = combine(every(10), budget(0.05, clock=clock))
        runs.append(simulate(schedule, clock, 5_000, step_seconds=0.1, probe_seconds=0.5)[0])
    assert runs[0] == runs[1]


def test_budget_caps_every_trigger_in_a_flattened_or_chain():
    clock = FakeClock()
    schedule = at([1, 2, 3]) | every(1000) | budget(0.05, clock=clock)
    assert len(schedule.parts) == 3  # (a | b) | c is flattened
    probed, _, _ = simulate(schedule, clock, 10, step_seconds=0.1, probe_seconds=1.0)
    assert probed == [0]  # steps 1, 2, 3 would each exceed 5 %: the budget vetoes them


def test_trigger_inside_and_is_not_capped_by_an_outer_trigger():
    clock = FakeClock()
    schedule = (every(1) & budget(0.05, clock=clock)) | at([1, 2])
    probed, _, _ = simulate(schedule, clock, 4, step_seconds=0.1, probe_seconds=1.0)
    assert probed == [0, 1, 2]  # at() is outside the &, so the budget does not gate it


def test_budget_alone_and_limits_only_or_fire_whenever_allowed():
    clock = FakeClock()
    alone = budget(0.1, clock=clock)
    probed, _, spent = simulate(alone, clock, 1000, step_seconds=1.0, probe_seconds=1.0)
    assert spent <= 0.1 * clock.t and len(probed) >= 80

    clock = FakeClock()
    both = budget(0.1, clock=clock) | budget(0.2, clock=clock)
    assert both.is_limit
    probed_both, _, spent_both = simulate(both, clock, 1000, step_seconds=1.0, probe_seconds=1.0)
    assert spent_both <= 0.1 * clock.t  # the tighter budget decides


def test_budget_sees_first_step_even_when_no_trigger_fires():
    clock = FakeClock()
    cap = budget(0.05, clock=clock)
    schedule = at([100]) | cap
    for step in range(100):
        assert not schedule.should_probe(step, float(step))
    assert cap.elapsed(99.0) == 99.0  # wall time counted from step 0, not from the first trigger


def test_observe_reaches_every_operand():
    a, b = budget(0.1), budget(0.2)
    schedule = every(3) | (a & b)
    schedule.should_probe(0, 0.0)
    schedule.observe(0, 2.0, 2.0)
    assert a.spent == b.spent == 2.0


def test_repr_shows_the_expression():
    assert repr(every(200) | budget(0.05)) == "every(200) | budget(0.05)"
    assert repr((every(2) & budget(0.1)) | at([5])) == "(every(2) & budget(0.1)) | at([5])"
    assert repr(log_spaced(0, 99, 3)) == "log_spaced(0, 99, 3)"
    assert isinstance(every(2) & every(3), AllOf)
    assert isinstance(budget(0.1), Budget)
