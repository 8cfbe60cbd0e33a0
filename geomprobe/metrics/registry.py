"""Registry of metrics by name.

A metric is a function ``fn(landscape, **options) -> dict`` returning plain JSON-ready values in the result
shape of DESIGN.md (``x`` beside ``x_err``, ``converged`` where an iteration can stop short, ``hvps`` for its
cost, ``blocks`` per parameter block). It registers itself with :func:`register`, which records its cost in
HVPs (a description and, where known, a function of the options) and what it needs beyond the Landscape
(``optimizer`` for preconditioned metrics, ``noise_batches`` for gradient-noise metrics).

A metric's planned cost, :meth:`Metric.plan`, is a :class:`CostPlan` computed before a probe from its options
(defaults filled in from its signature) and the parameter space: the HVPs it will spend (exactly, or at most
where an iteration may stop early), the gradients, and the vectors of length ``d`` it holds at once.

A metric whose work includes a product another metric computes identically (docs/metrics.md#shared_work)
declares it: ``shares`` gives its :class:`SharedPart` objects from the options, ``after`` the metrics whose
products it reuses, which a probe runs first; the probe's plan then counts each shared part once.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

from ..errors import ConfigurationError

__all__ = ["CostPlan", "PlanContext", "SharedPart", "Metric", "register", "set_plan", "set_shares", "get", "available",
           "REGISTRY"]


@dataclass(frozen=True)
class CostPlan:
    """A metric's cost planned before it runs.

    ``hvps``: the HVPs it spends, exactly when ``exact``, else the most it may spend (an iteration that stops
    once its bounds meet ``tol``). ``gradients``: gradients on other batches (gradient-noise samples).
    ``vectors``: the most vectors of length ``d`` it holds at once, so ``vectors * d * itemsize`` bytes
    besides the Landscape's graph (``None`` where unknown). ``forwards``: forward passes of the loss at other
    parameters than the probed ones (a view's points times the probe batches), the most it may spend.
    """

    hvps: int
    exact: bool = True
    gradients: int = 0
    vectors: int | None = None
    forwards: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PlanContext:
    """What a planner knows of the Landscape before it exists: ``dim`` coordinates in ``blocks`` (objects
    with ``name`` and ``size``), ``chunk_size`` vectors per batched HVP, the parameters' ``dtype`` and the
    number of probe ``batches`` (one forward pass each per point a view evaluates)."""

    dim: int
    blocks: Sequence[Any]
    chunk_size: int = 16
    dtype: Any = None
    batches: int = 1


# (options with their defaults filled in, context) -> CostPlan
Planner = Callable[[dict, PlanContext], CostPlan]


@dataclass(frozen=True)
class SharedPart:
    """A part of a metric's planned cost that another metric of the probe may compute identically: ``what``
    it is (``"raw spectrum"``), the ``key`` that says when two are the same (:mod:`geomprobe.metrics.shared`)
    and its planned ``hvps`` (an upper bound unless ``exact``), included in the metric's own plan."""

    what: str
    key: tuple
    hvps: int
    exact: bool = True
    # A part shared column by column (:mod:`geomprobe.metrics._columns`): per block ``(name, most, least)``,
    # the prefix of the block's order the metric reads at most (as a receiver) and at least (as a provider).
    # Two such parts with the same key share, per block, the receiver's most capped by what earlier metrics
    # read at least; None for a part shared whole.
    columns: tuple[tuple[str, int, int], ...] | None = None


# (options with their defaults filled in, context) -> the metric's shareable parts
Sharer = Callable[[dict, PlanContext], list]


@dataclass(frozen=True)
class Metric:
    """A registered metric: its name, function, cost in HVPs and the inputs it needs besides a Landscape."""

    name: str
    fn: Callable[..., dict]
    cost: str
    needs: frozenset[str] = field(default_factory=frozenset)
    description: str = ""
    planner: Planner | None = None
    shares: Sharer | None = None
    after: tuple[str, ...] = ()

    def __call__(self, landscape: Any, **options: Any) -> dict:
        return self.fn(landscape, **options)

    def options(self, given: dict | None = None) -> dict:
        """``given`` on top of the defaults of the metric's keyword options."""
        defaults = {
            n: p.default for n, p in inspect.signature(self.fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        return {**defaults, **dict(given or {})}

    def plan(self, options: dict | None, context: PlanContext) -> CostPlan | None:
        """The planned cost with ``options`` in ``context``; ``None`` when the metric registered no planner
        (its ``cost`` text still describes it)."""
        if self.planner is None:
            return None
        return self.planner(self.options(options), context)

    def shared_parts(self, options: dict | None, context: PlanContext) -> list[SharedPart]:
        """The parts of the plan with ``options`` another metric may compute identically (none by default)."""
        if self.shares is None:
            return []
        return list(self.shares(self.options(options), context))


REGISTRY: dict[str, Metric] = {}


def register(name: str, *, cost: str, needs: tuple[str, ...] = (), description: str = "",
             plan: Planner | None = None, shares: Sharer | None = None, after: tuple[str, ...] = ()) -> Callable:
    """Decorator registering ``fn`` under ``name`` with a cost description in HVPs and, where the cost is a
    known function of the options and the parameter space, its ``plan`` (see :class:`CostPlan`); ``shares``
    and ``after`` as in the module docstring."""

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ConfigurationError(f"metric {name!r} is registered twice")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else description
        REGISTRY[name] = Metric(name, fn, cost, frozenset(needs), doc or "", plan, shares, tuple(after))
        return fn

    return deco


def set_plan(name: str, plan: Planner) -> None:
    """Give the metric registered as ``name`` its cost planner (for metrics registered without one)."""
    REGISTRY[name] = replace(get(name), planner=plan)


def set_shares(name: str, shares: Sharer) -> None:
    """Give the metric registered as ``name`` its shareable parts (for metrics registered without them)."""
    REGISTRY[name] = replace(get(name), shares=shares)


def get(name: str) -> Metric:
    """The metric registered as ``name``; a clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "(none)"
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigurationError(f"unknown metric {name!r}; {hint}known metrics: {known}") from None


def available() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(REGISTRY)
