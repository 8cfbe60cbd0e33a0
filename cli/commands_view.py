"""``geomprobe view line|plane|interpolate|trajectory CKPT... --spec SPEC``: landscape views of checkpoints.

Each view is measured on the spec's seeded probe batches through the same checkpoint loading as ``geomprobe
probe``, written as a run (one record per view, grids in sidecar files, readable by ``geomprobe report``) and
drawn into a PNG. Every check that can fail on bad input (the output folder, the spec, every checkpoint, the
options) runs before the first forward pass, so a refusal leaves the disk as it was.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from geomprobe import views
from geomprobe.engine.landscape import Landscape, unwrap_model
from geomprobe.engine.probedata import draw_probe_batches
from geomprobe.engine.state import rng_preserved
from geomprobe.errors import ConfigurationError
from geomprobe.load.checkpoints import CheckpointInfo, load_checkpoint, plan_checkpoints
from geomprobe.load.spec import load_spec
from geomprobe.report.view_figures import plot_views
from geomprobe.runs.writer import RunWriter

from ._common import emit_json, err_console, handle_errors, out_console
from .commands_probe import SPEC_HELP, _check_out, warnings_to_stderr

__all__ = ["view"]

DIRECTIONS = "top, bottom (top2, bottom2, ...), gradient, update (from the previous checkpoint) or random"


@click.group("view")
def view() -> None:
    """Draw the loss landscape around checkpoints: along a line, on a plane, between checkpoints, along a
    trajectory. Each command writes a run (RUN_DIR, readable by `geomprobe report`) and a PNG.

    \b
    Examples:
      geomprobe view line ckpt-100.pt --spec model.py:spec --direction top
      geomprobe view plane ckpt-100.pt --spec model.py:spec --u top --v random --points 21
      geomprobe view interpolate init.pt final.pt --spec model.py:spec --span -0.5 1.5
      geomprobe view trajectory 'ckpts/*.pt' --spec model.py:spec
    """


def _common(fn: Callable) -> Callable:
    options = [
        click.argument("checkpoints", nargs=-1, required=True, metavar="CKPT..."),
        click.option("--spec", "spec_name", required=True, metavar="MODULE:FN|FILE.py:FN", help=SPEC_HELP),
        click.option("--out", default=None, metavar="RUN_DIR", help="Run folder to write (default: runs/view-<time>)."),
        click.option("--png", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
                     help="The figure (default: RUN_DIR/views.png)."),
        click.option("--force", is_flag=True, help="Replace the run in a non-empty --out folder (and the --png)."),
        click.option("--mode", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
                     help="eval: dropout off, BatchNorm running statistics; train: batch statistics, frozen masks."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds the spec, data, directions."),
        click.option("--samples", type=click.IntRange(min=1), default=None,
                     help="Probe examples drawn from the spec's DataLoader (default: one loader batch)."),
        click.option("--max-forwards", type=click.IntRange(min=1), default=None,
                     help="Refuse a view that needs more forward passes than this (each point costs one per batch)."),
        click.option("--trust-pickle", is_flag=True, help="Allow checkpoints holding pickled Python objects."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Bar:
    """Forward passes done of planned, as a rich bar on a terminal; nothing otherwise."""

    def __init__(self, quiet: bool):
        console = err_console()
        self.bar = None if quiet or not console.is_terminal else Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
        self.task = None

    def start(self, label: str) -> Callable[[int, int], None] | None:
        if self.bar is None:
            return None
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(label, total=None)
        self.bar.reset(self.task, total=None, description=label)
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


class _Session:
    """The spec, its model, the probe batches and the planned checkpoints of one view command."""

    def __init__(self, kind: str, checkpoints: tuple[str, ...], spec_name: str, out: str | None, png: Path | None,
                 force: bool, mode: str, seed: int, samples: int | None, trust_pickle: bool, quiet: bool):
        self.kind, self.mode, self.seed, self.trust_pickle, self.quiet = kind, mode, seed, trust_pickle, quiet
        self.out = out or os.path.join("runs", time.strftime("view-%Y%m%d-%H%M%S"))
        _check_out(self.out, force)
        self.png = png or Path(self.out) / "views.png"
        if self.png.exists() and not force:
            raise ConfigurationError(f"figure {str(self.png)!r} already exists; pass --force to replace it or choose "
                                     "another --png")
        if not self.png.parent.is_dir() and self.png.parent != Path(self.out):
            raise ConfigurationError(f"cannot write {str(self.png)!r}: folder {str(self.png.parent)!r} does not exist")
        self.force, self.spec_name = force, spec_name
        self.spec = load_spec(spec_name, seed=seed)
        self.model = unwrap_model(self.spec.model)
        self.infos = plan_checkpoints(checkpoints, model=self.model, trust_pickle=trust_pickle)
        with rng_preserved(self.model):
            self.batches, self.data_policy = draw_probe_batches(self.spec.probe_data, samples=samples, seed=seed)
        self.bar = _Bar(quiet)

    def load(self, info: CheckpointInfo) -> None:
        load_checkpoint(info, self.model, trust_pickle=self.trust_pickle)

    def landscape(self) -> Landscape:
        return Landscape(self.model, self.spec.loss_fn, self.batches, mode=self.mode, seed=self.seed)

    def write(self, records: list[dict], options: dict) -> Path:
        meta = {"model": type(self.model).__name__, "source": "views", "view": self.kind, "spec": self.spec_name,
                "options": options, "probe": {"mode": self.mode, "seed": self.seed, "data": self.data_policy},
                "checkpoints": [{"step": i.step, "path": i.path, "format": i.format} for i in self.infos]}
        with RunWriter(self.out, meta, force=self.force) as writer:
            for r in records:
                writer.append(r)
        return plot_views(self.out, self.png, overwrite=self.force)


def _finish(session: _Session, rows: list[dict], as_json: bool, figure: Path) -> None:
    if as_json:
        emit_json({"run": session.out, "figure": str(figure), "view": session.kind, "views": rows})
    else:
        table = Table(title=f"{session.kind} views", title_justify="left")
        for col in rows[0]:
            table.add_column(col, justify="left" if col in ("checkpoint", "direction") else "right")
        for r in rows:
            table.add_row(*(Text(f"{v:.5g}" if isinstance(v, float) else str(v)) for v in r.values()))
        out_console().print(table)
    if not session.quiet:
        err_console().print(f"run written to {session.out}, figure {figure}", markup=False, highlight=False,
                            soft_wrap=True)


def _along(kind: str, measure: Callable[[Landscape, Any, Callable | None], dict], directions: list[Any],
           **session_args: Any) -> tuple[_Session, list[dict], list[dict]]:
    """Line or plane views at each checkpoint; ``update`` takes the previous checkpoint as the step's start."""
    session = _Session(kind, **session_args)
    needs_previous = "update" in directions
    if needs_previous and len(session.infos) < 2:
        raise ConfigurationError("direction 'update' needs two or more checkpoints: the step to a checkpoint is "
                                 "its difference from the previous one")
    records, rows, previous = [], [], None
    try:
        for info in session.infos:
            session.load(info)
            if needs_previous and previous is None:
                previous = {n: p.detach().clone() for n, p in session.model.named_parameters()}
                continue  # the first checkpoint is only the start of the first step
            land = session.landscape()
            try:
                result = measure(land, previous, session.bar.start(f"step {info.step}: forward passes"))
            finally:
                land.close()
            if needs_previous:
                previous = {n: p.detach().clone() for n, p in session.model.named_parameters()}
            records.append({"step": info.step, "loss": land.loss, f"view_{kind}": result})
            rows.append({"step": info.step, "checkpoint": Path(info.path).name, "loss": land.loss,
                         "forwards": result["forwards"], "hvps": result["hvps"], "seconds": result["seconds"]})
    finally:
        session.bar.stop()
    return session, records, rows


