"""``geomprobe report``, ``geomprobe compare`` and ``geomprobe export``: reading runs, never changing them.

All three open runs read-only. Output files (``--png``, ``--csv``, ``--parquet``) are refused when they exist
unless ``--force`` is given, and are never allowed to land on a run's own files (``meta.json``,
``records.jsonl``, ``arrays/``), with or without ``--force``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import click

from geomprobe.errors import ConfigurationError
from geomprobe.report import (
    build_report,
    compare_runs,
    plot_comparison,
    plot_run,
    render_comparison,
    render_report,
)
from geomprobe.report.view_figures import has_views, plot_views
from geomprobe.runs.export import export_csv
from geomprobe.runs.reader import RunReader

from ._common import emit_json, err_console, handle_errors, out_console

__all__ = ["report", "compare", "export"]

_RUN_FILES = ("meta.json", "records.jsonl")


def _guard_output(path: Path, readers: list[RunReader]) -> None:
    """Refuse an output path that is one of a run's own files: writing it would damage the run."""
    target = path.resolve()
    for reader in readers:
        root = reader.run_dir.resolve()
        if target.parent == root and target.name in _RUN_FILES or (root / "arrays") in target.parents:
            raise ConfigurationError(f"refusing to write {str(path)!r}: it is part of run {str(reader.run_dir)!r}; "
                                     "choose a path outside the run's own files")


def _figures(reader: RunReader, png: Path, force: bool) -> list[Path]:
    """The run's figure at ``png``; a run with landscape views also gets them, beside it as ``<name>-views.png``
    (or at ``png`` itself when views are all the run holds)."""
    if not has_views(reader):
        return [plot_run(reader, png, overwrite=force)]
    if reader.meta.get("source") == "views":  # written by `geomprobe view`: the views are its figure
        return [plot_views(reader, png, overwrite=force)]
    views_png = png.with_name(f"{png.stem}-views.png")
    _guard_output(views_png, [reader])
    try:
        first = plot_run(reader, png, overwrite=force)
    except ConfigurationError:  # no series to draw: the views are the run's figure
        return [plot_views(reader, png, overwrite=force)]
    return [first, plot_views(reader, views_png, overwrite=force)]


@click.command("report")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--per-layer", is_flag=True, help="Add a table of the per-block values (R_med, diagonal share, ...).")
@click.option("--png", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Also write a PNG of the values against the step (and of the landscape views, if any).")
@click.option("--force", is_flag=True, help="Replace an existing --png file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document instead of tables.")
@handle_errors
def report(run: Path, per_layer: bool, png: Path | None, force: bool, as_json: bool) -> None:
    """Summarize the run in folder RUN: metrics along the steps, findings, cost.

    \b
    Examples:
      geomprobe report runs/adam
      geomprobe report runs/adam --per-layer --png adam.png
      geomprobe report runs/adam --json | jq .findings
    """
    reader = RunReader(run)
    if png is not None:
        _guard_output(png, [reader])
    doc = build_report(reader, per_layer=per_layer)
    if png is not None:
        # The figure is written before anything is printed, so a refused path leaves stdout empty.
        figures = _figures(reader, png, force)
        doc["figure"] = str(figures[0])
        if len(figures) > 1:
            doc["view_figure"] = str(figures[1])
        for f in figures:
            err_console().print(f"wrote figure {f}")
    if as_json:
        emit_json(doc)
    else:
        render_report(doc, out_console(), per_layer=per_layer)


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--by", type=click.Choice(["step", "loss"]), default="step", show_default=True,
              help="Match the runs at the same steps, or where each first reached the same loss.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="A metric (rmed), one value (rmed.rmed_q99, loss) or one block's (rmed[layer1.weight]); "
              "repeat for several. "
              "Default: the report's rows.")
@click.option("--levels", type=click.IntRange(2, 1000), default=8, show_default=True,
              help="Loss levels to match at, with --by loss.")
@click.option("--png", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Also write a PNG: one panel per value, one line per run.")
@click.option("--force", is_flag=True, help="Replace an existing --png file.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON document.")
@handle_errors
def compare(runs: tuple[Path, ...], by: str, metrics: tuple[str, ...], levels: int, png: Path | None, force: bool,
            as_json: bool) -> None:
    """Put two or more RUNS side by side, e.g. R_med of SGD against Adam.

    Warns (on stderr) when the runs were probed differently (mode, probe data, seed, HVP method, measured
    parameters): their values then differ for more reasons than the trajectory.

    \b
    Examples:
      geomprobe compare runs/sgd runs/adam --metric rmed
      geomprobe compare runs/sgd runs/adam --by loss --metric rmed.rmed --png rmed.png
    """
    if len(runs) < 2:
        raise click.UsageError("compare needs at least two runs, e.g. `geomprobe compare runs/sgd runs/adam`; "
                               "for one run use `geomprobe report`")
    readers = [RunReader(r) for r in runs]
    if png is not None:
        _guard_output(png, readers)
    cmp = compare_runs(readers, by=by, metrics=list(metrics) or None, levels=levels)
    err = err_console()
    for warning in cmp.warnings:
        err.print(f"warning: {warning}", markup=False)
    if png is not None:
        plot_comparison(cmp, png, overwrite=force)  # before stdout: a refused path leaves stdout empty
        err.print(f"wrote figure {png}", markup=False)
    if as_json:
        emit_json(cmp.to_dict())
    else:
        render_comparison(cmp, out_console())


def _write_parquet(reader: RunReader, path: Path) -> int:
    missing = [m for m in ("pyarrow", "pandas") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"writing Parquet needs {' and '.join(missing)}, which is not installed; install "
                                   f"it with `pip install {' '.join(missing)}` (or `pip install 'geomprobe[parquet]'`), "
                                   "or export with --csv instead")
    frame = reader.to_dataframe()
    # Lists (top-k eigenvalues, intervals) become JSON text, as in the CSV: one column type per column.
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list)).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        frame.to_parquet(tmp, engine="pyarrow", index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(frame)


@click.command("export")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              metavar="FILE", help="Write one row per record, nested values as dotted columns ('-': stdout).")
@click.option("--parquet", "parquet_path", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="The same table as Parquet (needs pyarrow).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@handle_errors
def export(run: Path, csv_path: Path | None, parquet_path: Path | None, force: bool) -> None:
    """Export the records of RUN as a table (CSV or Parquet).

    \b
    Examples:
      geomprobe export runs/adam --csv adam.csv
      geomprobe export runs/adam --parquet adam.parquet --force
    """
    if (csv_path is None) == (parquet_path is None):
        raise click.UsageError("give exactly one of --csv FILE or --parquet FILE")
    reader = RunReader(run)
    target: Path = csv_path or parquet_path  # type: ignore[assignment]  # exactly one is set (checked above)
    if str(target) == "-":
        rows = export_csv(reader, sys.stdout)
        err_console().print(f"wrote {rows} records to stdout")
        return
    _guard_output(target, [reader])
    if not target.parent.is_dir():
        raise ConfigurationError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist")
    if target.exists() and not force:
        raise ConfigurationError(f"{str(target)!r} already exists; pass --force to replace it or choose another path")
    if csv_path is not None:
        rows = export_csv(reader, target, overwrite=force)
    else:
        rows = _write_parquet(reader, target)
    err_console().print(f"wrote {rows} records to {target}")
