"""What each statistic means, read from ``docs/metrics.md``: the one text behind the documentation, ``geomprobe
explain NAME`` and the pointers reports print.

The file ships inside the package (``geomprobe/docs/metrics.md`` in a wheel; pyproject maps the repository's
``docs/`` there), so the installed command works outside a checkout; a source tree reads ``docs/`` directly.
Sections are the ``## NAME`` headings; the text up to the first of them is the introduction.

>>> "rmed" in sections() and summary("rmed").startswith("`R_med`")
True
>>> anchor("rmed")
'docs/metrics.md#rmed'
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from pathlib import Path

from ..errors import ConfigurationError

__all__ = ["DOC_PATH", "anchor", "doc_text", "explain_command", "section", "sections", "summary"]

DOC_PATH = "docs/metrics.md"


def _source() -> Path | resources.abc.Traversable:
    installed = resources.files("geomprobe").joinpath("docs", "metrics.md")
    if installed.is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


@functools.lru_cache(maxsize=1)
def doc_text() -> str:
    """The whole of ``docs/metrics.md``. Raises :class:`ConfigurationError` if the installation lacks it."""
    source = _source()
    try:
        return source.read_text(encoding="utf-8")
    except OSError:
        raise ConfigurationError(
            f"the metric documentation ({DOC_PATH}) is missing from this installation; reinstall geomprobe"
        ) from None


@functools.lru_cache(maxsize=1)
def sections() -> dict[str, str]:
    """``{name: markdown}`` for every ``## name`` section, in the file's order (the heading included)."""
    out: dict[str, str] = {}
    name, lines = None, []
    for line in doc_text().splitlines():
        if line.startswith("## "):
            if name is not None:
                out[name] = "\n".join(lines).strip() + "\n"
            name, lines = line[3:].strip(), [line]
        elif name is not None:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines).strip() + "\n"
    return out


def section(name: str) -> str:
    """The section ``name``; an unknown name raises :class:`ConfigurationError` with the close matches."""
    found = sections()
    if name in found:
        return found[name]
    close = difflib.get_close_matches(name, list(found), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigurationError(
        f"no explanation of {name!r}; {hint}'geomprobe explain' lists them: {', '.join(found)}")


def summary(name: str) -> str:
    """The one-paragraph summary under a section's heading."""
    body = section(name).split("\n", 1)[1].strip()
    return " ".join(body.split("\n\n", 1)[0].split())


def anchor(name: str) -> str:
    """Where the section lives in the repository: ``docs/metrics.md#NAME``."""
    return f"{DOC_PATH}#{name}"


def explain_command(names: list[str]) -> str:
    """The line a report prints under a table to point at the explanations of ``names`` (those documented)."""
    known = [n for n in dict.fromkeys(names) if n in sections()]
    if not known:
        return ""
    return f"What these mean: geomprobe explain NAME for {', '.join(known)} ({DOC_PATH})"
