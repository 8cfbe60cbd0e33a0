"""What every command shares: library errors become one clear line and exit 1; messages go to stderr."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from geomprobe.errors import GeomprobeError
from geomprobe.load.pathnames import name_problem, shown_path
from geomprobe.probe.options import MAX_SEED

__all__ = ["SEED", "emit_json", "err_console", "handle_errors", "out_console", "plain_output", "TrimmedLines",
           "PIPE_WIDTH"]

# One clear line for a seed no generator takes (2**64, -1), before anything runs.
SEED = click.IntRange(0, MAX_SEED)


def plain_output() -> bool:
    """Plain text when stdout is not a terminal or NO_COLOR is set."""
    return bool(os.environ.get("NO_COLOR")) or not sys.stdout.isatty()


# Width given to rich when output is not a terminal: wide enough that nothing is wrapped (a command a user
# copies from a log stays on one line); the trimming stream drops the padding rich adds up to that width.
PIPE_WIDTH = 10_000


class TrimmedLines:
    """A text stream that drops trailing spaces from every line it passes on to ``stream`` (rich pads table
    rows and grid cells to their width, which a pipe, a log file or ``diff`` should not see)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        if lines:
            self.stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._pending.strip(" "):
            self.stream.write(self._pending.rstrip(" "))
            self._pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


def err_console() -> Console:
    """Progress and messages: stderr, no colour when NO_COLOR is set or stderr is not a terminal; on a pipe
    messages are not wrapped (a suggested command stays whole) nor padded."""
    if sys.stderr.isatty():
        return Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
    return Console(file=TrimmedLines(sys.stderr), no_color=True, highlight=False, width=PIPE_WIDTH,
                   force_terminal=False, soft_wrap=True)


def out_console(width: int | None = None) -> Console:
    """Data: stdout; plain when not a terminal or NO_COLOR. On a pipe nothing is wrapped and no line carries
    trailing spaces (tables take their natural width)."""
    plain = plain_output()
    if not sys.stdout.isatty():
        return Console(file=TrimmedLines(sys.stdout), no_color=True, highlight=False, width=width or PIPE_WIDTH,
                       force_terminal=False)
    return Console(no_color=plain, highlight=False, width=width, force_terminal=False if plain else None)


def emit_json(doc: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(doc, indent=2, default=str, allow_nan=True))


def handle_errors(fn: Callable) -> Callable:
    """Turn geomprobe's errors and the system's file errors into click's one-line error and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.ClickException:
            raise
        except (GeomprobeError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full or read-only disk, a path through a file, a name too long
            name = getattr(e, "filename", None)
            if e.errno == errno.ENAMETOOLONG and name is not None:
                raise click.ClickException(f"'{shown_path(name)}': {name_problem(name, utf8=False) or e.strerror}") from None
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}: check the path and the disk") from None

    return wrapper
