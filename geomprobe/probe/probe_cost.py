"""A probe's seconds predicted before any probe has run, so that ``budget(f)`` holds from the first probe on.

Until a probe has been measured, :class:`~.schedule.Budget` has nothing to go by. The probe does know two
things: its plan (:func:`~.progress.plan_probe`: each metric's HVPs, gradients and forward passes, shared
work counted once) and the seconds of the user's own training steps, timed between consecutive calls of
:meth:`GeometryProbe.step` (the optimizer hook), less the probe time in between. A training step is about one
forward and backward pass, so about one gradient on one batch; the prediction counts the probe in such
gradients and multiplies:

    seconds = OUTSIDE_FACTOR * step_seconds * (batches * (BUILD_GRADIENTS + HVP_GRADIENTS * hvps) + gradients
                                               + FORWARD_GRADIENTS * forwards)

where ``batches`` is the number of probe batches (each HVP and the build run over all of them; drawn from a
DataLoader they have its batch size), ``gradients`` the gradient-noise samples (one batch each) and
``forwards`` the views' forward passes (already counted per probe batch by the plan).

The factors, each at the high end of what was measured (``benchmarks/RESULTS.md``):

* ``HVP_GRADIENTS = 3.0``: one HVP with the first-order graph kept costs 2.3-3.0 gradients on GPUs (§1,
  strict fp32 and TF32, single vectors) and 2.3-2.5 on the CPU;
* ``BUILD_GRADIENTS = 2.0``: the Landscape's build, a forward and a gradient that keeps its graph, measured
  1.2-2.7 gradients (§1);
* ``FORWARD_GRADIENTS = 0.5``: a view's forward pass at other parameters, a forward without its backward
  (about a third of a gradient);
* ``OUTSIDE_FACTOR = 1.5``: the probe's work outside HVPs and gradients (Lanczos' reorthogonalization, the
  statistics, the run log) was 12-36 % of a probe with everything on the device (§6), up to a third of it.

An iterative metric's plan is the most HVPs it may spend (``spectrum``: ``min(d, 300)`` Lanczos steps, where
10-150 is usual); counted at its cap, the first probe of a GPT-2 124M run would wait for 11 minutes of training
(a 34 s prediction for a probe that took 5 s). So a plan that is not exact counts at most ``ITERATIVE_HVPS``
(64: the default ``spectrum`` took 37 HVPs on GPT-2 124M, 9-127 on the models of ``benchmarks/RESULTS.md``),
and a probe whose cost was under-predicted stops at the budget's allowance (:mod:`.allowance`), so the
budget's rule holds either way. Once a probe has been measured, the budget goes by that
(:class:`~.schedule.Budget`) and this prediction is only recorded beside it (each record's
``cost.predicted_seconds``). A metric registered without a planner is counted as ``UNPLANNED_HVPS`` HVPs (the
Lanczos cap of the built-in metrics).

Not covered: a step timed on a training batch smaller than each probe batch (the prediction scales with the
step and the number of probe batches, not with the samples in them); ``step()`` called once per epoch rather than per optimizer step (an epoch
is then timed as a step, and the prediction is as many times too high); and a memory plan that rebuilds graphs per HVP and streams the Lanczos
basis from host memory, where one HVP cost 8x the kept-graph one (GPT-2 124M under a 1.5x peak, §6). The
first probe may then take longer than predicted; from the second on the measured cost decides.

Costs nothing: no HVP, no forward pass; the step timer keeps the last ``STEP_WINDOW`` step durations.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["BUILD_GRADIENTS", "FORWARD_GRADIENTS", "HVP_GRADIENTS", "ITERATIVE_HVPS", "OUTSIDE_FACTOR", "STEP_WINDOW",
           "UNPLANNED_HVPS", "ProbeCost", "StepTimer", "planned_gradients"]

HVP_GRADIENTS = 3.0
BUILD_GRADIENTS = 2.0
FORWARD_GRADIENTS = 0.5
OUTSIDE_FACTOR = 1.5
UNPLANNED_HVPS = 300
ITERATIVE_HVPS = 64
STEP_WINDOW = 32


def planned_gradients(cost_plan: Mapping[str, Mapping[str, Any]], batches: int = 1) -> float:
    """One probe's work in gradients on one batch, from :func:`~.progress.plan_probe`'s plan on ``batches``
    probe batches (module docstring: the build and each HVP over every batch, an HVP as ``HVP_GRADIENTS``, a
    forward pass as ``FORWARD_GRADIENTS``), before ``OUTSIDE_FACTOR``. A metric without a plan counts
    ``UNPLANNED_HVPS`` HVPs. Costs nothing.

    >>> planned_gradients({"spectrum": {"hvps": 40, "gradients": 0, "forwards": 0}})
    122.0
    >>> planned_gradients({"spectrum": {"hvps": 40, "gradients": 0, "forwards": 0}}, batches=2)
    244.0
    >>> planned_gradients({"noise": {"hvps": 0, "gradients": 64, "forwards": 0}, "mystery": {"hvps": None}})
    966.0
    """
    over_batches = BUILD_GRADIENTS  # the build and the HVPs run over every probe batch
    once = 0.0
    for plan in cost_plan.values():
        hvps = plan.get("hvps")
        hvps = UNPLANNED_HVPS if hvps is None else hvps
        if not plan.get("exact", True):  # an iteration that stops when converged: its usual spend, not its cap
            hvps = min(hvps, ITERATIVE_HVPS)
        over_batches += HVP_GRADIENTS * hvps
        once += (plan.get("gradients") or 0) + FORWARD_GRADIENTS * (plan.get("forwards") or 0)
    return float(max(1, int(batches)) * over_batches + once)


class StepTimer:
    """The seconds of one training step: the median of the last ``window`` intervals between consecutive
    :meth:`mark` calls, less the probe seconds :meth:`exclude` reported in between, per optimizer step.

    The median lets a slow first step (CUDA start-up, compilation, the loader's first batch) drop out as soon
    as most of the window is made of ordinary steps.

    >>> timer = StepTimer()
    >>> timer.mark(0, 10.0); timer.seconds is None       # nothing timed yet
    True
    >>> timer.exclude(3.0); timer.mark(1, 13.5); timer.seconds   # 3.5 s, of which 3 s probing
    0.5
    >>> timer.mark(5, 15.5); timer.seconds               # 2 s over 4 steps: median of (0.5, 0.5)
    0.5
    """

    def __init__(self, window: int = STEP_WINDOW) -> None:
        self._durations: deque[float] = deque(maxlen=max(1, int(window)))
        self._last: tuple[int, float] | None = None
        self._excluded = 0.0

    def mark(self, step: int, now: float) -> None:
        """Optimizer step ``step`` ended at ``now``; the interval since the last mark is training time."""
        if self._last is not None:
            last_step, last_now = self._last
            seconds = now - last_now - self._excluded
            # the same step asked twice, or a step counter that went back (a restart): no interval to time
            if step > last_step and math.isfinite(seconds) and seconds > 0:
                self._durations.append(seconds / (step - last_step))
        self._last = (step, float(now))
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """``seconds`` since the last mark were probing, not training."""
        self._excluded += float(seconds)

    @property
    def seconds(self) -> float | None:
        """Seconds per optimizer step (``None`` before two marks a training step apart)."""
        return statistics.median(self._durations) if self._durations else None

    @property
    def count(self) -> int:
        """Step durations in the window."""
        return len(self._durations)


class ProbeCost:
    """Predicts one probe's seconds from its plan on ``batches`` probe batches (:func:`planned_gradients`) and
    the :class:`StepTimer`.

    A :class:`~.schedule.Budget` calls :meth:`predict` for the cost of a probe while it has measured none.
    """

    def __init__(self, cost_plan: Mapping[str, Mapping[str, Any]], batches: int = 1,
                 window: int = STEP_WINDOW) -> None:
        self.gradients = planned_gradients(cost_plan, batches)
        self.timer = StepTimer(window)

    def predict(self) -> float | None:
        """Predicted seconds of one probe; ``None`` while no training step has been timed."""
        step = self.timer.seconds
        return None if step is None else OUTSIDE_FACTOR * self.gradients * step

    def to_dict(self) -> dict:
        """What the prediction rests on, JSON-ready (for the run's metadata and the benchmark)."""
        return {"gradients": self.gradients, "step_seconds": self.timer.seconds, "predicted_seconds": self.predict(),
                "factors": {"hvp": HVP_GRADIENTS, "build": BUILD_GRADIENTS, "forward": FORWARD_GRADIENTS,
                            "outside": OUTSIDE_FACTOR}}
