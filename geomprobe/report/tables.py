"""Rich rendering of a run's report: header, one row per metric, per-block table, findings, cost footer.

Rendering reads the plain report of :func:`~geomprobe.report.document.build_report`, so what the terminal
shows and what ``--json`` prints never disagree.

>>> import tempfile
>>> from geomprobe.runs import RunWriter
>>> with tempfile.TemporaryDirectory() as tmp:
...     with RunWriter(tmp + "/run", {"model": "MLP", "parameters": 10, "optimizer": "SGD"}) as w:
...         for s in range(3):
...             _ = w.append({"step": s, "loss": 1.0 / (s + 1), "spectrum": {"lambda_max": 1.0 + s}})
...     text = report_text(tmp + "/run")
>>> "λ_max" in text and "▁▅█" in text and "MLP" in text
True
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ._format import UNRESOLVED_LEGEND, add_row, fmt, fmt_err, unresolved
from .document import RunLike, build_report
from .explain import explain_command

__all__ = ["render_report", "report_renderable", "print_report", "report_text"]

_MARK = {"warning": ("!", "bold yellow"), "note": ("•", "cyan"), "info": ("·", "dim")}
_DIRECTION = {"rising": "↑ rising", "falling": "↓ falling", "flat": "→ flat", "mixed": "~ mixed", None: ""}
# Hyperparameters every optimizer group carries that say nothing about its dynamics.
_QUIET_HPARAMS = {"foreach", "maximize", "capturable", "differentiable", "fused", "initial_lr",
                  "decoupled_weight_decay"}


def _hparams(groups: Any) -> str:
    if not isinstance(groups, list) or not groups:
        return ""
    first = groups[0] if isinstance(groups[0], Mapping) else {}
    shown = ", ".join(f"{k}={fmt(v, 4) if isinstance(v, (int, float)) and not isinstance(v, bool) else v}"
                      for k, v in first.items() if k not in _QUIET_HPARAMS and v is not None and v is not False)
    if len(groups) > 1:
        differ = any(g != first for g in groups[1:])
        shown += f"  ({len(groups)} param groups{', differing' if differ else ', alike'})"
    return shown


def _header(doc: Mapping[str, Any]) -> Table:
    h = doc["header"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    params = f"{h['parameters']:,} parameters" if isinstance(h.get("parameters"), int) else "parameters unknown"
    if isinstance(h.get("measured_parameters"), int) and h["measured_parameters"] != h.get("parameters"):
        params += f" ({h['measured_parameters']:,} measured)"
    add_row(grid, "run", doc["run"])
    add_row(grid, "model", f"{h.get('model') or 'unknown'} · {params} · {h.get('blocks', 0)} blocks"
                  + (f" · {h['device']} {h.get('dtype') or ''}" if h.get("device") else ""))
    add_row(grid, "optimizer", f"{h.get('optimizer') or 'none recorded'}  {_hparams(h.get('optimizer_hparams'))}")
    p = h.get("probe") or {}
    policy = [f"mode {p['mode']}" if p.get("mode") else None,
              f"metrics {', '.join(map(str, p['metrics']))}" if p.get("metrics") else None,
              f"schedule {p['schedule']}" if p.get("schedule") else None,
              f"{p['batches']} batches" if p.get("batches") is not None else None,
              f"seed {p['seed']}" if p.get("seed") is not None else None]
    add_row(grid, "probe", " · ".join(x for x in policy if x) or "policy not recorded")
    steps = doc.get("steps")
    add_row(grid, "probes", probes_text(doc) + (f" · steps {steps[0]}–{steps[1]}" if steps else "")
            + (f"; {doc['unplaced_records']} record(s) without an integer step left out"
               if doc.get("unplaced_records") else ""))
    return grid


def probes_text(doc: Mapping[str, Any]) -> str:
    """``1 of 11 scheduled (10 skipped: overhead budget 5 %)``, or the probe count alone when none was skipped.

    >>> probes_text({"probes": 1, "schedule": {"scheduled": 11, "skipped": 10, "final": 0,
    ...                                         "skipped_by": {"overhead budget 5 %": 10}}})
    '1 of 11 scheduled (10 skipped: overhead budget 5 %)'
    >>> probes_text({"probes": 2, "schedule": {"scheduled": 1, "skipped": 0, "final": 1, "skipped_by": {}}})
    '2 (1 at the end of training)'
    """
    n, s = doc["probes"], doc.get("schedule") or {}
    scheduled, skipped, final = s.get("scheduled", 0), s.get("skipped", 0), s.get("final", 0)
    why = ", ".join(f"{reason}" if count == skipped else f"{reason} ×{count}"
                    for reason, count in (s.get("skipped_by") or {}).items())
    skips = f"{skipped} skipped: {why}" if skipped else ""
    if skipped and not final and n == scheduled - skipped:
        return f"{n} of {scheduled} scheduled ({skips})"
    parts = [f"{scheduled - skipped} of {scheduled} scheduled, {skips}" if skipped else "",
             f"{final} at the end of training" if final else ""]
    detail = "; ".join(p for p in parts if p)
    return f"{n} ({detail})" if detail else f"{n}"


def _cell(s: Mapping[str, Any], which: str) -> Text:
    """``value ± error`` of the series' first or last value, dim when unresolved."""
    x, e = s.get(which), s.get(f"{which}_err")
    return Text(fmt_err(x, e), style="dim" if unresolved(x, e) else "")


