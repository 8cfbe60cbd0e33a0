"""The order a probe runs its metrics in, and the work they share (docs/metrics.md#shared_work).

A metric that reuses another's product (``precond`` the raw spectrum of ``spectrum`` and the diagonal reads of
``rmed``) runs after it, whatever order the user listed them in (``after`` in the registry), so that the
product is computed once, by the metric it belongs to, and each record says the same thing in every order.
Which parts are shared is read from the metrics' registered :class:`~geomprobe.metrics.registry.SharedPart`
keys before anything runs: the plan counts each once. ``rmed`` and ``diagshare`` share Hessian columns in part,
in whichever order they run (no ``after``): the plan takes off the receiver the columns the earlier one reads
for certain (``SharedPart.columns``). Costs nothing (no HVP).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ..metrics import registry
from ..metrics.registry import PlanContext, SharedPart

__all__ = ["planned_sharing", "providers", "run_order"]


def run_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order a probe runs them: as given, except that a metric waits for those of the set it
    reuses products of (``after``). Stable: metrics with no such tie keep their places relative to each other."""
    pending, done = list(names), []
    while pending:
        for name in pending:
            if not any(dep in pending and dep != name for dep in registry.get(name).after):
                done.append(name)
                pending.remove(name)
                break
        else:  # metrics waiting for each other (no registered metric does): the given order
            done.extend(pending)
            break
    return done


def _options(name: str, given: Mapping[str, Any], seed: int | None) -> dict:
    # the probe passes its seed to every metric that takes one and was not given one: so does the plan
    opts = dict(given)
    if seed is not None and "seed" not in opts and "seed" in inspect.signature(registry.get(name).fn).parameters:
        opts["seed"] = seed
    return opts


def planned_sharing(metric_options: Mapping[str, Mapping[str, Any]], context: PlanContext,
                    seed: int | None = None) -> dict[str, list[tuple[SharedPart, str]]]:
    """For each metric, the parts of its plan it will receive from a metric run before it, with that metric's
    name: a part is received when an earlier metric of the run order has a part with the same key (the same
    product, computed with the same options and seed). ``seed``: the probe's, given to metrics without one."""
    made: dict[tuple, str] = {}
    read: dict[tuple, dict[str, int]] = {}  # parts shared by columns: per block, the prefix certainly read
    out: dict[str, list[tuple[SharedPart, str]]] = {}
    for name in run_order(metric_options):
        out[name] = []
        for part in registry.get(name).shared_parts(_options(name, metric_options[name], seed), context):
            if part.columns is not None:
                # an upper bound: the metric may find more of its columns read (another's candidates, a
                # provider that read past its least)
                have = read.setdefault(part.key, {})
                n = sum(min(most, have.get(block, 0)) for block, most, _ in part.columns)
                if n:
                    out[name].append((replace(part, hvps=n, exact=False), made[part.key]))
                for block, _, least in part.columns:
                    have[block] = max(have.get(block, 0), least)
                made.setdefault(part.key, name)
            elif part.key in made:
                out[name].append((part, made[part.key]))
            else:
                made[part.key] = name
    return out


def providers(metric_options: Mapping[str, Mapping[str, Any]], space: Any, seed: int | None = None) -> set[str]:
    """The metrics whose product another metric of the set receives, in the parameter space ``space``."""
    sharing = planned_sharing(metric_options, PlanContext(space.dim, list(space.blocks)), seed)
    return {source for parts in sharing.values() for _, source in parts}
