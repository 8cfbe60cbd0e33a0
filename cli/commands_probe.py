"""``geomprobe probe CKPT... --spec SPEC``: measure saved checkpoints into one run, ordered by step.

Every check that can fail on bad input (the output folder, the spec, every checkpoint's format, keys and
shapes, the optimizer state a metric needs) runs before the first probe, so a refusal leaves the disk as it
was. Each checkpoint is then loaded into the spec's model and probed on the same seeded probe batches.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from geomprobe.engine.landscape import Landscape, unwrap_model
from geomprobe.errors import ConfigurationError, GeomprobeError, NonFiniteLossError
from geomprobe.load.checkpoints import CheckpointInfo, load_checkpoint, plan_checkpoints
from geomprobe.load.pathnames import name_problem, shown_path
from geomprobe.load.spec import ProbeSpec, load_spec
from geomprobe.metrics import registry
from geomprobe.probe.geometry_probe import DEFAULT_METRICS, GeometryProbe
from geomprobe.probe.progress import ProgressEvent, planned_text
from geomprobe.probe.schedule import at

from ._common import SEED, emit_json, err_console, handle_errors, out_console

__all__ = ["probe", "warnings_to_stderr", "SPEC_HELP"]

SPEC_HELP = (
    "What to probe: 'package.module:function' or 'path/to/file.py:function', a function returning a "
    "geomprobe.load.spec.ProbeSpec(model, loss_fn, probe_data, optimizer_factory=None, noise_data=None); "
    "see examples/probe_spec_example.py."
)


@contextlib.contextmanager
def warnings_to_stderr(console: Console) -> Iterator[None]:
    """Show each distinct warning once as a ``warning:`` line on stderr (never a traceback or source line).

    Whatever the user's code prints (the spec function, the model's forward) goes to stderr too, so stdout
    holds only the command's data: ``--json`` output stays one parseable document.
    """
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def _check_out(out: str, force: bool) -> None:
    problem = name_problem(out, utf8=False)  # found now, not after every probe has run and found no place to go
    if problem is not None:
        raise ConfigurationError(f"output folder '{shown_path(out)}': {problem}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigurationError(f"output path {out!r} is a file; give a folder for the run with --out")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ConfigurationError(
            f"output folder {out!r} exists and is not empty; pass --force to replace the run in it, or choose "
            "another --out"
        )


def _preflight(geometry: GeometryProbe, model: torch.nn.Module, loss_fn: Any, info: CheckpointInfo,
               trust_pickle: bool) -> None:
    """Load the first checkpoint and compute the loss and its gradient on every probe batch once (no second-order
    graph: one forward and backward pass per batch), before the run folder is written. A ``loss_fn`` or model
    that cannot run at all would otherwise, under ``--force``, replace a good run with one holding only errors.
    A non-finite loss or a lack of memory belongs to that checkpoint or that size: the probe records or works
    around it, so it is let through."""
    load_checkpoint(info, model, trust_pickle=trust_pickle)
    options = {**geometry.landscape_options, "hvp_method": "finite-difference", "memory": None}
    try:
        Landscape(model, loss_fn, geometry.batches, **options).close()
    except (NonFiniteLossError, torch.OutOfMemoryError, MemoryError):
        return
    except Exception as e:  # noqa: BLE001  the user's loss and model may raise anything
        what = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}" if not isinstance(e, GeomprobeError) else str(e)
        raise ConfigurationError(
            f"the spec's loss cannot be computed on its probe data at {Path(info.path).name} ({what}); nothing "
            "was probed or written: fix the spec's loss_fn or model"
        ) from None


def _optimizer_needed(metrics: list[str]) -> list[str]:
    return [m for m in metrics if "optimizer" in registry.get(m).needs]


def _check_optimizer(spec: ProbeSpec, infos: list[CheckpointInfo], needing: list[str]) -> None:
    if not needing:
        return
    what = f"metric {', '.join(needing)} needs the optimizer"
    if spec.optimizer_factory is None:
        raise ConfigurationError(
            f"{what}: add optimizer_factory to the spec (a function of the model building the optimizer as in "
            "training), or drop the metric"
        )
    sample = spec.build_optimizer()
    if isinstance(sample, torch.optim.SGD):  # plain SGD's preconditioner is the identity: no state to read
        return
    bare = [i.path for i in infos if not i.has_optimizer]
    if bare:
        raise ConfigurationError(
            f"{what}'s state, which {len(bare)} checkpoint(s) do not hold: {', '.join(bare[:3])}"
            f"{', ...' if len(bare) > 3 else ''}; probe training checkpoints that saved the optimizer, or drop the metric"
        )


def _plan_table(plan: dict[str, dict], dim: int, dtype: str) -> Table:
    """Each metric's planned HVPs, gradients and vector memory (``<=`` marks an iteration's upper bound)."""
    table = Table(title=f"planned cost per probe ({dim:,} parameters, {dtype})", title_justify="left")
    for col, justify in (("metric", "left"), ("HVPs", "right"), ("gradients", "right"),
                         ("vector memory", "right"), ("note", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, p in plan.items():
        table.add_row(name, planned_text(p["hvps"], p["exact"]), str(p["gradients"] or 0) if p["hvps"] is not None
                      else "?", _bytes_text(p["vector_bytes"]), Text(p.get("cost", "")))
    return table


def _bytes_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class _Progress:
    """A rich progress bar with ETA on a terminal, with a second bar for the metric running now (HVPs done
    of planned); one plain line per checkpoint otherwise. ``quiet``: nothing."""

    def __init__(self, console: Console, total: int, quiet: bool = False):
        self.console, self.total, self.done, self.t0 = console, total, 0, time.perf_counter()
        self.quiet = quiet
        self.bar: Progress | None = None
        if console.is_terminal and not quiet:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
            )
            self.task = self.bar.add_task("probing", total=total)
            self.metric_task = self.bar.add_task("", total=None, visible=False)

    def event(self, e: ProgressEvent) -> None:
        """Inside a probe: the metric running and its HVPs done of planned (an upper bound shows as <=)."""
        if self.bar is None or e.metric is None:
            return
        if e.kind == "start":
            label = f"  {e.metric} HVPs (planned {planned_text(e.planned, e.exact)})"
            self.bar.reset(self.metric_task, total=e.planned, description=label, visible=True)
        elif e.kind == "advance":
            self.bar.update(self.metric_task, completed=e.hvps)
        elif e.kind == "end":
            self.bar.update(self.metric_task, visible=False)

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def starting(self, info: CheckpointInfo) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"step {info.step} ({Path(info.path).name})")

    def finished(self, info: CheckpointInfo, record: dict) -> None:
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.advance(self.task)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        loss = record.get("loss")
        loss_text = f"loss {loss:.4g}, " if isinstance(loss, float) else ""
        self.console.print(
            f"[{self.done}/{self.total}] step {info.step} {Path(info.path).name}: {loss_text}"
            f"{record['cost']['hvps']} HVPs, {record['cost']['seconds']:.1f} s, ETA {eta:.0f} s",
            markup=False, highlight=False, soft_wrap=True,
        )


def _summary(info: CheckpointInfo, record: dict) -> dict[str, Any]:
    return {
        "step": info.step,
        "step_source": info.step_source,
        "path": info.path,
        "format": info.format,
        "loss": record.get("loss"),
        "grad_norm": record.get("grad_norm"),
        "seconds": record["cost"]["seconds"],
        "hvps": record["cost"]["hvps"],
        "errors": record.get("errors", {}),
    }


def _table(rows: list[dict]) -> Table:
    table = Table(title="probed checkpoints", title_justify="left")
    for col, justify in (("step", "right"), ("checkpoint", "left"), ("format", "left"), ("loss", "right"),
                         ("grad norm", "right"), ("HVPs", "right"), ("seconds", "right"), ("errors", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else "-"  # noqa: E731
    for r in rows:
        # Text, not markup: a file name like "model[best].pt" must print as it is.
        table.add_row(str(r["step"]), Text(Path(r["path"]).name), r["format"], fmt(r["loss"]), fmt(r["grad_norm"]),
                      str(r["hvps"]), f"{r['seconds']:.1f}", Text(", ".join(r["errors"]) or "-"))
    return table


@click.command("probe")
@click.argument("checkpoints", nargs=-1, required=True, metavar="CKPT...")
@click.option("--spec", "spec_name", required=True, metavar="MODULE:FN|FILE.py:FN", help=SPEC_HELP)
@click.option("--metric", "metrics", multiple=True, type=click.Choice(registry.available()),
              help=f"Metric to measure (repeat for several; default: {', '.join(DEFAULT_METRICS)}).")
@click.option("--out", default=None, metavar="RUN_DIR", help="Run folder to write (default: runs/probe-<time>).")
@click.option("--force", is_flag=True, help="Replace the run in an existing, non-empty --out folder.")
@click.option("--mode", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="eval: dropout off, BatchNorm running statistics; train: batch statistics, frozen dropout masks.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seeds the spec, probe data and metrics.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Probe examples drawn from the spec's DataLoader (default: one loader batch).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow checkpoints holding pickled Python objects (weights_only=False): runs code from the file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--dry-run", is_flag=True,
              help="Check the inputs (the loss is computed once on the first checkpoint) and print each metric's planned "
                   "cost (HVPs, gradients, memory); probe nothing.")
@click.option("--no-warm-start", is_flag=True,
              help="Start every Lanczos run cold instead of from the previous checkpoint's Ritz vectors.")
@click.option("-q", "--quiet", is_flag=True, help="No plan, progress or notes on stderr (warnings and errors still).")
@handle_errors
def probe(checkpoints: tuple[str, ...], spec_name: str, metrics: tuple[str, ...], out: str | None, force: bool,
          mode: str, seed: int, samples: int | None, trust_pickle: bool, as_json: bool, dry_run: bool,
          no_warm_start: bool, quiet: bool) -> None:
    """Probe saved checkpoints CKPT... (files, save_pretrained folders or glob patterns) into one run.

    Formats: state dicts (.pt/.pth/.bin), training dicts with optimizer state, Lightning .ckpt,
    .safetensors and Hugging Face save_pretrained folders. Checkpoints are ordered by step (recorded in the
    file, else read from the name) and measured on the same seeded probe data. Before the first probe each
    metric's planned cost is shown on stderr; on a terminal, progress inside each probe too.
    """
    err = err_console()
    out = out or os.path.join("runs", time.strftime("probe-%Y%m%d-%H%M%S"))
    metric_names = list(dict.fromkeys(metrics)) or list(DEFAULT_METRICS)
    if not dry_run:
        _check_out(out, force)
    with warnings_to_stderr(err):
        spec = load_spec(spec_name, seed=seed)
        model = unwrap_model(spec.model)
        infos = plan_checkpoints(checkpoints, model=model, trust_pickle=trust_pickle)
        _check_optimizer(spec, infos, _optimizer_needed(metric_names))
        if infos[0].step_source == "order" and not quiet:
            err.print("note: some checkpoints carry no step in the file or its name; steps are their order",
                      markup=False, highlight=False)
        meta = {"source": "checkpoints", "spec": spec_name,
                "checkpoints": [{"step": i.step, "path": i.path, "format": i.format} for i in infos]}
        progress = _Progress(err, len(infos), quiet=quiet)
        geometry = GeometryProbe(
            model, spec.loss_fn, spec.probe_data, metrics=metric_names, schedule=at([i.step for i in infos]),
            run_dir=None if dry_run else out, mode=mode, noise_data=spec.noise_data, probe_samples=samples,
            seed=seed, force=force, meta=meta, warm_start=not no_warm_start, progress=progress.event,
        )
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        if dry_run:
            geometry.close()
            _preflight(geometry, model, spec.loss_fn, infos[0], trust_pickle)  # a dry run checks the loss runs too
    if dry_run:  # data on stdout, outside the redirection of the user's prints to stderr
        if as_json:
            emit_json({"spec": spec_name, "parameters": geometry.space.dim, "dtype": dtype,
                       "checkpoints": len(infos), "cost_plan": geometry.cost_plan})
        else:
            out_console().print(_plan_table(geometry.cost_plan, geometry.space.dim, dtype))
        return
    with warnings_to_stderr(err):
        _preflight(geometry, model, spec.loss_fn, infos[0], trust_pickle)
        if not quiet:
            err.print(_plan_table(geometry.cost_plan, geometry.space.dim, dtype))
        rows: list[dict] = []
        notes: set[str] = set()
        with geometry, progress:
            for info in infos:
                progress.starting(info)
                fresh = spec.build_optimizer() if spec.optimizer_factory is not None else None
                loaded = load_checkpoint(info, model, optimizer=fresh if info.has_optimizer else None,
                                         trust_pickle=trust_pickle)
                geometry.optimizer = loaded.optimizer or (fresh if isinstance(fresh, torch.optim.SGD) else None)
                matched = loaded.match.describe()
                if matched and matched not in notes and not quiet:  # say how keys were matched, once per kind
                    notes.add(matched)
                    err.print(f"note: {Path(info.path).name}: {matched}", markup=False, highlight=False)
                record = geometry.probe(info.step)
                rows.append({**_summary(info, record), "key_match": matched or "exact"})
                progress.finished(info, record)
    if as_json:
        emit_json({"run": out, "spec": spec_name, "mode": mode, "seed": seed, "metrics": metric_names,
                   "checkpoints": rows})
    else:
        out_console().print(_table(rows))
    if geometry.unwritten_records:  # the probes ran, but the run log could not take them
        raise click.ClickException(
            f"the run could not be written to {out} ({geometry.write_error}); "
            f"{len(geometry.unwritten_records)} probe record(s) were lost: choose another --out"
        )
    failed = [r for r in rows if r["errors"]]
    if failed:
        first = failed[0]
        where, message = next(iter(first["errors"].items()))
        raise click.ClickException(
            f"{len(failed)} of {len(rows)} probes recorded errors (step {first['step']}, {where}: {message}); "
            f"the run in {out} keeps them"
        )
    if not quiet:
        err.print(f"run written to {out}; read it with: geomprobe report {out}", markup=False, highlight=False,
                  soft_wrap=True)
