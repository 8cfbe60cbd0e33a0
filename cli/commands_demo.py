"""``geomprobe demo``: the main job on the embedded data (scikit-learn's digits), end to end."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import click
from rich import box
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from geomprobe import optim
from geomprobe.demo import DEMO_METRICS, DEMO_OPTIMIZERS, run_demo
from geomprobe.load.pathnames import name_problem, shown_path
from geomprobe.report import compare_runs, render_comparison

from ._common import SEED, emit_json, err_console, handle_errors, out_console

__all__ = ["demo"]

# The comparison a person wants first: curvature and conditioning where each optimizer reached the same loss.
COMPARE = ["spectrum.lambda_max", "spectrum.lambda_min", "rmed.rmed", "diagshare.diagshare",
           "precond.lambda_max"]


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("geomprobe-demo"),
              show_default=True, help="Folder for the runs (one per optimizer).")
@click.option("--optimizers", default=",".join(DEMO_OPTIMIZERS), show_default=True,
              help=f"Comma-separated names from: {', '.join(optim.available())}.")
@click.option("--budget", type=click.FloatRange(min=1), default=1200, show_default=True,
              help="Training budget per optimizer, in backprops (gradient 1, HVP 1, function value 1/2).")
@click.option("--probes", type=click.IntRange(min=1), default=6, show_default=True, help="Probes per run.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace the runs in an existing --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results and the comparison as one JSON document.")
@handle_errors
def demo(out_dir: Path, optimizers: str, budget: float, probes: int, seed: int, force: bool, as_json: bool) -> None:
    """Train an MLP on scikit-learn's digits with SGD (momentum), Adam and the RMSProp trust region on the
    same budget of backprops, probe the geometry along each trajectory, and compare the runs.

    \b
    Examples:
      geomprobe demo
      geomprobe demo --budget 3000 --optimizers sgdm,adam,tr-sphere,tr-rmsprop --out runs/demo --force
      geomprobe report geomprobe-demo/adam
    """
    names = [n.strip() for n in optimizers.split(",") if n.strip()]
    if not names:
        raise click.BadParameter(f"name at least one optimizer; choose from {', '.join(optim.available())}",
                                 param_hint="--optimizers")
    if not math.isfinite(budget):  # FloatRange(min=1) lets inf through (a run that never ends) and nan too
        raise click.BadParameter(f"the budget must be a finite number of backprops >= 1, got {budget}",
                                 param_hint="--budget")
    for n in names:
        if n not in optim.available():
            raise click.BadParameter(f"unknown optimizer {n!r}; choose from {', '.join(optim.available())}",
                                     param_hint="--optimizers")
    problem = name_problem(os.path.join(out_dir, max(names, key=len)), utf8=False)  # each run is a folder in it
    if problem is not None:
        raise click.BadParameter(f"'{shown_path(out_dir)}': {problem}", param_hint="--out")
    err = err_console()
    err.print(f"geomprobe demo: {len(names)} optimizers x {budget:g} backprops on sklearn digits, "
              f"{probes} probes each ({', '.join(DEMO_METRICS)}) -> {out_dir}/")
    with Progress(TextColumn("{task.description:<11}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
                  disable=not err.is_terminal) as progress:
        tasks = {n: progress.add_task(n, total=1.0) for n in names}
        results = run_demo(str(out_dir), optimizers=names, budget=budget, probes=probes, seed=seed, force=force,
                           on_progress=lambda n, f: progress.update(tasks[n], completed=f))
    runs = [r.run_dir for r in results]
    cmp = compare_runs(runs, by="loss", metrics=COMPARE, levels=6)
    if as_json:
        emit_json({"results": [dataclasses.asdict(r) for r in results], "comparison": cmp.to_dict()})
        return
    out = out_console()
    table = Table(title="Training on the same budget", box=box.SIMPLE_HEAD)
    for col in ("optimizer", "steps", "backprops", "final loss", "train acc", "test acc", "probes", "seconds"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    for r in results:
        table.add_row(r.optimizer, str(r.steps), f"{r.backprops:.0f}", f"{r.final_loss:.3g}",
                      f"{r.train_accuracy:.3f}", f"{r.test_accuracy:.3f}", str(r.probes), f"{r.seconds:.1f}")
    out.print(table)
    render_comparison(cmp, out)
    err.print(f"Runs written to {out_dir}/. Next: geomprobe report {runs[0]} --per-layer; "
              f"geomprobe compare {' '.join(runs)} --by step")