@view.command("line")
@_common
@click.option("--direction", default="top", show_default=True, help=f"Direction: {DIRECTIONS}.")
@click.option("--span", nargs=2, type=float, default=(-1.0, 1.0), show_default=True, help="Range of t.")
@click.option("--points", type=int, default=41, show_default=True, help="Values of t (at least 2).")
@click.option("--normalize", type=click.Choice(["unit", "filter", "none"]), default=None,
              help="Scale of the direction (default: unit for eigenvectors and the gradient, filter for random, "
                   "none for the update).")
@handle_errors
def line_command(checkpoints, spec_name, out, png, force, mode, seed, samples, max_forwards, trust_pickle, as_json,
                 quiet, direction, span, points, normalize) -> None:
    """The loss along a direction through each checkpoint CKPT, beside the quadratic model."""
    views.surface.check_points(points)
    views.surface.check_span(span)
    _check_direction(direction)

    def measure(land, previous, progress):
        return views.line(land, direction, span=span, points=points, normalize=normalize, seed=seed,
                          previous=previous, max_forwards=max_forwards, progress=progress)

    err = err_console()
    with warnings_to_stderr(err):
        session, records, rows = _along("line", measure, [direction], checkpoints=checkpoints, spec_name=spec_name,
                                        out=out, png=png, force=force, mode=mode, seed=seed, samples=samples,
                                        trust_pickle=trust_pickle, quiet=quiet)
        for r, rec in zip(rows, records):
            r["curvature"] = rec["view_line"]["curvature"]
        figure = session.write(records, {"direction": direction, "span": list(span), "points": points,
                                         "normalize": normalize})
    _finish(session, rows, as_json, figure)


