"""``geomprobe probe CKPT... --spec SPEC``: measure saved checkpoints into one run, ordered by step.

Every check that can fail on bad input (the output folder, the spec, every checkpoint's format, keys and
shapes, the optimizer state a metric needs) runs before the first probe, so a refusal leaves the disk as it
was. Each checkpoint is then loaded into the spec's model and probed on the same seeded probe batches.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from click.core import ParameterSource
from rich.table import Table
from rich.text import Text

from geomprobe.engine.landscape import Landscape, unwrap_model
from geomprobe.errors import ConfigurationError, GeomprobeError, NonFiniteLossError
from geomprobe.load.checkpoints import CheckpointInfo, load_checkpoint, plan_checkpoints
from geomprobe.load.pathnames import name_problem, shown_path
from geomprobe.load.spec import ProbeSpec, load_spec
from geomprobe.metrics import registry
from geomprobe.probe.geometry_probe import DEFAULT_METRICS, GeometryProbe
from geomprobe.probe.estimate import estimate_costs
from geomprobe.probe.metric_spec import METRIC_SPEC_HELP, resolve_metrics
from geomprobe.probe.progress import ProgressEvent, planned_text
from geomprobe.probe.run_folder import kept_old_run
from geomprobe.probe.schedule import at

from ._common import SEED, emit_json, err_console, handle_errors, out_console
from ._metric_option import METRIC
from ._plan import estimate_note, plan_table
from ._resume import resumed_command

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


class _Progress:
    """A rich progress bar with ETA on a terminal, with a second bar for the metric running now (HVPs done
    of planned; forward passes for a view, which spends most of its time on them); one plain line per
    checkpoint otherwise. ``quiet``: nothing."""

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
        forwards = bool(e.planned_forwards)
        if e.kind == "start":
            label = f"  {e.metric} HVPs (planned {planned_text(e.planned, e.exact)})"
            if forwards:
                label = (f"  {e.metric} forward passes (planned {e.planned_forwards}; "
                         f"HVPs {planned_text(e.planned, e.exact)})")
            self.bar.reset(self.metric_task, total=e.planned_forwards if forwards else e.planned, description=label,
                           visible=True)
        elif e.kind == "advance":
            self.bar.update(self.metric_task, completed=e.forwards if forwards else e.hvps)
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
@click.argument("checkpoints", nargs=-1, metavar="CKPT...")
@click.option("--spec", "spec_name", default=None, metavar="MODULE:FN|FILE.py:FN", help=SPEC_HELP)
@click.option("--metric", "metrics", multiple=True, type=METRIC, metavar="NAME[:key=value,...]",
              help=f"Metric to measure, with options (repeat for several; default: {', '.join(DEFAULT_METRICS)}): "
                   f"{METRIC_SPEC_HELP}. Metrics: {', '.join(registry.available())}.")
@click.option("--out", default=None, metavar="RUN_DIR", help="Run folder to write (default: runs/probe-<time>).")
@click.option("--force", is_flag=True, help="Replace the run in an existing, non-empty --out folder.")
@click.option("--resume", default=None, metavar="RUN_DIR",
              help="Continue an interrupted probe run in RUN_DIR: probe the checkpoints it has not recorded and "
                   "append them; spec, checkpoints, metrics, mode, seed and samples come from the run.")
@click.option("--mode", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="eval: dropout off, BatchNorm running statistics; train: batch statistics, frozen dropout masks.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seeds the spec, probe data and metrics.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Probe examples drawn from the spec's DataLoader (default: one loader batch).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow checkpoints holding pickled Python objects (weights_only=False): runs code from the file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--dry-run", is_flag=True,
              help="Check the inputs (the loss is computed once on the first checkpoint) and print each metric's "
                   "planned HVPs, gradients, memory and a time estimated from one HVP measured there; write nothing.")
@click.option("--no-warm-start", is_flag=True,
              help="Start every Lanczos run cold. By default a run without the extremes' certificate "
                   "(spectrum:risk=none) starts from the previous checkpoint's Ritz vectors; a certified run "
                   "starts cold either way, where a warm start costs more HVPs than it saves.")
@click.option("-q", "--quiet", is_flag=True, help="No plan, progress or notes on stderr (warnings and errors still).")
@click.option("--summary", is_flag=True,
              help="Print one line per checkpoint on stderr once it is recorded: the loss and each metric's headline "
                   "values with their errors (as GeometryProbe(summary=True)); printed under --quiet too.")
@handle_errors
def probe(checkpoints: tuple[str, ...], spec_name: str | None, metrics: tuple[tuple[str, dict], ...], out: str | None,
          force: bool, resume: str | None, mode: str, seed: int, samples: int | None, trust_pickle: bool,
          as_json: bool, dry_run: bool, no_warm_start: bool, quiet: bool, summary: bool) -> None:
    """Probe saved checkpoints CKPT... (files, save_pretrained folders or glob patterns) into one run.

    Formats: state dicts (.pt/.pth/.bin), training dicts with optimizer state, Lightning .ckpt,
    .safetensors and Hugging Face save_pretrained folders. Checkpoints are ordered by step (recorded in the
    file, else read from the name) and measured on the same seeded probe data. Before the first probe each
    metric's planned cost is shown on stderr; on a terminal, progress inside each probe too. Ctrl-C keeps
    the checkpoints already recorded; `geomprobe probe --resume RUN_DIR` continues.
    """
    err = err_console()
    # every metric option is checked before anything is loaded
    metric_options = resolve_metrics([{"name": n, **o} for n, o in metrics] or list(DEFAULT_METRICS))
    command = {"checkpoints": list(checkpoints), "spec": spec_name, "metrics": metric_options, "mode": mode,
               "seed": seed, "samples": samples, "warm_start": not no_warm_start}
    if resume is not None:
        if force or dry_run:
            raise click.UsageError("--resume continues a run: it takes neither --force nor --dry-run")
        if out is not None and os.path.abspath(out) != os.path.abspath(resume):
            raise click.UsageError(f"--resume writes to {resume}; drop --out {out}")
        out = resume
        command, recorded = resumed_command(resume, command, given=_given())
        checkpoints, spec_name, metric_options = tuple(command["checkpoints"]), command["spec"], command["metrics"]
        mode, seed, samples = command["mode"], command["seed"], command["samples"]
        no_warm_start = not command["warm_start"]
    else:
        recorded = set()
        if not checkpoints:
            raise click.UsageError("Missing argument 'CKPT...': the checkpoints to probe (or --resume RUN_DIR)")
        if spec_name is None:
            raise click.UsageError("Missing option '--spec': what to probe, MODULE:FN or FILE.py:FN (see --help)")
    out = out or os.path.join("runs", time.strftime("probe-%Y%m%d-%H%M%S"))
    metric_names = list(metric_options)
    if not dry_run and resume is None:
        _check_out(out, force)
    with warnings_to_stderr(err):
        spec = load_spec(spec_name, seed=seed)
        model = unwrap_model(spec.model)
        all_infos = plan_checkpoints(checkpoints, model=model, trust_pickle=trust_pickle)
        _check_optimizer(spec, all_infos, _optimizer_needed(metric_names))
        if all_infos[0].step_source == "order" and not quiet:
            err.print("note: some checkpoints carry no step in the file or its name; steps are their order",
                      markup=False, highlight=False)
        infos = [i for i in all_infos if i.step not in recorded]
        if resume is not None and not infos:
            err.print(f"nothing to resume: all {len(all_infos)} checkpoints are recorded in {out}; read it with: "
                      f"geomprobe report {shlex.quote(out)}", markup=False, highlight=False, soft_wrap=True)
            return
        if recorded and not quiet:
            err.print(f"resuming {out}: {len(all_infos) - len(infos)} of {len(all_infos)} checkpoints already "
                      "recorded", markup=False, highlight=False, soft_wrap=True)
        meta = {"source": "checkpoints", "spec": spec_name,
                "checkpoints": [{"step": i.step, "path": i.path, "format": i.format} for i in all_infos],
                "probe_command": {**command, "checkpoints": [os.path.abspath(i.path) for i in all_infos]}}
        progress = _Progress(err, len(infos), quiet=quiet)
        geometry = GeometryProbe(
            model, spec.loss_fn, spec.probe_data, metrics=metric_options, schedule=at([i.step for i in infos]),
            run_dir=None if dry_run else out, mode=mode, noise_data=spec.noise_data, probe_samples=samples,
            seed=seed, force=force, resume=resume is not None, meta=meta, warm_start="auto" if not no_warm_start else False,
            progress=progress.event, summary=_summary_printer(err) if summary else False,
        )
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        if dry_run:
            geometry.close()
            _preflight(geometry, model, spec.loss_fn, infos[0], trust_pickle)  # a dry run checks the loss runs too
            estimate, failure = _estimate(geometry)
    if dry_run:  # data on stdout, outside the redirection of the user's prints to stderr
        where = f"step {infos[0].step} ({Path(infos[0].path).name})"
        if as_json:
            emit_json({"spec": spec_name, "parameters": geometry.space.dim, "dtype": dtype,
                       "checkpoints": len(infos), "cost_plan": geometry.cost_plan,
                       "estimate": estimate and {**estimate, "measured_on": where, "is_estimate": True},
                       "estimate_error": failure})
        else:
            console = out_console()
            console.print(plan_table(geometry.cost_plan, geometry.space.dim, dtype, estimate))
            note = estimate_note(estimate, where, len(infos)) if estimate else f"time not estimated: {failure}"
            console.print(note, markup=False, highlight=False, soft_wrap=True)
        return
    rows: list[dict] = []
    current: CheckpointInfo | None = None
    try:
        with warnings_to_stderr(err):
            _preflight(geometry, model, spec.loss_fn, infos[0], trust_pickle)
            if not quiet:
                err.print(plan_table(geometry.cost_plan, geometry.space.dim, dtype))
            notes: set[str] = set()
            with geometry, progress:
                for info in infos:
                    current = info
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
    except KeyboardInterrupt:
        _interrupted(err, out, current, len(all_infos) - len(infos) + len(rows), len(all_infos),
                     written=geometry.writer is not None and not geometry.unwritten_records)
    if as_json:
        emit_json({"run": out, "spec": spec_name, "mode": mode, "seed": seed, "metrics": metric_names,
                   "checkpoints": rows})
    else:
        out_console().print(_table(rows))
    failed = [r for r in rows if r["errors"]]
    if failed and kept_old_run(geometry):  # --force replaces a run only with one that measured something
        where, message = next(iter(failed[0]["errors"].items()))
        raise click.ClickException(
            f"no checkpoint was measured ({len(failed)} of {len(rows)} probes failed; step {failed[0]['step']}, "
            f"{where}: {message}), so the run in {out} was left as it was: fix the spec's model or loss_fn, or "
            "drop the metric that fails")
    if geometry.unwritten_records:  # the probes ran, but the run log could not take them
        raise click.ClickException(
            f"the run could not be written to {out} ({geometry.write_error}); "
            f"{len(geometry.unwritten_records)} probe record(s) were lost: choose another --out"
        )
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


def _summary_printer(err: Console) -> Any:
    """Each probe's summary line on stderr through the console, so that a progress bar on a terminal stays
    below it; never wrapped (one probe, one line, as a log file holds it)."""
    return lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)


def _estimate(geometry: GeometryProbe) -> tuple[dict | None, str | None]:
    """The time estimate, or why there is none: a dry run still shows the plan when one HVP cannot run here
    (out of memory, a layer without double backward); the probe itself would record that failure."""
    try:
        return estimate_costs(geometry), None
    except Exception as e:
        return None, f"measuring one HVP failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"


def _given() -> set[str]:
    """The options the user gave on the command line (or in the environment), not left at their default."""
    ctx = click.get_current_context()
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    names = {"checkpoints": "checkpoints", "spec_name": "spec", "metrics": "metrics", "mode": "mode", "seed": "seed",
             "samples": "samples", "no_warm_start": "warm_start"}
    return {field for param, field in names.items() if ctx.get_parameter_source(param) in sources}


def _interrupted(err: Console, out: str, current: CheckpointInfo | None, recorded: int, total: int,
                 written: bool) -> None:
    """Ctrl-C: say what is kept and how to continue, exit 130 (the shell's code for SIGINT)."""
    at_ = f" during step {current.step} ({Path(current.path).name})" if current is not None else ""
    if not written and recorded == 0:
        err.print(f"interrupted{at_}: nothing was recorded, so {out} holds no run; run the command again",
                  markup=False, highlight=False, soft_wrap=True)
    else:
        err.print(f"interrupted{at_}: {recorded} of {total} checkpoints are recorded in {out} (the interrupted "
                  f"one is not); continue with: geomprobe probe --resume {shlex.quote(out)}",
                  markup=False, highlight=False, soft_wrap=True)
    click.get_current_context().exit(130)
