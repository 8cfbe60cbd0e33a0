"""``geomprobe doctor --spec SPEC``: can this model be probed, and what to do about each problem."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from geomprobe.doctor import Check, diagnose
from geomprobe.load.spec import load_spec

from ._common import SEED, emit_json, err_console, handle_errors, out_console, plain_output
from .commands_probe import SPEC_HELP, warnings_to_stderr

__all__ = ["doctor"]

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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
def doctor(spec_name: str, mode: str, seed: int, samples: int | None, as_json: bool) -> None:
    """Check whether the spec's model can be probed.

    Checks double backward, the attention kernel, BatchNorm, dropout, per-example gradients, the parameters
    and the optimizer, each with what to do about a problem. Exit 0 when nothing FAILs, 1 otherwise.
    """
    err = err_console()
    with warnings_to_stderr(err):
        spec = load_spec(spec_name, seed=seed)
        checks = diagnose(spec, mode=mode, seed=seed, samples=samples)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if as_json:
        emit_json({"spec": spec_name, "mode": mode, "ok": not failed, "checks": [c.as_dict() for c in checks]})
    else:
        out_console().print(_table(checks, spec_name, mode))
    if failed:
        raise click.ClickException(f"{len(failed)} check(s) failed: {', '.join(failed)}; see 'what to do'")