@view.command("plane")
@_common
@click.option("--u", "u", default="top", show_default=True, help=f"First direction: {DIRECTIONS}.")
@click.option("--v", "v", default="random", show_default=True, help="Second direction (as --u).")
@click.option("--span", nargs=2, type=float, default=(-1.0, 1.0), show_default=True, help="Range of both axes.")
@click.option("--points", type=int, default=21, show_default=True, help="Grid points per axis (at least 2).")
@click.option("--normalize", type=click.Choice(["unit", "filter", "none"]), default=None,
              help="Scale of both directions (default: per direction, as for `view line`).")
@handle_errors
def plane_command(checkpoints, spec_name, out, png, force, mode, seed, samples, max_forwards, trust_pickle, as_json,
                  quiet, u, v, span, points, normalize) -> None:
    """The loss on the plane of two directions through each checkpoint CKPT (a contour plot)."""
    views.surface.check_points(points)
    views.surface.check_span(span)
    _check_direction(u)
    _check_direction(v)

    def measure(land, previous, progress):
        return views.plane(land, u, v, span=span, points=(points, points), normalize=normalize, seed=seed,
                           previous=previous, max_forwards=max_forwards, progress=progress)

    err = err_console()
    with warnings_to_stderr(err):
        session, records, rows = _along("plane", measure, [u, v], checkpoints=checkpoints, spec_name=spec_name,
                                        out=out, png=png, force=force, mode=mode, seed=seed, samples=samples,
                                        trust_pickle=trust_pickle, quiet=quiet)
        figure = session.write(records, {"u": u, "v": v, "span": list(span), "points": points, "normalize": normalize})
    _finish(session, rows, as_json, figure)


def _check_direction(name: str) -> None:
    if not (name in views.directions.NAMED or views.directions._EIGEN.match(name)):
        raise ConfigurationError(f"unknown direction {name!r}; use {DIRECTIONS}")


