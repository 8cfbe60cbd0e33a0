"""The profiler: :class:`~.geometry_probe.GeometryProbe`, the hook that measures geometry at sampled
iterates of a training loop, and the schedules that say when (:mod:`.schedule`)."""

from .geometry_probe import DEFAULT_METRICS, GeometryProbe
from .schedule import Schedule, at, budget, every, log_spaced, manual

__all__ = ["GeometryProbe", "DEFAULT_METRICS", "Schedule", "at", "budget", "every", "log_spaced", "manual"]
