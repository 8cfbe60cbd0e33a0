"""Runs side by side: the same values at matched steps, or at matched loss (e.g. R_med of SGD vs Adam).

``by="step"``: the steps every run probed. When the runs share no step, the first run's steps inside the
step range all runs cover are used and each run's values are interpolated linearly in the step there
(``interpolated`` says so).

``by="loss"``: loss levels spaced geometrically between the highest loss every run starts below and the
lowest loss every run reaches. A run reaches a level the first time its loss falls to it; its values (and
the step, ``steps_at``) are interpolated linearly in the loss between the two probes that bracket that first
passage. So "R_med at loss 0.3" compares the runs where each first got that far, whatever it took.

>>> import tempfile
>>> from geomprobe.runs import RunWriter
>>> with tempfile.TemporaryDirectory() as tmp:
...     for name, rate in (("sgd", 1.0), ("adam", 2.0)):
...         with RunWriter(f"{tmp}/{name}", {"optimizer": name}) as w:
...             for s in range(0, 40, 10):
...                 _ = w.append({"step": s, "loss": 1.0 / (1 + rate * s), "rmed": {"rmed": 10.0 + s}})
...     cmp = compare_runs([f"{tmp}/sgd", f"{tmp}/adam"], by="loss", metrics=["rmed"], levels=3)
>>> cmp.runs, [round(float(x), 4) for x in cmp.axis]
(['sgd', 'adam'], [1.0, 0.1796, 0.0323])
>>> [[round(float(x), 2) for x in run] for run in cmp.steps_at]   # adam gets to each loss sooner
[[0.0, 9.02, 30.0], [0.0, 8.61, 16.61]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import ConfigurationError
from ._format import UNRESOLVED_LEGEND, add_row, fmt, jsonable, unresolved
from .document import RunLike, open_run, placed_records
from .summary import Series, block_series, collect_series

__all__ = ["Comparison", "compare_runs", "render_comparison", "probe_differences", "MAX_ROWS"]

MAX_ROWS = 12  # rows of a comparison table; longer axes are thinned evenly for display (JSON keeps all)


@dataclass(frozen=True)
class Comparison:
    """Values of several runs on one axis: ``values[path]`` has shape ``(runs, len(axis))`` (NaN: missing)."""

    by: str
    runs: list[str]
    optimizers: list[str | None]
    axis: np.ndarray
    values: dict[str, np.ndarray]
    labels: dict[str, str]
    steps_at: np.ndarray | None = None
    interpolated: bool = False
    paths: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: dict[str, np.ndarray] = field(default_factory=dict)  # like values, where the runs report errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per metric, per run, the list of values along ``axis``."""
        return jsonable({
            "by": self.by, "axis": self.axis, "interpolated": self.interpolated,
            "runs": [{"name": n, "optimizer": o} for n, o in zip(self.runs, self.optimizers)],
            "steps_at": None if self.steps_at is None else {n: s for n, s in zip(self.runs, self.steps_at)},
            "metrics": {p: {"label": self.labels[p], "values": dict(zip(self.runs, self.values[p]))}
                        for p in self.paths},
            "warnings": self.warnings,
            "errors": {p: dict(zip(self.runs, e)) for p, e in self.errors.items()},
        })


def _names(readers: Sequence[Any]) -> list[str]:
    names = [r.run_dir.name for r in readers]
    if len(set(names)) < len(names):  # two runs called "run": tell them apart by their parent folder
        names = [f"{r.run_dir.parent.name}/{r.run_dir.name}" for r in readers]
    return names


# What in the runs' probe policies (meta.json "probe") makes their values measure different things.
_POLICY = (("mode", "probe modes", "the Hessian of a different function (dropout, BatchNorm statistics)"),
           ("data", "probe data", "a different loss (other samples)"),
           ("batches", "numbers of probe batches", "a different loss (other samples)"),
           ("seed", "probe seeds", "other probe samples and random vectors"),
           ("hvp_method", "HVP methods", "other precision"),
           ("params", "measured parameters", "a different part of the model"),
           ("group_by", "block groupings", "other per-block values"))


