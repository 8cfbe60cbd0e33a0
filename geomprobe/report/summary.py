"""Series of a run's values along the steps, and their summaries (first, last, min, max, trend).

A record holds one dict per metric (``{"spectrum": {"lambda_max": 3.1, "lambda_max_err": 0.01, ...}}``).
Every numeric leaf ``x`` of it is a series, paired with ``x_err`` when the metric reports one; booleans,
strings, lists, ``blocks`` and bookkeeping counts (:data:`BOOKKEEPING`) are not. Metrics geomprobe knows get
curated rows with readable labels (:data:`KNOWN_ROWS`); any other metric shows every numeric leaf.

>>> records = [{"step": s, "loss": 1 / (s + 1), "spectrum": {"lambda_max": 2.0 + s, "lambda_max_err": 0.1}}
...            for s in range(5)]
>>> series = collect_series(records)
>>> list(series), series["spectrum.lambda_max"].label
(['loss', 'spectrum.lambda_max'], 'λ_max')
>>> s = summarize(series["spectrum.lambda_max"])
>>> s["first"], s["last"], s["last_err"], s["direction"]
(2.0, 6.0, 0.1, 'rising')
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runs.encoding import ARRAY_KEY
from ..trajectory.smoothness import spearman

__all__ = ["Series", "collect_series", "block_series", "dropped_blocks", "summarize", "cost_summary", "schedule_summary", "metric_names",
           "KNOWN_ROWS", "BLOCK_ROWS", "UNRESOLVED_FRACTION", "MIN_TREND_POINTS", "BOOKKEEPING", "TREND_RHO", "TREND_CHANGE"]

# Counts and sizes that describe how a value was computed, not the geometry: left out of the generic rows.
BOOKKEEPING = frozenset({"hvps", "steps", "n_v", "m", "passes", "gradients", "samples", "coordinates",
                         "batch_size", "dim", "values", "columns", "hill_k", "size", "computed", "d", "n"})
# Top-level record keys that are not metrics.
NOT_METRICS = frozenset({"step", "time", "wall", "loss", "grad_norm", "lr", "cost", "errors", "approximate_hvp",
                         "schedule", "final", "skipped"})

# Curated rows for the built-in metrics: (key, label). Others render every numeric leaf.
KNOWN_ROWS: dict[str, list[tuple[str, str]]] = {
    "spectrum": [("lambda_max", "λ_max"), ("lambda_min", "λ_min")],
    "rmed": [("rmed", "R_med"), ("rmed_q99", "R_q99")],
    "diagshare": [("diagshare", "diagonal share"), ("blockdiag_share", "block-diagonal share"),
                  ("wigner", "  Wigner baseline"), ("ols", "  OLS baseline")],
    "density": [("negative_mass", "negative mass"), ("abs_ratio", "|λ_min|/λ_max"), ("outliers", "outliers"),
                ("trace", "tr H")],
    "precond": [("lambda_max", "λ_max(P½HP½)"), ("lambda_min", "λ_min(P½HP½)"), ("rmed", "R_med(P½HP½)"),
                ("raw_rmed", "R_med raw")],
    "trace": [("trace", "tr H")],
    "precision": [("hvp_rel_err", "HVP error vs float64")],
    "saddle": [],  # a verdict, not a value along the run: the findings say where it flagged a saddle
    "noise": [("alpha_standardized", "α standardized"), ("alpha_pooled", "α pooled"),
              ("hill_alpha", "α Hill (norms)"), ("noise_scale", "noise scale"), ("snr", "signal/noise")],
    "isotropy": [("cv", "noise CV raw"), ("cv_preconditioned", "noise CV precond."),
                 ("isotropy_index", "isotropy raw"), ("isotropy_index_preconditioned", "isotropy precond."),
                 ("escape", "escape raw"), ("escape_preconditioned", "escape precond.")],
}
# The per-block value shown for each built-in metric in the per-layer table.
BLOCK_ROWS: dict[str, list[str]] = {
    "rmed": ["rmed"], "diagshare": ["diagshare"], "noise": ["alpha_standardized"], "precond": ["rmed"],
    "isotropy": ["cv", "cv_preconditioned"], "trace": ["trace"],
}
TOP_LABELS = {"loss": "loss", "grad_norm": "‖∇L‖", "lr": "learning rate"}

# Above this fraction of its value, an error leaves the value unresolved (report/_format.py: how it is shown).
UNRESOLVED_FRACTION = 0.5
# The fewest finite values a direction is named on: a rank correlation of ±1 from n distinct points has an
# exact two-sided p of 2/n! (n = 3: 0.33, n = 4: 0.083, n = 5: 0.017), so below 5 it is noise.
MIN_TREND_POINTS = 5
# A trend is "rising"/"falling" when the rank correlation with the step is at least TREND_RHO in size and
# the value moved by more than TREND_CHANGE (relative) from first to last; "flat" when it moved less.
TREND_RHO = 0.6
TREND_CHANGE = 0.1


@dataclass(frozen=True)
class Series:
    """One value along the run: ``path`` (``"rmed.rmed"``), its ``label``, and aligned arrays."""

    path: str
    label: str
    steps: np.ndarray
    values: np.ndarray
    errors: np.ndarray | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def metric_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the metric dicts in the records, in order of first appearance."""
    names: dict[str, None] = {}
    for r in records:
        for key, value in r.items():
            if key not in NOT_METRICS and isinstance(value, Mapping) and ARRAY_KEY not in value:
                names.setdefault(key)
    return list(names)


