"""``geomprobe explain [NAME]``: what a statistic means, how it is estimated, its error, cost and source.

The text is docs/metrics.md's section (one source for the documentation and the terminal); for a registered
metric the options ``--metric NAME:key=value`` takes follow, read from the metric's own signature.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console, Group
from rich.markdown import Markdown
from rich.table import Table
from rich.text import Text

from geomprobe.metrics import registry
from geomprobe.probe.metric_spec import metric_option_types
from geomprobe.report.explain import DOC_PATH, anchor, section, sections, summary

from ._common import handle_errors, out_console, plain_output

__all__ = ["explain"]

_KINDS = {"hessian": "background", "smoothness": "trajectory", "edge_of_stability": "trajectory",
          "trust_region": "optimizer", "batch_scaling": "optimizer"}


def _options(name: str) -> Table:
    table = Table(title=f"Options: --metric {name}:key=value,...", title_justify="left",
                  caption=f'in Python: GeometryProbe(metrics=["{name}:key=value"]) or {{"name": "{name}", key: value}}',
                  caption_justify="left")
    table.add_column("option")
    table.add_column("type = default")
    for key, text in metric_option_types(name).items():
        table.add_row(key, Text(text))
    return table


@click.command("explain")
@click.argument("name", required=False)
@handle_errors
def explain(name: str | None) -> None:
    """What NAME means: definition, estimation, error, cost in HVPs, how to read it, and its source.

    Without NAME, list every statistic explained (the metrics and the trajectory analyses of reports).
    The same text is in docs/metrics.md.
    """
    console = out_console(width=100)
    if name is None:
        table = Table(title=f"geomprobe explain NAME  ({DOC_PATH})", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("what it is")
        for n in sections():
            table.add_row(n, _KINDS.get(n, "metric" if n in registry.REGISTRY else "analysis"), Text(summary(n)))
        _print(console, table)
        return
    parts = [Markdown(section(name))]
    if name in registry.REGISTRY:
        metric = registry.get(name)
        parts += [Text(""), _options(name), Text(f"cost per probe: {metric.cost}")]
        if metric.needs:
            parts.append(Text(f"needs besides the model and probe data: {', '.join(sorted(metric.needs))}"))
    parts.append(Text(f"source: {anchor(name)}", style="dim"))
    _print(console, Group(*parts))


def _print(console: Console, renderable: Any) -> None:
    """Print; piped, without the spaces rich pads every line to the console's width with."""
    if not plain_output():
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))
