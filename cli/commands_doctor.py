"""``geomprobe doctor --spec SPEC``: can this model be probed, and what to do about each problem."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from geomprobe.doctor import Check, diagnose
from geomprobe.engine.landscape import unwrap_model
from geomprobe.load.spec import load_spec
from geomprobe.probe.estimate import estimate_costs
from geomprobe.probe.geometry_probe import DEFAULT_METRICS, GeometryProbe
from geomprobe.probe.metric_spec import METRIC_SPEC_HELP, resolve_metrics
from geomprobe.probe.schedule import at

from ._common import SEED, emit_json, err_console, handle_errors, out_console, plain_output
from ._metric_option import METRIC
from ._plan import estimate_note, plan_table
from .commands_probe import SPEC_HELP, warnings_to_stderr

__all__ = ["doctor"]


def _cost(spec: Any, metrics: dict, mode: str, seed: int, samples: int | None) -> tuple[dict | None, str | None]:
    """The planned cost and estimated time of probing the spec's model with ``metrics``, or why not."""
    model = unwrap_model(spec.model)
    try:
        probe = GeometryProbe(model, spec.loss_fn, spec.probe_data, metrics=metrics, schedule=at([0]), mode=mode,
                              noise_data=spec.noise_data, probe_samples=samples, seed=seed)
        probe.close()
        estimate = estimate_costs(probe)
    except Exception as e:  # a cost the checks did not foresee failing is reported, not raised
        return None, f"could not be estimated ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {"parameters": probe.space.dim, "dtype": dtype, "cost_plan": probe.cost_plan,
            "estimate": {**estimate, "is_estimate": True}}, None

_STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def _table(checks: list[Check], spec_name: str, mode: str) -> Table:
    table = Table(title=f"doctor: {spec_name} ({mode} mode)", title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("found")
    table.add_column("what to do")
    plain = plain_output()
    for c in checks:
        status = c.status if plain else f"[{_STYLE[c.status]}]{c.status}[/]"
        table.add_row(c.name, status, Text(c.detail), Text(c.advice or "-"))  # messages are not markup
    return table


@click.command("doctor")
@click.option("--spec", "spec_name", required=True, metavar="MODULE:FN|FILE.py:FN", help=SPEC_HELP)
@click.option("--mode", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="The mode policy to check under.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seeds the spec, probe data and test vectors.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Probe examples drawn from the spec's DataLoader (default: one loader batch).")
@click.option("--metric", "metrics", multiple=True, type=METRIC, metavar="NAME[:key=value,...]",
              help=f"Metric whose cost to plan (repeat for several; default: {', '.join(DEFAULT_METRICS)}): "
                   f"{METRIC_SPEC_HELP}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
def doctor(spec_name: str, mode: str, seed: int, samples: int | None, metrics: tuple[tuple[str, dict], ...],
           as_json: bool) -> None:
    """Check whether the spec's model can be probed, and what a probe of it will cost.

    Checks double backward, the attention kernel, BatchNorm, dropout, per-example gradients, the parameters
    and the optimizer, each with what to do about a problem; then, when nothing failed, prints each metric's
    planned HVPs, memory and a time estimated from one measured HVP. Exit 0 when nothing FAILs, 1 otherwise.
    """
    err = err_console()
    metric_options = resolve_metrics([{"name": n, **o} for n, o in metrics] or list(DEFAULT_METRICS))
    with warnings_to_stderr(err):
        spec = load_spec(spec_name, seed=seed)
        checks = diagnose(spec, mode=mode, seed=seed, samples=samples)
        failed = [c.name for c in checks if c.status == "FAIL"]
        cost, cost_error = (None, "not estimated: a check failed") if failed else _cost(spec, metric_options, mode,
                                                                                         seed, samples)
    if as_json:
        emit_json({"spec": spec_name, "mode": mode, "ok": not failed, "checks": [c.as_dict() for c in checks],
                   "cost": cost, "cost_error": cost_error})
    else:
        console = out_console()
        console.print(_table(checks, spec_name, mode))
        if cost is not None:
            console.print(plan_table(cost["cost_plan"], cost["parameters"], cost["dtype"], cost["estimate"]))
            console.print(estimate_note(cost["estimate"], "the spec's model"), markup=False, highlight=False,
                          soft_wrap=True)
        elif not failed:
            console.print(f"cost: {cost_error}", markup=False, highlight=False, soft_wrap=True)
    if failed:
        raise click.ClickException(f"{len(failed)} check(s) failed: {', '.join(failed)}; see 'what to do'")