def _leaves(result: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the numeric leaves of one metric dict (no ``_err``, ``blocks`` or bookkeeping)."""
    out = []
    for key, value in result.items():
        if key == "blocks" or key in BOOKKEEPING or key.endswith("_err"):
            continue
        if isinstance(value, Mapping) and ARRAY_KEY not in value:
            out += _leaves(value, f"{prefix}{key}.")
        elif _number(value) is not None or value is None:
            out.append(prefix + key)
    return out


def _get(obj: Any, dotted: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted key inside nested dicts."""
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def _series(records: Sequence[Mapping[str, Any]], root: Sequence[str], key: str, path: str,
            label: str) -> Series | None:
    steps, values, errors, any_err = [], [], [], False
    for r in records:
        holder = r
        for part in root:
            holder = holder.get(part) if isinstance(holder, Mapping) else None
        if not isinstance(holder, Mapping) or not _is_step(r.get("step")):
            continue  # a record without an integer step has no place on the axis
        present, value = _get(holder, key)
        if not present:
            continue  # absent at this probe; a None the metric reported is kept, as NaN
        v = _number(value)
        e = _number(_get(holder, key + "_err")[1])
        any_err = any_err or e is not None
        steps.append(int(r["step"]))
        values.append(math.nan if v is None else v)
        errors.append(math.nan if e is None else e)
    if not steps or all(math.isnan(v) for v in values):
        return None
    return Series(path, label, np.asarray(steps, dtype=np.int64), np.asarray(values),
                  np.asarray(errors) if any_err else None)


def collect_series(records: Sequence[Mapping[str, Any]], *, every_leaf: bool = False) -> dict[str, Series]:
    """Every series of the run by dotted path: ``loss``, ``grad_norm``, ``lr`` (when it changes), then each
    metric's rows (curated for the built-in metrics unless ``every_leaf``)."""
    out: dict[str, Series] = {}
    for key in ("loss", "grad_norm"):
        s = _series(records, (), key, key, TOP_LABELS[key])
        if s is not None:
            out[key] = s
    lr_records = [{"step": r["step"], "lr": r["lr"][0]} for r in records
                  if "step" in r and isinstance(r.get("lr"), list) and r["lr"]]
    lr = _series(lr_records, (), "lr", "lr", TOP_LABELS["lr"])
    if lr is not None and np.unique(lr.values[np.isfinite(lr.values)]).size > 1:
        out["lr"] = lr  # a constant learning rate is in the header already
    for name in metric_names(records):
        keys: dict[str, None] = {}
        for r in records:
            if isinstance(r.get(name), Mapping):
                keys.update(dict.fromkeys(_leaves(r[name])))
        if name in KNOWN_ROWS and not every_leaf:
            rows = [(k, lab) for k, lab in KNOWN_ROWS[name] if k in keys]
        else:
            rows = [(k, f"{name}.{k}") for k in keys]
        for key, label in rows:
            s = _series(records, (name,), key, f"{name}.{key}", label)
            if s is not None:
                out[s.path] = s
    return out


def block_series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Series]]:
    """Per parameter block: ``{block: {"rmed.rmed": Series, ...}}`` from each metric's ``blocks`` dict."""
    out: dict[str, dict[str, Series]] = {}
    for name in metric_names(records):
        blocks: dict[str, dict[str, None]] = {}
        for r in records:
            res = r.get(name)
            if isinstance(res, Mapping) and isinstance(res.get("blocks"), Mapping):
                for bname, bres in res["blocks"].items():
                    if isinstance(bres, Mapping):
                        blocks.setdefault(bname, {}).update(dict.fromkeys(_leaves(bres)))
        for bname, keys in blocks.items():
            wanted = [k for k in BLOCK_ROWS[name] if k in keys] if name in BLOCK_ROWS else list(keys)
            for key in wanted:
                s = _series(records, (name, "blocks", bname), key, f"{name}.{key}", f"{name}.{key}")
                if s is not None:
                    out.setdefault(bname, {})[s.path] = s
    return out


