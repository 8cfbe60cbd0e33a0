"""Number formatting shared by the tables and the findings, and a JSON-safe copy of report data."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from .summary import UNRESOLVED_FRACTION

__all__ = ["fmt", "fmt_err", "fmt_steps", "jsonable", "add_row", "unresolved", "UNRESOLVED_FRACTION",
           "UNRESOLVED_LEGEND"]

SIGNIFICANT = 4  # digits shown for a value; its error gets 2
# A value whose reported error exceeds UNRESOLVED_FRACTION (50 %) of its size is unresolved: "39.36 ± 75" does
# not tell 39 from 0 or from 100, so tables show it dim with "?", figures hollow, and findings do not build on it.
UNRESOLVED_LEGEND = (f"? unresolved: the error exceeds {100 * UNRESOLVED_FRACTION:g} % of the value (shown dim); "
                     "read it as not measured, or probe with more HVPs")


def unresolved(x: Any, err: Any) -> bool:
    """Whether ``err`` exceeds :data:`UNRESOLVED_FRACTION` of ``|x|`` (False when either is missing).

    >>> unresolved(39.36, 75.0), unresolved(4755.0, 3.4e5), unresolved(3.0, 0.1), unresolved(2.0, None)
    (True, True, False, False)
    """
    try:
        v, e = float(x), float(err)
    except (TypeError, ValueError):
        return False
    if isinstance(x, bool) or isinstance(err, bool) or not (math.isfinite(v) and math.isfinite(e)):
        return False
    return e > UNRESOLVED_FRACTION * abs(v)


def fmt(x: Any, digits: int = SIGNIFICANT) -> str:
    """A number in at most ``digits`` significant digits; ``—`` for missing.

    >>> fmt(3.14159), fmt(123456.0), fmt(0.000123), fmt(None), fmt(float("inf")), fmt(12)
    ('3.142', '1.235e+05', '0.000123', '—', 'inf', '12')
    """
    if x is None or isinstance(x, bool):
        return "—" if x is None else str(x)
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if abs(int(x)) >= 10_000 else str(int(x))
    x = float(x)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-4 <= abs(x) < 10**digits:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def fmt_err(x: Any, err: Any = None) -> str:
    """``x ± err`` (the error in 2 significant digits), or ``x`` alone when there is no finite error; a
    trailing ``?`` marks an :func:`unresolved` value.

    >>> fmt_err(3.14159, 0.0123), fmt_err(2.0, None), fmt_err(2.0, 0.0), fmt_err(39.36, 75.0)
    ('3.142 ± 0.012', '2', '2 ± 0', '39.36 ± 75 ?')
    """
    text = fmt(x)
    if err is None or isinstance(err, bool) or x is None:
        return text
    try:
        e = float(err)
    except (TypeError, ValueError):
        return text
    if not math.isfinite(e):
        return text
    return f"{text} ± {fmt(e, 2)}" + (" ?" if unresolved(x, e) else "")


def fmt_steps(steps: list[int], limit: int = 6) -> str:
    """``0, 100, 200`` or ``0, 100, …, 900 (12 probes)`` when long.

    >>> fmt_steps([1, 2, 3]), fmt_steps(list(range(10)), limit=4)
    ('1, 2, 3', '0, 1, …, 9 (10 probes)')
    """
    if len(steps) <= limit:
        return ", ".join(str(s) for s in steps)
    return f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} probes)"


def jsonable(value: Any) -> Any:
    """A copy that strict JSON accepts: numpy to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def add_row(table: Table, *cells: Any, **options: Any) -> None:
    """``table.add_row`` with every string taken literally: run names, metric paths and labels may hold
    brackets that rich would otherwise read as markup (``rmed.blocks[0]``, ``runs/[a]``)."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **options)