def probe_differences(metas: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """One warning per probe setting that differs between the runs (their ``meta.json`` ``probe`` policy):
    values measured under another mode or on other data are not the same quantity, whatever the step.

    >>> probe_differences([{"probe": {"mode": "eval"}}, {"probe": {"mode": "train"}}], ["sgd", "adam"])
    ['the runs used different probe modes (sgd: eval, adam: train): their values measure the Hessian of a different function (dropout, BatchNorm statistics), not only a different trajectory']
    """
    policies = [m.get("probe") if isinstance(m.get("probe"), Mapping) else {} for m in metas]
    out = []
    for key, what, why in _POLICY:
        values = [p.get(key) for p in policies]
        if all(v is None for v in values) or all(v == values[0] for v in values):
            continue
        shown = ", ".join(f"{n}: {_short(v)}" for n, v in zip(names, values))
        out.append(f"the runs used different {what} ({shown}): their values measure {why}, not only a different "
                   "trajectory")
    return out


def _short(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items() if k != "indices") + \
            (f", {len(value['indices'])} indices" if isinstance(value.get("indices"), list) else "")
    return str(value)


def _block_paths(records: Sequence[dict]) -> dict[str, Series]:
    """Each block's value as ``metric[block].key`` (``rmed[layer1.0.weight].rmed``): block names hold dots,
    so the block goes in brackets. Named only when asked for; a metric named alone shows whole-model rows."""
    out: dict[str, Series] = {}
    for block, rows in block_series(records).items():
        for path, s in rows.items():
            metric, key = path.split(".", 1)
            name = f"{metric}[{block}].{key}"
            out[name] = replace(s, path=name, label=f"{s.label} [{block}]")
    return out


def _select(wanted: Sequence[str], available: list[dict[str, Series]], headline: list[dict[str, Series]]) -> list[str]:
    """Dotted paths for the names asked for: an exact path, or the rows of a metric named alone (its curated
    rows for a built-in metric, every numeric value otherwise)."""
    every = list(dict.fromkeys(p for series in available for p in series))
    shown = list(dict.fromkeys(p for series in headline for p in series))
    chosen: list[str] = []
    for name in wanted:
        matches = [p for p in every if p == name] or [p for p in shown if p.split(".")[0] == name] or \
            [p for p in every if p.split(".")[0] == name and "[" not in p] or \
            [p for p in every if p.startswith(name + ".") and "[" in name]
        if not matches:
            metrics = sorted({p.split(".")[0] for p in every if "[" not in p})
            raise ConfigurationError(f"metric {name!r} is in none of the runs; they hold {', '.join(metrics)} "
                                     "(name a metric, e.g. rmed, one value, e.g. rmed.rmed_q99, or one block's, "
                                     "e.g. rmed[layer1.weight])")
        chosen += [p for p in matches if p not in chosen]
    return chosen


def _at(series: Series | None, steps: np.ndarray, interpolate: bool) -> np.ndarray:
    if series is None:
        return np.full(len(steps), math.nan)
    ok = np.isfinite(series.values)
    if interpolate:
        if ok.sum() < 1:
            return np.full(len(steps), math.nan)
        return np.interp(steps, series.steps[ok], series.values[ok], left=math.nan, right=math.nan)
    lookup = dict(zip(series.steps.tolist(), series.values.tolist()))
    return np.asarray([lookup.get(int(s), math.nan) for s in steps], dtype=np.float64)


def _first_passage(loss: np.ndarray, level: float) -> tuple[int, float] | None:
    """``(i, w)``: the level is first reached between probes ``i-1`` and ``i``, at weight ``w`` towards ``i``."""
    below = np.flatnonzero(loss <= level)
    if not len(below):
        return None
    i = int(below[0])
    if i == 0:
        return 0, 1.0
    return i, float((loss[i - 1] - level) / (loss[i - 1] - loss[i]))


def _errors_of(series: Series | None) -> Series | None:
    """The series of a value's reported errors, aligned like the value (None when it reports none)."""
    return None if series is None or series.errors is None else replace(series, values=series.errors, errors=None)


def _by_loss(series: list[dict[str, Series]], names: list[str], paths: list[str], levels: int):
    losses = []
    for name, s in zip(names, series):
        if "loss" not in s:
            raise ConfigurationError(f"run {name!r} has no loss values, so it cannot be matched by loss; use --by step")
        ok = np.isfinite(s["loss"].values)
        losses.append((s["loss"].steps[ok], s["loss"].values[ok]))
    hi = min(float(v[0]) for _, v in losses)
    lo = max(float(v.min()) for _, v in losses)
    if not lo < hi:
        ranges = ", ".join(f"{n} {fmt(v.min())}–{fmt(v[0])}" for n, (_, v) in zip(names, losses))
        raise ConfigurationError(f"the runs' loss ranges do not overlap ({ranges}); compare them --by step")
    axis = np.geomspace(hi, lo, levels) if lo > 0 else np.linspace(hi, lo, levels)
    values = {p: np.full((len(names), levels), math.nan) for p in paths}
    errors = {p: np.full((len(names), levels), math.nan) for p in paths}
    steps_at = np.full((len(names), levels), math.nan)
    for k, (s, (steps, loss)) in enumerate(zip(series, losses)):
        aligned = {p: _at(s.get(p), steps, interpolate=False) for p in paths}
        aligned_err = {p: _at(_errors_of(s.get(p)), steps, interpolate=False) for p in paths}
        for j, level in enumerate(axis):
            hit = _first_passage(loss, level)
            if hit is None:
                continue
            i, w = hit
            lo_i = max(i - 1, 0)
            steps_at[k, j] = steps[lo_i] + w * (steps[i] - steps[lo_i])
            for p in paths:
                a, b = aligned[p][lo_i], aligned[p][i]
                values[p][k, j] = b if w == 1.0 else a if w == 0.0 else a + w * (b - a)
                ea, eb = aligned_err[p][lo_i], aligned_err[p][i]
                errors[p][k, j] = eb if w == 1.0 else ea if w == 0.0 else max(ea, eb)  # the larger bracket: no less
    return axis, values, steps_at, {p: e for p, e in errors.items() if np.isfinite(e).any()}


def compare_runs(runs: Sequence[RunLike], *, by: str = "step", metrics: Sequence[str] | None = None,
                 levels: int = 8) -> Comparison:
    """Match ``runs`` by ``"step"`` or ``"loss"`` (module docstring) and collect ``metrics`` on that axis.

    ``metrics``: metric names (``rmed``: its rows), dotted values (``rmed.rmed_q99``, ``loss``) or one
    parameter block's value (``rmed[layer1.0.weight]``, ``rmed[layer1.0.weight].rmed``); default every run's
    headline rows. ``levels``: loss levels for ``by="loss"``.
    """
    if by not in ("step", "loss"):
        raise ConfigurationError(f"compare_runs: by must be 'step' or 'loss', got {by!r}")
    if len(runs) < 1:
        raise ConfigurationError("compare_runs: give at least one run")
    readers = [open_run(r) for r in runs]
    names = _names(readers)
    records = [placed_records(r) for r in readers]
    series = [{**collect_series(rec, every_leaf=True), **_block_paths(rec)} for rec in records]
    headline = [collect_series(rec) for rec in records]
    paths = _select(metrics, series, headline) if metrics else \
        [p for p in dict.fromkeys(p for h in headline for p in h) if p != "lr" and not (by == "loss" and p == "loss")]
    labels = {p: next(s[p].label for s in headline + series if p in s) for p in paths}
    optimizers = [r.meta.get("optimizer") for r in readers]
    notes = probe_differences([r.meta for r in readers], names)
    if by == "loss":
        axis, values, steps_at, errors = _by_loss(series, names, paths, levels)
        return Comparison("loss", names, optimizers, axis, values, labels, steps_at, True, paths, notes, errors)
    step_sets = [set(int(r["step"]) for r in rec if isinstance(r.get("step"), int)) for rec in records]
    if not all(step_sets):
        empty = [n for n, s in zip(names, step_sets) if not s]
        raise ConfigurationError(f"run(s) {', '.join(empty)} hold no probes yet; nothing to compare")
    common = sorted(set.intersection(*step_sets))
    interpolate = not common
    if interpolate:
        lo, hi = max(min(s) for s in step_sets), min(max(s) for s in step_sets)
        common = [s for s in sorted(step_sets[0]) if lo <= s <= hi]
        if not common:
            raise ConfigurationError("the runs probed disjoint step ranges; compare them --by loss")
    axis = np.asarray(common, dtype=np.int64)
    values = {p: np.stack([_at(s.get(p), axis, interpolate) for s in series]) for p in paths}
    errors = {p: np.stack([_at(_errors_of(s.get(p)), axis, interpolate) for s in series]) for p in paths}
    errors = {p: e for p, e in errors.items() if np.isfinite(e).any()}
    return Comparison("step", names, optimizers, axis, values, labels, None, interpolate, paths, notes, errors)


def _thin(n: int) -> list[int]:
    if n <= MAX_ROWS:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, MAX_ROWS).round().astype(int).tolist()))