def _path_views(kind: str, least: int, measure: Callable, **session_args: Any) -> tuple[_Session, dict, Landscape]:
    session = _Session(kind, **session_args)
    if len(session.infos) < least:
        raise ConfigurationError(f"`geomprobe view {kind}` needs at least {least} checkpoints, got "
                                 f"{len(session.infos)}")
    thetas = []
    for info in session.infos:
        session.load(info)
        thetas.append({n: p.detach().clone() for n, p in session.model.named_parameters()})
    land = session.landscape()  # at the last checkpoint: it supplies the loss, the data and the parameter order
    try:
        flat = [views.parameter_vector(land, t, f"checkpoint {i.path!r}") for t, i in zip(thetas, session.infos)]
        del thetas
        result = measure(flat, land, session.bar.start(f"{kind}: forward passes"))
    finally:
        session.bar.stop()
        land.close()
    return session, result, land


@view.command("interpolate")
@_common
@click.option("--span", nargs=2, type=float, default=(0.0, 1.0), show_default=True,
              help="Range of t between two checkpoints (e.g. -0.5 1.5 to look beyond both).")
@click.option("--points", type=int, default=21, show_default=True, help="Points per segment (at least 2).")
@handle_errors
def interpolate_command(checkpoints, spec_name, out, png, force, mode, seed, samples, max_forwards, trust_pickle,
                        as_json, quiet, span, points) -> None:
    """The loss on straight lines between checkpoints CKPT... (in step order; two or more)."""
    views.surface.check_points(points)
    views.surface.check_span(span)

    def measure(flat, land, progress):
        return views.interpolate(flat, land, points=points, span=span, max_forwards=max_forwards, progress=progress)

    err = err_console()
    with warnings_to_stderr(err):
        session, result, land = _path_views("interpolate", 2, measure, checkpoints=checkpoints, spec_name=spec_name,
                                            out=out, png=png, force=force, mode=mode, seed=seed, samples=samples,
                                            trust_pickle=trust_pickle, quiet=quiet)
        step = session.infos[-1].step
        figure = session.write([{"step": step, "view_interpolate": result}], {"span": list(span), "points": points})
    rows = [{"step": i.step, "checkpoint": Path(i.path).name, "loss": e, "barrier to next": b}
            for i, e, b in zip(session.infos, result["ends"], result["barrier"] + ["-"])]
    _finish(session, rows, as_json, figure)


@view.command("trajectory")
@_common
@click.option("--points", type=int, default=21, show_default=True, help="Grid points per axis (at least 2).")
@click.option("--margin", type=float, default=0.2, show_default=True,
              help="Room around the projected path, as a fraction of its extent.")
@handle_errors
def trajectory_command(checkpoints, spec_name, out, png, force, mode, seed, samples, max_forwards, trust_pickle,
                       as_json, quiet, points, margin) -> None:
    """The PCA plane of the trajectory through checkpoints CKPT... (three or more), the path projected onto it and
    the loss there (a contour plot)."""
    views.surface.check_points(points)

    def measure(flat, land, progress):
        return views.trajectory(flat, land, points=(points, points), margin=margin, max_forwards=max_forwards,
                                progress=progress)

    err = err_console()
    with warnings_to_stderr(err):
        session, result, land = _path_views("trajectory", 3, measure, checkpoints=checkpoints, spec_name=spec_name,
                                            out=out, png=png, force=force, mode=mode, seed=seed, samples=samples,
                                            trust_pickle=trust_pickle, quiet=quiet)
        result.pop("directions")  # two vectors of d numbers: not worth a sidecar per run
        step = session.infos[-1].step
        figure = session.write([{"step": step, "view_trajectory": result}], {"points": points, "margin": margin})
    rows = [{"step": i.step, "checkpoint": Path(i.path).name, "loss": pl, "pc1": float(c[0]), "pc2": float(c[1]),
             "off plane": off}
            for i, pl, c, off in zip(session.infos, result["path_loss"], result["path"], result["offplane"])]
    _finish(session, rows, as_json, figure)
