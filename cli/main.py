"""Entry point of the ``geomprobe`` command."""

from __future__ import annotations

import click

from geomprobe import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geomprobe")
def cli() -> None:
    """Measure the local geometry of a neural network's loss along its training trajectory."""


def main() -> None:
    cli()
