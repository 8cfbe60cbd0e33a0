"""Reports of runs: summaries, sparklines, findings, rich tables, comparisons and figures.

Everything here reads run folders (:class:`geomprobe.RunReader`) and nothing else, so it works on any run
on disk, from Python or from ``geomprobe report`` / ``geomprobe compare``. matplotlib is imported only when a
figure is drawn.

Typical use: ``print(report_text("runs/adam"))``, ``build_report("runs/adam")`` (the ``--json`` document),
``compare_runs(["runs/sgd", "runs/adam"], by="loss", metrics=["rmed"])`` and
``plot_run("runs/adam", "adam.png")``.
"""

from .compare import Comparison, compare_runs, render_comparison
from .document import build_report, header_of, open_run
from .figures import plot_comparison, plot_run
from .findings import Finding, findings
from .sparkline import sparkline
from .summary import Series, block_series, collect_series, cost_summary, summarize
from .tables import print_report, render_report, report_renderable, report_text

__all__ = [
    # data
    "build_report",
    "open_run",
    "header_of",
    "Series",
    "collect_series",
    "block_series",
    "summarize",
    "cost_summary",
    "Finding",
    "findings",
    # rendering
    "sparkline",
    "render_report",
    "report_renderable",
    "print_report",
    "report_text",
    # several runs
    "Comparison",
    "compare_runs",
    "render_comparison",
    # figures (matplotlib, imported lazily)
    "plot_run",
    "plot_comparison",
]
from .view_figures import has_views, plot_views, view_entries  # noqa: E402

__all__ += ["has_views", "plot_views", "view_entries"]
