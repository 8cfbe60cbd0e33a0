"""Figures of the landscape views a run holds: line plots (loss beside its quadratic model), contour plots of
planes with the trajectory projected onto them, and interpolations between checkpoints.

Views are stored in records under ``view_line``, ``view_plane``, ``view_interpolate`` and ``view_trajectory``
(by a :class:`GeometryProbe` with the ``view_line``/``view_plane`` entries, or by ``geomprobe view``), their
grids in sidecar files. Drawing goes through matplotlib's ``Figure`` with the Agg canvas (no pyplot, no
global backend), imported only when a figure is drawn.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..runs.encoding import ARRAY_KEY
from ..runs.reader import RunReader
from .document import RunLike, open_run, placed_records
from .figures import _target

__all__ = ["VIEW_KEYS", "view_entries", "has_views", "plot_views", "MAX_VIEW_PANELS"]

VIEW_KEYS = ("view_line", "view_plane", "view_interpolate", "view_trajectory")
MAX_VIEW_PANELS = 12  # the latest views when a run holds more
_TITLES = {"view_line": "line", "view_plane": "plane", "view_interpolate": "interpolation",
           "view_trajectory": "trajectory (PCA plane)"}


def _resolve(reader: RunReader, value: Any) -> Any:
    if isinstance(value, dict):
        if isinstance(value.get(ARRAY_KEY), str):
            return reader.load_array(value)
        return {k: _resolve(reader, v) for k, v in value.items()}
    return value


def view_entries(run: RunLike) -> list[tuple[int, str, dict]]:
    """``(step, key, view)`` for every view in the run, in record order, sidecar arrays loaded."""
    reader = open_run(run)
    out = []
    for record in placed_records(reader):
        for key in VIEW_KEYS:
            if isinstance(record.get(key), dict) and "loss" in record[key]:
                out.append((record["step"], key, _resolve(reader, record[key])))
    return out


def has_views(run: RunLike) -> bool:
    """Whether any record of the run holds a landscape view."""
    reader = open_run(run)
    return any(isinstance(r.get(k), dict) for r in placed_records(reader) for k in VIEW_KEYS)


def _levels(z: np.ndarray, n: int = 20) -> np.ndarray | None:
    finite = z[np.isfinite(z)]
    if finite.size < 2 or finite.max() <= finite.min():
        return None
    # up to the 95th percentile: a divergent corner of the grid must not flatten the contours elsewhere
    top = np.percentile(finite, 95) if finite.size > 20 else finite.max()
    return np.linspace(finite.min(), max(top, finite.min() + 1e-12), n)


def _direction_text(view: dict) -> str:
    return str(view.get("direction", "")) + (f" ({view['normalize']})" if view.get("normalize") else "")


def _draw_line(ax: Any, view: dict) -> None:
    t, loss = np.asarray(view["t"], float), np.asarray(view["loss"], float)
    ax.plot(t, loss, marker="o", markersize=2.5, linewidth=1.2, label="loss")
    if "quadratic" in view:
        ax.plot(t, np.asarray(view["quadratic"], float), linestyle="--", color="tab:gray", linewidth=1,
                label="quadratic model")
    ax.axvline(0.0, color="k", linewidth=0.5, alpha=0.4)
    ax.set_xlabel(f"t along {_direction_text(view)}", fontsize=8)
    ax.legend(fontsize=7, loc="best")


def _draw_contour(ax: Any, view: dict) -> None:
    x, y = np.asarray(view["x"], float), np.asarray(view["y"], float)
    z = np.ma.masked_invalid(np.asarray(view["loss"], float))
    levels = _levels(np.asarray(view["loss"], float))
    if levels is not None:
        filled = ax.contourf(x, y, np.ma.minimum(z, levels[-1]), levels=levels, cmap="viridis")
        ax.figure.colorbar(filled, ax=ax, fraction=0.046, pad=0.03, format="%.4g").ax.tick_params(labelsize=6)
        if "quadratic" in view:
            ax.contour(x, y, np.asarray(view["quadratic"], float), levels=levels[::3], colors="w",
                       linestyles="--", linewidths=0.6)
    if "path" in view:
        path = np.asarray(view["path"], float)
        ax.plot(path[:, 0], path[:, 1], color="tab:red", marker="o", markersize=3, linewidth=1.2, label="path")
        ax.plot(path[-1:, 0], path[-1:, 1], color="tab:red", marker="*", markersize=9)
        explained = view.get("explained")
        if explained:
            ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f} %)", fontsize=8)
            ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f} %)", fontsize=8)
    else:
        ax.plot([0.0], [0.0], color="tab:red", marker="*", markersize=9)
        u, v = view.get("u", {}), view.get("v", {})
        ax.set_xlabel(_direction_text(u) if isinstance(u, dict) else "u", fontsize=8)
        ax.set_ylabel(_direction_text(v) if isinstance(v, dict) else "v", fontsize=8)


def _draw_interpolation(ax: Any, view: dict) -> None:
    t, loss = np.asarray(view["t"], float), np.asarray(view["loss"], float)
    ax.plot(t, loss, linewidth=1.2)
    ends = view.get("ends") or []
    knots = np.arange(len(ends), dtype=float)
    ax.plot(knots, ends, linestyle="none", marker="o", color="tab:red", markersize=4, label="checkpoints")
    ax.set_xlabel("t (checkpoint i at t = i)", fontsize=8)
    ax.legend(fontsize=7, loc="best")


_DRAW = {"view_line": _draw_line, "view_plane": _draw_contour, "view_interpolate": _draw_interpolation,
         "view_trajectory": _draw_contour}


def plot_views(run: RunLike, path: str | os.PathLike[str], *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Draw every landscape view of ``run`` (the latest :data:`MAX_VIEW_PANELS`), one panel each, into a PNG at
    ``path``; returns the path. An existing file is refused unless ``overwrite``."""
    target = _target(path, overwrite)
    reader = open_run(run)
    entries = view_entries(reader)
    if not entries:
        raise ConfigurationError(f"run {str(reader.run_dir)!r} holds no landscape views; measure some with "
                                 "`geomprobe view` or the view_line / view_plane probe entries")
    entries = entries[-MAX_VIEW_PANELS:]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(entries))
    rows = math.ceil(len(entries) / cols)
    height = 3.4 * rows + 0.4
    fig = Figure(figsize=(4.6 * cols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw={"left": 0.3 / cols, "right": 0.93, "bottom": 0.5 / height,
                                     "top": 1 - 0.75 / height, "hspace": 0.55, "wspace": 0.55})
    for ax, (step, key, view) in zip(axes.flat, entries):
        _DRAW[key](ax, view)
        ax.set_title(f"step {step}: {_TITLES[key]}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(entries):]:
        ax.set_visible(False)
    title = reader.meta.get("model") or reader.run_dir.name
    fig.suptitle(f"{title} · landscape views · {reader.run_dir.name}", fontsize=10, y=1 - 0.15 / height, va="top")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
