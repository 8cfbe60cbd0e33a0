"""The planned-cost table `probe`, `probe --dry-run` and `doctor` print: per metric the HVPs, gradients and
vector memory of its plan and, when one HVP was measured, an estimated time."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from geomprobe.probe.estimate import bytes_text, time_text
from geomprobe.probe.progress import planned_text

__all__ = ["plan_table", "estimate_note"]


def plan_table(plan: dict[str, dict], dim: int, dtype: str, estimate: dict[str, Any] | None = None) -> Table:
    """Each metric's planned HVPs, forward passes (a column only where a metric spends them), gradients and
    vector memory (``<=`` marks an iteration's upper bound), and
    its estimated time when ``estimate`` (:func:`geomprobe.probe.estimate.estimate_costs`) is given."""
    table = Table(title=f"planned cost per probe ({dim:,} parameters, {dtype})", title_justify="left")
    columns = [("metric", "left"), ("HVPs", "right"), ("gradients", "right"), ("vector memory", "right")]
    forwards = any(p.get("forwards") for p in plan.values())  # a column only when a view spends forward passes
    if forwards:
        columns.insert(2, ("forwards", "right"))
    if estimate is not None:
        columns.append(("est. time", "right"))
    for col, justify in columns + [("note", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, p in plan.items():
        row = [name, planned_text(p["hvps"], p["exact"]),
               str(p["gradients"] or 0) if p["hvps"] is not None else "?", bytes_text(p["vector_bytes"])]
        if forwards:
            row.insert(2, "?" if p.get("forwards") is None else str(p["forwards"]))
        if estimate is not None:
            row.append(time_text(estimate["metrics"][name]["seconds"], p["exact"]))
        # a part another metric of the probe computes is counted there: say which (metrics/shared.py)
        note = p.get("cost", "") or "; ".join(f"reuses {what}" for what in p.get("shared", ()))
        table.add_row(*row, Text(note))
    return table


def estimate_note(estimate: dict[str, Any], where: str, probes: int = 1) -> str:
    """One line saying what the times are: estimates from one measured HVP and gradient, and the total."""
    total = estimate["total_seconds"]
    line = (f"estimated from one HVP ({time_text(estimate['hvp_seconds']).lstrip('~')}) and one gradient "
            f"({time_text(estimate['gradient_seconds']).lstrip('~')}) measured on {where}; graph "
            f"{bytes_text(estimate['graph_bytes'])} built in {time_text(estimate['graph_seconds']).lstrip('~')}; "
            f"about {time_text(total).lstrip('~')} per probe")
    if probes > 1:
        line += f", {time_text(total * probes).lstrip('~')} for {probes} probes"
    return line + " (an estimate: batched HVPs are cheaper per vector, iterations may stop early)"
