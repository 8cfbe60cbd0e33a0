"""A PNG of a run's values against the step, one panel per value, error bands where errors are reported.

matplotlib is imported inside :func:`plot_run`, never at module import, and drawing goes through
``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no global backend switch, no window, so it is
safe inside a notebook or a training script that uses another backend. The sharpness panel (``λ_max``, or
the preconditioned one for adaptive optimizers) also shows the edge-of-stability threshold when it applies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..trajectory.edge_of_stability import edge_of_stability
from ._format import UNRESOLVED_FRACTION
from .compare import Comparison
from .document import RunLike, open_run, placed_records
from .summary import collect_series

__all__ = ["LOG_SCALE_SPAN", "MAX_PANELS", "panel_note", "plot_comparison", "plot_run"]

MAX_PANELS = 12        # more values than this: the first 12 (loss and the headline metrics come first)
LOG_SCALE_SPAN = 100.0  # a positive value spanning more than this factor gets a log axis
_COLUMNS = 3
_OVERLAYS = {"diagshare.diagshare": ("diagshare.wigner", "diagshare.ols")}


def _target(path: str | os.PathLike[str], overwrite: bool) -> Path:
    target = Path(path)
    if target.is_dir():
        raise ConfigurationError(f"{str(target)!r} is a folder; give a file name such as {str(target / 'run.png')!r}")
    if target.exists() and not overwrite:
        raise ConfigurationError(f"figure {str(target)!r} already exists; pass overwrite=True (--force) to replace it "
                                 "or choose another path")
    if not target.parent.is_dir():
        raise ConfigurationError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist")
    return target


def panel_note(shown: int, total: int, left_out: Sequence[str]) -> str:
    """What the figure says when it shows only some of the run's values (empty when it shows them all).

    >>> panel_note(12, 14, ["noise.snr", "trace.trace"])
    'showing 12 of 14 values; not shown: noise.snr, trace.trace (choose with --metric)'
    """
    if shown >= total:
        return ""
    names = ", ".join(left_out[:6]) + (", …" if len(left_out) > 6 else "")
    return f"showing {shown} of {total} values; not shown: {names} (choose with --metric)"


def plot_run(run: RunLike, path: str | os.PathLike[str], *, metrics: Sequence[str] | None = None,
             overwrite: bool = False, dpi: int = 110) -> Path:
    """Draw ``run``'s series (default: the report's rows; or the dotted ``metrics``) against the step and
    save a PNG at ``path``; returns the path. An existing file is refused unless ``overwrite``. Points whose
    error exceeds half their value are hollow; when not every value fits (:data:`MAX_PANELS`) the figure says
    which are left out (also in the PNG's ``Description``, and in :func:`panel_note`)."""
    target = _target(path, overwrite)
    reader = open_run(run)
    records = placed_records(reader)
    if not records:
        raise ConfigurationError(f"run {str(reader.run_dir)!r} holds no probes yet; nothing to plot")
    series = collect_series(records, every_leaf=bool(metrics))
    if metrics:
        missing = [m for m in metrics if m not in series]
        if missing:
            raise ConfigurationError(f"no value named {', '.join(missing)} in the run; present: {', '.join(series)}")
        series = {m: series[m] for m in metrics}
    eos = edge_of_stability(records, reader.meta)
    threshold_panel = None
    if eos.applicable and len(eos.steps):
        threshold_panel = "precond.lambda_max" if eos.rule != "sgd" else "spectrum.lambda_max"
    # Baselines are drawn as reference lines in their metric's panel rather than as panels of their own.
    overlaid = {p for host, refs in _OVERLAYS.items() if host in series for p in refs}
    candidates = [s for p, s in series.items() if metrics or p not in overlaid]
    chosen = candidates[:MAX_PANELS]
    if threshold_panel in series and series[threshold_panel] not in chosen:
        chosen[-1] = series[threshold_panel]  # the edge of stability is worth a panel more than the last value
    note = panel_note(len(chosen), len(candidates), [s.path for s in candidates if s not in chosen])

    if not chosen:
        failed = sum(1 for r in records if r.get("errors"))
        raise ConfigurationError(
            f"run {str(reader.run_dir)!r} has no value to plot: "
            + (f"every one of its {failed} probes failed (see their errors with `geomprobe report`)"
               if failed == len(records) and records else "its records hold no measured values")
        )


    footer = [note] if note else []
    if any(_loose(s).any() for s in chosen):
        footer.append(UNRESOLVED_NOTE)
    cols = min(_COLUMNS, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes, height = _panel_grid(rows, cols, len(footer))
    for ax, s in zip(axes.flat, chosen):
        ok = np.isfinite(s.values)
        line = ax.plot(s.steps[ok], s.values[ok], marker="o", markersize=3, linewidth=1.2)[0]
        if s.errors is not None:
            e = np.where(np.isfinite(s.errors), s.errors, 0.0)[ok]
            ax.fill_between(s.steps[ok], s.values[ok] - e, s.values[ok] + e, alpha=0.25, linewidth=0)
        _hollow(ax, s.steps[ok], s.values[ok], _loose(s)[ok], line.get_color())
        for ref, style in zip(_OVERLAYS.get(s.path, ()), (":", "-.")):
            if ref in series:
                r = series[ref]
                ax.plot(r.steps, r.values, linestyle=style, color="gray", linewidth=1, label=r.label.strip())
                ax.legend(fontsize=7, loc="best")
        if s.path == threshold_panel:
            ax.plot(eos.steps, eos.threshold - eos.weight_decay, linestyle="--", color="tab:red", linewidth=1,
                    label="stability edge")
            ax.legend(fontsize=7, loc="best")
        positive = s.values[ok]
        if len(positive) and (positive > 0).all() and positive.max() / positive.min() > LOG_SCALE_SPAN:
            ax.set_yscale("log")
        ax.set_title(s.label.strip(), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    title = reader.meta.get("model") or reader.run_dir.name
    fig.suptitle(f"{title} · {reader.meta.get('optimizer') or 'no optimizer'} · {reader.run_dir.name}", fontsize=10,
                 y=1 - 0.15 / height, va="top")
    _footer(fig, footer, height)
    _save(fig, target, dpi, " · ".join(footer) or "all values shown")
    return target


UNRESOLVED_NOTE = f"hollow: unresolved, error above {100 * UNRESOLVED_FRACTION:g} % of the value"


def _loose(s) -> np.ndarray:
    """Where a series' error exceeds half its value (all False without errors)."""
    if s.errors is None:
        return np.zeros(len(s.values), dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.isfinite(s.errors) & (s.errors > UNRESOLVED_FRACTION * np.abs(s.values))


def _hollow(ax, x: np.ndarray, y: np.ndarray, loose: np.ndarray, color: str) -> None:
    # hollow markers over the line's: those values are not resolved by their own error
    if loose.any():
        ax.plot(x[loose], y[loose], linestyle="none", marker="o", markersize=6, markerfacecolor="white",
                color=color, label="unresolved")
        ax.legend(fontsize=7, loc="best")


def _footer(fig, lines: list[str], height: float) -> None:
    for i, line in enumerate(lines):
        fig.text(0.01, (0.08 + 0.2 * (len(lines) - 1 - i)) / height, line, fontsize=7,
                 color="tab:red" if line.startswith("warning") else "dimgray", ha="left", va="bottom")


def _save(fig, target: Path, dpi: int, description: str) -> None:
    # Written beside the target and renamed, so a failed save never leaves half a PNG under the asked name.
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Description": description})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def plot_comparison(cmp: Comparison, path: str | os.PathLike[str], *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Draw a :class:`~.compare.Comparison`: one panel per value, one line per run, against the step or the
    loss (log axis, falling to the right) it matched the runs at; the comparison's warnings (different probe
    modes or data) are printed under the panels. Returns the path; an existing file needs ``overwrite``."""
    target = _target(path, overwrite)
    if not cmp.paths:
        raise ConfigurationError("the comparison holds no values to plot")

    shown = cmp.paths[:MAX_PANELS]
    cols = min(_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / cols)
    loose = {p: np.isfinite(e) & (e > UNRESOLVED_FRACTION * np.abs(np.nan_to_num(cmp.values[p], nan=np.inf)))
             for p, e in cmp.errors.items()}
    footer = ([panel_note(len(shown), len(cmp.paths), cmp.paths[len(shown):])] if len(shown) < len(cmp.paths)
              else []) + ([UNRESOLVED_NOTE] if any(loose[p].any() for p in shown if p in loose) else []) \
        + [f"warning: {w}" for w in cmp.warnings]
    fig, axes, height = _panel_grid(rows, cols, len(footer))
    x = np.asarray(cmp.axis, dtype=np.float64)
    labels = [f"{n} ({o})" if o else n for n, o in zip(cmp.runs, cmp.optimizers)]
    for ax, p in zip(axes.flat, shown):
        for k, (label, values) in enumerate(zip(labels, cmp.values[p])):
            ok = np.isfinite(values)
            line = ax.plot(x[ok], values[ok], marker="o", markersize=3, linewidth=1.2, label=label)[0]
            if p in loose and loose[p][k].any():
                ax.plot(x[ok & loose[p][k]], values[ok & loose[p][k]], linestyle="none", marker="o", markersize=6,
                        color=line.get_color(), markerfacecolor="white")  # color: the next run keeps its own
        if cmp.by == "loss":
            if (x > 0).all():
                ax.set_xscale("log")
            ax.invert_xaxis()  # training goes from high loss to low
        ax.set_title(cmp.labels[p].strip(), fontsize=9)
        ax.set_xlabel(cmp.by + (" (interpolated)" if cmp.interpolated else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(" vs ".join(labels) + f" · by {cmp.by}", fontsize=10, y=1 - 0.15 / height, va="top")
    _footer(fig, footer, height)
    _save(fig, target, dpi, " · ".join(footer) or "all values shown")
    return target


def _panel_grid(rows: int, cols: int, footer_lines: int) -> tuple[Any, Any, float]:
    """A figure of ``rows x cols`` panels with room for ``footer_lines`` lines under them: (figure, axes,
    height in inches)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bottom = 0.5 + 0.2 * footer_lines  # inches under the panels: tick labels, then the footer's lines
    height = 2.8 * rows + bottom - 0.1
    fig = Figure(figsize=(4.2 * cols, height))
    FigureCanvasAgg(fig)
    # Fixed margins rather than a layout engine: constrained layout measures every tick label and doubles
    # the drawing time, for a grid whose label sizes are known in advance.
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw={"left": 0.22 / cols, "right": 0.98, "bottom": bottom / height,
                                     "top": 1 - 0.75 / height, "hspace": 0.6, "wspace": 0.3})
    return fig, axes, height