def _any_unresolved(summaries: Any) -> bool:
    return any(unresolved(s.get(w), s.get(f"{w}_err")) for s in summaries for w in ("first", "last"))


def _metrics_table(doc: Mapping[str, Any]) -> Group | Text:
    rows = [(path, s) for path, s in doc["metrics"].items() if s.get("headline", True)]
    if not rows:
        return Text("No probes recorded yet." if not doc["probes"] else "No numeric values in the records.")
    table = Table(box=box.SIMPLE_HEAD)
    for name, justify in (("metric", "left"), ("first", "right"), ("last", "right"), ("min", "right"),
                          ("max", "right"), ("trend", "left"), ("along steps", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # a value and its error never break across lines
    for path, s in rows:
        add_row(table, s.get("label") or path, _cell(s, "first"), _cell(s, "last"), fmt(s.get("min")), fmt(s.get("max")),
                      _DIRECTION.get(s.get("direction"), ""), s.get("sparkline", ""))
    legend = [UNRESOLVED_LEGEND] if _any_unresolved(s for _, s in rows) else []
    return _titled("Geometry along the run", table, legend)


def _titled(title: str, table: Table, notes: list[str]) -> Group:
    # Title and notes as lines of their own, not the table's title and caption, which rich wraps to the
    # table's width: on a pipe a line is never wrapped, on a terminal it wraps at the terminal's width.
    return Group(Text(title, style="italic"), table, *(Text(n, style="dim") for n in notes))


def _blocks_table(doc: Mapping[str, Any]) -> Group | Text:
    # Long format (one row per value and block) so any number of metrics and blocks fits the width.
    blocks = doc.get("blocks") or {}
    paths = list(dict.fromkeys(p for series in blocks.values() for p in series))
    if not paths:
        return Text("No per-block values in the records (metrics with blocks: rmed, diagshare, noise, precond).")
    sizes = doc["header"].get("block_sizes") or {}
    table = Table(box=box.SIMPLE_HEAD)
    for name, justify in (("value", "left"), ("block", "left"), ("size", "right"), ("first", "right"),
                          ("last", "right"), ("trend", "left"), ("along steps", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # block names and "x ± e" stay whole
    for path in paths:
        rows = [(name, series[path]) for name, series in blocks.items() if path in series]
        for i, (name, s) in enumerate(rows):
            add_row(table, path if i == 0 else "", name, fmt(sizes.get(name)),
                    _cell(s, "first"), _cell(s, "last"),
                    _DIRECTION.get(s.get("direction"), ""), s.get("sparkline", ""), end_section=i == len(rows) - 1)
    notes = [UNRESOLVED_LEGEND] if _any_unresolved(s for series in blocks.values() for s in series.values()) else []
    for path, names in (doc.get("blocks_dropped") or {}).items():
        notes.append(f"not shown, {path} never finite: {', '.join(names)}")
    return _titled("Per block", table, notes)


def _findings(doc: Mapping[str, Any]) -> Group:
    # A grid keeps a wrapped finding indented under its own text rather than under the marker.
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for f in doc["findings"]:
        mark, style = _MARK.get(f["level"], ("·", ""))
        add_row(grid, Text(f" {mark}", style=style), Text(f["text"]))
    if not doc["findings"]:
        add_row(grid, Text(" ·"), Text("nothing to report"))
    return Group(Text("Findings", style="bold"), grid)


def _cost(doc: Mapping[str, Any]) -> Text:
    c = doc["cost"]
    parts = [f"{c['hvps']:,} HVPs", f"{fmt(c['seconds'], 3)} s probing over {c['probes']} probes"]
    if c.get("overhead") is not None:
        parts.append(f"{100 * c['overhead']:.1f} % of wall time")
    if c.get("peak_mib") is not None:
        parts.append(f"peak {fmt(c['peak_mib'], 4)} MiB")
    return Text("Cost: " + " · ".join(parts), style="dim")


def _explained(doc: Mapping[str, Any]) -> list[Text]:
    """A pointer under the table to what its rows mean (``geomprobe explain NAME``, docs/metrics.md)."""
    names = [path.split(".")[0] for path, s in doc["metrics"].items() if s.get("headline", True)]
    line = explain_command(names)
    return [Text(line, style="dim")] if line else []


def report_renderable(doc: Mapping[str, Any], *, per_layer: bool = False) -> Group:
    """The report as one rich renderable (header, metrics, optional blocks, findings, cost)."""
    parts: list[Any] = [_header(doc), Text(""), _metrics_table(doc), *_explained(doc)]
    if per_layer:
        parts += [_blocks_table(doc)]
    parts += [_findings(doc), Text(""), _cost(doc)]
    return Group(*parts)


def render_report(doc: Mapping[str, Any], console: Console, *, per_layer: bool = False) -> None:
    """Print a report built by :func:`build_report` (with ``per_layer`` for the block table) to ``console``."""
    console.print(report_renderable(doc, per_layer=per_layer))


def print_report(run: RunLike, *, per_layer: bool = False, console: Console | None = None) -> None:
    """Build and print the report of ``run`` (a path or a RunReader) to ``console`` (default: stdout)."""
    render_report(build_report(run, per_layer=per_layer), console or Console(), per_layer=per_layer)


def report_text(run: RunLike, *, per_layer: bool = False, width: int = 120) -> str:
    """The report as plain text (no colour), ``width`` characters wide."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, force_terminal=False, highlight=False)
    print_report(run, per_layer=per_layer, console=console)
    return buf.getvalue()
