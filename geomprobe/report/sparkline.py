"""Unicode sparklines: a series as a row of block characters, one per probe (or per bin of probes).

Missing values (NaN, None) show as ``·`` so a gap in a series stays visible; ``+inf`` and ``-inf`` show as
``↑`` and ``↓``. A series of positive values spanning more than :data:`LOG_SPAN` (a factor of 100) is drawn
on a log scale, since a ratio statistic such as R_med growing from 10 to 10 000 would otherwise be flat
until its last probe.

>>> sparkline([1, 2, 3, 4, 5, 6, 7, 8])
'▁▂▃▄▅▆▇█'
>>> sparkline([1.0, float("nan"), 3.0, float("inf")])
'▁·█↑'
>>> sparkline([5, 5, 5])
'▄▄▄'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["sparkline", "BARS", "MISSING", "LOG_SPAN"]

BARS = "▁▂▃▄▅▆▇█"
MISSING = "·"
LOG_SPAN = 100.0


def _as_floats(values: Iterable[Any]) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(math.nan if v is None or isinstance(v, bool) else float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def _bin(values: np.ndarray, width: int) -> np.ndarray:
    """Average ``values`` into ``width`` consecutive bins (finite entries only; a bin with none stays NaN,
    a bin holding an infinity keeps it)."""
    edges = np.linspace(0, len(values), width + 1).round().astype(int)
    out = np.full(width, math.nan)
    for k in range(width):
        chunk = values[edges[k] : edges[k + 1]]
        finite = chunk[np.isfinite(chunk)]
        if len(finite):
            out[k] = finite.mean()
        elif np.isinf(chunk).any():
            out[k] = chunk[np.isinf(chunk)][0]
    return out


def sparkline(values: Iterable[Any], width: int | None = None, *, log: bool | None = None) -> str:
    """One character per value (``width`` caps the length by averaging neighbours into bins).

    ``log``: None chooses a log scale for positive series spanning more than :data:`LOG_SPAN`.
    """
    x = _as_floats(values)
    if width is not None and width > 0 and len(x) > width:
        x = _bin(x, width)
    finite = np.isfinite(x)
    if not finite.any():
        return "".join(MISSING if math.isnan(v) else ("↑" if v > 0 else "↓") for v in x)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if log is None:
        log = lo > 0 and hi / lo > LOG_SPAN
    scaled = np.where(finite, x, 0.0)
    if log and lo > 0:
        scaled = np.log(np.where(finite & (x > 0), x, lo))
        lo, hi = math.log(lo), math.log(hi)
    chars = []
    for v, s, ok in zip(x, scaled, finite):
        if not ok:
            chars.append(MISSING if math.isnan(v) else ("↑" if v > 0 else "↓"))
        elif hi == lo:
            chars.append(BARS[len(BARS) // 2 - 1])
        else:
            level = int((s - lo) / (hi - lo) * (len(BARS) - 1) + 0.5)
            chars.append(BARS[min(max(level, 0), len(BARS) - 1)])
    return "".join(chars)