def dropped_blocks(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per block value (``rmed.rmed``), the blocks that report it but never as a finite number (an undefined
    R_med of a block with too few coordinates): the per-block table cannot show them and lists them instead.

    >>> dropped_blocks([{"step": 0, "rmed": {"blocks": {"w": {"rmed": 2.0}, "b": {"rmed": None}}}}])
    {'rmed.rmed': ['b']}
    """
    shown = block_series(records)
    out: dict[str, list[str]] = {}
    for name in metric_names(records):
        wanted = BLOCK_ROWS.get(name)
        for r in records:
            res = r.get(name)
            if not (isinstance(res, Mapping) and isinstance(res.get("blocks"), Mapping)):
                continue
            for bname, bres in res["blocks"].items():
                for key in (wanted if wanted is not None else list(bres) if isinstance(bres, Mapping) else []):
                    path = f"{name}.{key}"
                    if isinstance(bres, Mapping) and key in bres and path not in shown.get(bname, {}) \
                            and bname not in out.get(path, []):
                        out.setdefault(path, []).append(bname)
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def summarize(series: Series) -> dict[str, Any]:
    """First, last (with their errors and steps), min, max, and the trend of one series; NaN-safe.

    ``trend`` is the Spearman correlation of the value with the step (None below 3 probes), ``ratio`` is
    last/first, ``direction`` one of ``rising``, ``falling``, ``flat``, ``mixed`` (:data:`TREND_RHO`,
    :data:`TREND_CHANGE`) or None below :data:`MIN_TREND_POINTS` values or when the first or last value is
    unresolved (its error above :data:`UNRESOLVED_FRACTION` of it); ``unresolved_steps`` lists those steps.
    """
    ok = np.isfinite(series.values)
    idx = np.flatnonzero(ok)
    out: dict[str, Any] = {"label": series.label, "probes": int(len(series.values)), "finite": int(ok.sum())}
    if not len(idx):
        return out | {"first": None, "last": None, "min": None, "max": None, "trend": None, "direction": None}
    i0, i1 = idx[0], idx[-1]
    imin, imax = idx[np.argmin(series.values[idx])], idx[np.argmax(series.values[idx])]
    err = series.errors
    first, last = float(series.values[i0]), float(series.values[i1])
    rho = spearman(series.steps, series.values)
    change = abs(last - first) / max(abs(first), abs(last), np.finfo(np.float64).tiny)
    fe = _finite_or_none(err[i0]) if err is not None else None
    le = _finite_or_none(err[i1]) if err is not None else None
    loose_end = any(e is not None and e > UNRESOLVED_FRACTION * abs(v) for v, e in ((first, fe), (last, le)))
    if len(idx) < MIN_TREND_POINTS or loose_end:
        direction = None  # a rank correlation of 3 or 4 points is noise, and so is a move within the error
    elif change <= TREND_CHANGE:
        direction = "flat"
    elif math.isfinite(rho) and abs(rho) >= TREND_RHO:
        direction = "rising" if rho > 0 else "falling"
    else:
        direction = "mixed"
    unsure = [s for s, v, e in ((int(series.steps[i]), series.values[i], err[i] if err is not None else None)
                                for i in idx) if e is not None and math.isfinite(e) and e > UNRESOLVED_FRACTION * abs(v)]
    return out | {
        "unresolved_steps": unsure,
        "first": first, "first_err": fe,
        "first_step": int(series.steps[i0]),
        "last": last, "last_err": le,
        "last_step": int(series.steps[i1]),
        "min": float(series.values[imin]), "min_step": int(series.steps[imin]),
        "max": float(series.values[imax]), "max_step": int(series.steps[imax]),
        "ratio": last / first if first != 0 else None, "trend": _finite_or_none(rho), "direction": direction,
    }


def cost_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Total HVPs and probe seconds, peak memory, and the share of wall time spent probing.

    ``overhead`` is probe seconds over the wall time from the probe's creation to the end of its last probe
    (the record's ``wall`` is measured at the start of each probe); None when the records carry no wall time.
    """
    hvps = seconds = 0.0
    peak: float | None = None
    end: float | None = None
    for r in records:
        cost = r.get("cost") if isinstance(r.get("cost"), Mapping) else {}
        hvps += _number(cost.get("hvps")) or 0.0
        sec = _number(cost.get("seconds")) or 0.0
        seconds += sec
        p = _number(cost.get("peak_mib"))
        if p is not None:
            peak = p if peak is None else max(peak, p)
        wall = _number(r.get("wall"))
        if wall is not None:
            end = max(end or 0.0, wall + sec)
    overhead = seconds / end if end else None
    return {"probes": len(records), "hvps": int(hvps), "seconds": seconds, "peak_mib": peak,
            "wall_seconds": end, "overhead": overhead}


def schedule_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How the probes came about: ``scheduled`` (steps the schedule selected), ``skipped`` (of those, vetoed
    by a limit), ``skipped_by`` (per limit), ``final`` (probes at the end of training) and ``recorded``
    (whether the records carry these counts: runs written before they existed do not).

    The counts in each record are cumulative within one process; a resumed run starts them again, so a
    count that goes down marks a new segment, and the segments' last counts are added up.

    >>> summary = schedule_summary([{"step": 0, "schedule": {"scheduled": 1, "skipped": 0, "skipped_by": {}}},
    ...     {"step": 9, "final": True, "schedule": {"scheduled": 5, "skipped": 4, "skipped_by": {"budget": 4}}}])
    >>> summary["scheduled"], summary["skipped"], summary["skipped_by"], summary["final"]
    (5, 4, {'budget': 4}, 1)
    """
    total = {"scheduled": 0, "skipped": 0}
    by: dict[str, int] = {}
    recorded = False
    previous: Mapping[str, Any] | None = None

    def add(counts: Mapping[str, Any] | None) -> None:
        if counts is None:
            return
        for key in total:
            total[key] += int(_number(counts.get(key)) or 0)
        for reason, n in (counts.get("skipped_by") or {}).items():
            by[str(reason)] = by.get(str(reason), 0) + int(_number(n) or 0)

    for r in records:
        counts = r.get("schedule")
        if not isinstance(counts, Mapping):
            continue
        recorded = True
        if previous is not None and (_number(counts.get("scheduled")) or 0) < (_number(previous.get("scheduled")) or 0):
            add(previous)  # a new process appended to the run: the previous segment is complete
        previous = counts
    add(previous)
    final = sum(1 for r in records if r.get("final") is True)
    return {"probes": len(records), **total, "skipped_by": by, "final": final, "recorded": recorded}


def _is_step(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