def render_comparison(cmp: Comparison, console: Console) -> None:
    """One table per value: rows along the axis (thinned to :data:`MAX_ROWS`), one column per run. (The
    warnings in ``cmp.warnings`` are the caller's to show: the CLI prints them on stderr.)"""
    heads = [f"{n} ({o})" if o else n for n, o in zip(cmp.runs, cmp.optimizers)]
    rows = _thin(len(cmp.axis))
    axis_name = "loss" if cmp.by == "loss" else "step"
    note = " (interpolated)" if cmp.interpolated else ""
    if cmp.steps_at is not None:
        console.print(Text(f"Step at which each run first reached the loss{note}", style="italic"))
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column(axis_name, justify="right")
        for h in heads:
            table.add_column(Text(h), justify="right")
        for j in rows:
            add_row(table, fmt(cmp.axis[j]), *(fmt(round(s[j])) if math.isfinite(s[j]) else "—" for s in cmp.steps_at))
        console.print(table)
    for p in cmp.paths:
        # the title as a line of its own: a table's title wraps to the table's width, even on a pipe
        console.print(Text(f"{cmp.labels[p]} ({p}) by {axis_name}{note}", style="italic"))
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column(axis_name, justify="right")
        for h in heads:
            table.add_column(Text(h), justify="right")
        errs = cmp.errors.get(p)
        loose = False
        for j in rows:
            cells = []
            for k, v in enumerate(cmp.values[p]):
                e = errs[k][j] if errs is not None else None
                mark = unresolved(v[j], e)
                loose = loose or mark
                cells.append(Text(fmt(v[j]) + (" ?" if mark else ""), style="dim" if mark else ""))
            add_row(table, fmt(cmp.axis[j]), *cells)
        console.print(table)
        if loose:
            console.print(Text(UNRESOLVED_LEGEND, style="dim"))
