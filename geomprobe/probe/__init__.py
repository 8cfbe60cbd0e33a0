"""The profiler: :class:`~.geometry_probe.GeometryProbe`, the hook that measures geometry at sampled
iterates of a training loop, the schedules that say when (:mod:`.schedule`), warm starts along the trajectory
(:mod:`.warm_start`) and a probe's planned cost and progress (:mod:`.progress`)."""

from .geometry_probe import DEFAULT_METRICS, GeometryProbe
from .progress import ProgressEvent
from .schedule import Schedule, at, budget, every, log_spaced, manual
from .warm_start import WarmStart

__all__ = ["GeometryProbe", "DEFAULT_METRICS", "Schedule", "at", "budget", "every", "log_spaced", "manual"]
__all__ += ["ProgressEvent", "WarmStart"]
