"""Whether a run may be continued: the records appended to a run must be measured as its records were.

A run is read along its steps, so every record must come from the same metrics (with the same options, their
defaults filled in), the same mode, the same probe data and the same seed. ``GeometryProbe(resume=True)``
compares its own policy with the ``probe`` section of the run's ``meta.json`` before anything is written
(:func:`check_resumable`); ``geomprobe probe --resume`` compares the options given again with the command the
run keeps (``cli/_resume.py``), through the same normalization (:func:`plain`, :func:`same_metrics`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..metrics import registry
from ..runs.reader import read_meta

__all__ = ["POLICY_FIELDS", "check_resumable", "differences", "metrics_text", "plain", "probe_policy",
           "same_metrics"]

# The fields of meta.json's "probe" section a continued run must share, in the order a refusal names them.
POLICY_FIELDS = ("metrics", "mode", "data", "seed", "params", "group_by")

_OPTION = {"metrics": "metrics=", "mode": "mode=", "data": "probe_data", "seed": "seed=", "params": "params=",
           "group_by": "group_by="}


def plain(value: Any) -> Any:
    """``value`` as a run stores it in JSON (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, default=str))


def _filled(metrics: Mapping[str, Any]) -> dict:
    """Each metric's options with its defaults filled in, so that ``{"spectrum": {}}`` and the same metric
    with its default ``tol`` given explicitly are one setting. An unknown name (a custom metric registered
    in the earlier run's process only) is taken as given."""
    out = {}
    for name, options in metrics.items():
        options = dict(options or {}) if isinstance(options, Mapping) else options
        if name in registry.REGISTRY and isinstance(options, dict):
            options = registry.get(name).options(options)
        out[name] = options
    return plain(out)


def same_metrics(saved: Any, given: Any) -> bool:
    """Whether two metric selections (name -> options) measure the same, defaults filled in."""
    if not isinstance(saved, Mapping) or not isinstance(given, Mapping):
        return plain(saved) == plain(given)
    return _filled(saved) == _filled(given)


def metrics_text(metrics: Mapping[str, Any]) -> str:
    """``spectrum:k=3,tol=0.0001 rmed``: a metric selection as ``--metric`` takes it."""
    return " ".join(name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
                    for name, opts in metrics.items())


def _data_text(policy: Any) -> str:
    if not isinstance(policy, Mapping):
        return repr(policy)
    if policy.get("source") == "dataset":
        n = len(policy.get("indices") or [])
        return (f"{n} samples drawn from a dataset with seed {policy.get('seed')} in batches of "
                f"{policy.get('batch_size')}")
    if policy.get("source") == "given":
        return f"{policy.get('batches')} given batch(es)"
    return f"the first {policy.get('batches')} batch(es) of an iterable"


def _text(field: str, value: Any) -> str:
    if field == "metrics" and isinstance(value, Mapping):
        return metrics_text(value) or "(none)"
    if field == "data":
        return _data_text(value)
    return repr(value)


def differences(saved: Mapping[str, Any], given: Mapping[str, Any], fields: tuple[str, ...] = POLICY_FIELDS
                ) -> list[str]:
    """The fields among ``fields`` where ``given`` measures differently from ``saved`` (a field ``saved``
    does not hold, as in a run written by an older version, is not compared)."""
    out = []
    for field in fields:
        if field not in saved or field not in given:
            continue
        if field == "metrics":
            if not same_metrics(saved[field], given[field]):
                out.append(field)
        elif plain(saved[field]) != plain(given[field]):
            out.append(field)
    return out


def probe_policy(probe: Any) -> dict[str, Any]:
    """A GeometryProbe's values of :data:`POLICY_FIELDS`, as its ``meta.json`` records them."""
    return {"metrics": probe.metric_options, "mode": probe.mode, "data": probe.data_policy, "seed": probe.seed,
            "params": probe.landscape_options["params"], "group_by": probe.landscape_options["group_by"]}


def check_resumable(run_dir: str | os.PathLike, policy: Mapping[str, Any]) -> None:
    """Refuse, with one message naming every difference, to continue the run in ``run_dir`` with a probe of
    ``policy`` (:func:`probe_policy`) when the run was measured otherwise. A folder holding no run (missing,
    empty, no ``meta.json``) passes: ``resume=True`` starts a new run there. Reads ``meta.json`` only;
    writes nothing."""
    if not os.path.isfile(os.path.join(run_dir, "meta.json")):
        return
    saved = read_meta(Path(run_dir)).get("probe")
    if not isinstance(saved, Mapping):
        return  # written by RunWriter alone: no probe policy to hold the new records to
    differ = differences(saved, policy)
    if not differ:
        return
    parts = [f"{_OPTION[f].rstrip('=')} {_text(f, saved[f])}, not {_text(f, policy[f])}" for f in differ]
    given = ", ".join(_OPTION[f] for f in differ)
    raise ConfigurationError(
        f"cannot resume run {str(run_dir)!r}: it was measured with {'; '.join(parts)}. Records measured "
        f"otherwise would not compare along its steps: pass the run's {given} to continue it, or a new run_dir "
        "(force=True replaces the run)"
    )
