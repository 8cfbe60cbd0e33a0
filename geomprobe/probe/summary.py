"""What one probe record says in a few numbers: the scalars a trainer's loggers receive, and the one-line
summary :class:`~.geometry_probe.GeometryProbe` prints after each probe when asked (``summary=``).

>>> rec = {"step": 40, "time": 1.7e9, "wall": 3.0, "loss": 0.5, "grad_norm": 0.25,
...        "spectrum": {"lambda_max": 12.5, "lambda_max_err": 0.01, "lambda_min": -0.2, "lambda_min_err": 0.003,
...                     "converged": True, "top": [12.5], "blocks": {"w": {"lambda_max": 3.0}}},
...        "rmed": {"rmed": 7.25, "rmed_err": 0.0}, "cost": {"hvps": 96, "seconds": 0.25, "chunk_size": 16}}
>>> probe_scalars(rec)["geomprobe/spectrum/lambda_max"], sorted(probe_scalars(rec))[:3]
(12.5, ['geomprobe/cost/hvps', 'geomprobe/cost/seconds', 'geomprobe/grad_norm'])
>>> summary_line(rec)
'geomprobe step 40: loss 0.5, lambda_max 12.5 +-0.01, lambda_min -0.2 +-0.003, R_med 7.25; 96 HVPs in 0.25 s'
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ..errors import ConfigurationError

__all__ = ["DEFAULT_PREFIX", "LINE_FIELDS", "probe_scalars", "resolve_summary", "summary_line"]

DEFAULT_PREFIX = "geomprobe/"

# Top-level record keys that are not a metric's result.
NOT_METRICS = frozenset({"step", "time", "wall", "loss", "grad_norm", "lr", "cost", "errors", "skipped",
                         "approximate_hvp"})
# Counts that say how a value was computed, not what it is: left out of a custom metric's line fields.
_BOOKKEEPING = frozenset({"hvps", "steps", "samples", "size", "computed", "columns", "d", "n", "budget"})

# The headline values of the built-in metrics on the summary line: (key, label). ASCII labels, so the line
# survives any terminal or log file encoding.
LINE_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "spectrum": (("lambda_max", "lambda_max"), ("lambda_min", "lambda_min")),
    "rmed": (("rmed", "R_med"),),
    "diagshare": (("diagshare", "diagshare"),),
    "trace": (("trace", "trace"),),
    "density": (("negative_mass", "negative_mass"),),
    "precond": (("lambda_max", "precond lambda_max"), ("rmed", "precond R_med")),
    "noise": (("alpha_standardized", "alpha"), ("noise_scale", "noise_scale")),
    "isotropy": (("cv", "noise_cv"),),
    "precision": (("hvp_rel_err", "hvp_rel_err"),),
    "saddle": (("saddle", "saddle"),),
}


def _number(value: Any) -> float | None:
    """A record leaf as a float (a bool as 0/1), or None when it is not a number."""
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _metric_names(record: Mapping[str, Any]) -> list[str]:
    return [k for k, v in record.items() if k not in NOT_METRICS and isinstance(v, Mapping)]


def probe_scalars(record: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """The scalars of one probe record for a trainer's loggers, under ``prefix``: ``loss``, ``grad_norm``,
    every numeric value at the top level of each metric's result (``spectrum/lambda_max``, its
    ``lambda_max_err``, ``converged`` as 0/1, ...; per-block values and lists are left to the run log, which
    holds everything) and the probe's ``cost/hvps`` and ``cost/seconds``. Non-finite values are kept: a
    diverged value should be seen. Costs nothing (no HVPs)."""
    out: dict[str, float] = {}
    for key in ("loss", "grad_norm"):
        x = _number(record.get(key))
        if x is not None:
            out[prefix + key] = x
    for name in _metric_names(record):
        for key, value in record[name].items():
            x = _number(value)
            if x is not None:
                out[f"{prefix}{name}/{key}"] = x
    cost = record.get("cost")
    if isinstance(cost, Mapping):
        for key in ("hvps", "seconds"):
            x = _number(cost.get(key))
            if x is not None:
                out[f"{prefix}cost/{key}"] = x
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _line_fields(name: str, result: Mapping[str, Any]) -> list[tuple[str, str]]:
    if name in LINE_FIELDS:
        return [(k, label) for k, label in LINE_FIELDS[name] if k in result]
    # a custom metric: its first two values that are neither errors, flags nor bookkeeping
    keys = [k for k, v in result.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)
            and not k.endswith("_err") and k not in _BOOKKEEPING]
    return [(k, f"{name}.{k}") for k in keys[:2]]


def summary_line(record: Mapping[str, Any]) -> str:
    """One line for one probe: the loss, each metric's headline values with their errors (``+-``), a mark on
    a result that did not converge, the parts that failed or were skipped, and the probe's HVPs and seconds.
    Costs nothing (no HVPs)."""
    parts: list[str] = []
    loss = _number(record.get("loss"))
    if loss is not None:
        parts.append(f"loss {_fmt(loss)}")
    for name in _metric_names(record):
        result = record[name]
        fields = _line_fields(name, result)
        for key, label in fields:
            value = result[key]
            if isinstance(value, str):
                parts.append(f"{label} {value}")
                continue
            x = _number(value)
            if x is None:
                continue
            err = _number(result.get(f"{key}_err"))
            text = f"{label} {_fmt(x)}"
            if err is not None and math.isfinite(err) and err > 0:
                text += f" +-{err:.2g}"
            parts.append(text)
        if fields and result.get("converged") is False:
            parts[-1] += " (not converged)"
    line = f"geomprobe step {record.get('step')}: " + (", ".join(parts) if parts else "no values")
    for key, word in (("errors", "failed"), ("skipped", "skipped")):
        if isinstance(record.get(key), Mapping) and record[key]:
            line += f"; {word}: {', '.join(map(str, record[key]))}"
    cost = record.get("cost")
    if isinstance(cost, Mapping) and _number(cost.get("hvps")) is not None and _number(cost.get("seconds")) is not None:
        line += f"; {int(cost['hvps'])} HVPs in {cost['seconds']:.2f} s"
    return line


class _LinePrinter:
    """Writes each probe's line to a stream (default: stderr, looked up at each probe so a redirected
    ``sys.stderr`` is followed) or hands it to a callable. A failure is warned about once and never raised:
    a probe never kills training."""

    def __init__(self, target: TextIO | Callable[[str], Any] | None):
        self.target = target
        self._failed = False

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self._failed:
            return
        try:
            line = summary_line(record)
            target = self.target if self.target is not None else sys.stderr
            if hasattr(target, "write"):
                target.write(line + "\n")
                if hasattr(target, "flush"):
                    target.flush()
            else:
                target(line)
        except Exception as e:
            self._failed = True
            warnings.warn(f"geomprobe: printing the probe summary failed ({type(e).__name__}: {e}); no more "
                          "summary lines are printed, the records are unaffected", RuntimeWarning, stacklevel=2)


def resolve_summary(summary: Any) -> Callable[[Mapping[str, Any]], None] | None:
    """The printer for GeometryProbe's ``summary=`` option: ``False``/``None`` prints nothing, ``True`` one
    line per probe on stderr, a text stream (anything with ``write``) receives the lines, a callable is
    called with each line (``logger.info``)."""
    if summary is None or summary is False:
        return None
    if summary is True:
        return _LinePrinter(None)
    if hasattr(summary, "write") or callable(summary):
        return _LinePrinter(summary)
    raise ConfigurationError(
        f"summary must be True/False, a text stream or a callable taking a line, got {type(summary).__name__} "
        f"{summary!r}; pass summary=True for one line per probe on stderr"
    )
