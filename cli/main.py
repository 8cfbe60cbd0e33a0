"""Entry point of the ``geomprobe`` command: the click group and its commands.

Conventions: data on stdout (``--json`` for one JSON document), progress and messages on stderr; exit 0 on
success, 1 on an error (one clear line), 2 on a usage error.
"""

from __future__ import annotations

import click

from geomprobe import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geomprobe")
def cli() -> None:
    """Measure the local geometry of a neural network's loss along its training trajectory.

    Start with `geomprobe demo`: it trains a small MLP on scikit-learn's digits with SGD, Adam and an
    ellipsoidal trust region, probes the geometry along each run, and prints the comparison.
    """


def main() -> None:
    cli()


# Each command lives in its own module (cli/commands_*.py) and is added here, one import and one line each.
from .commands_probe import probe  # noqa: E402

cli.add_command(probe)
from .commands_doctor import doctor  # noqa: E402

cli.add_command(doctor)
from .commands_report import compare, export, report  # noqa: E402

cli.add_command(report)
cli.add_command(compare)
cli.add_command(export)
from .commands_demo import demo  # noqa: E402

cli.add_command(demo)
from .commands_view import view  # noqa: E402

cli.add_command(view)

from .commands_explain import explain  # noqa: E402

cli.add_command(explain)
