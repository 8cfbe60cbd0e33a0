"""What makes a path unusable as a file name before any file is opened: a name longer than the file system
takes (the system would say ``ENAMETOOLONG``, or ``os.path.exists`` would say only "no"), or a name that is not
valid UTF-8, which torch and safetensors cannot open (they would call the file corrupt)."""

from __future__ import annotations

import os

__all__ = ["name_problem", "shown_path"]

_NAME_MAX = 255  # POSIX file systems' usual limit on one name, in bytes
_PATH_MAX = 4096


def shown_path(path: str | bytes | os.PathLike, limit: int = 80) -> str:
    """``path`` for a message: bytes that are not UTF-8 as ``\\xff`` escapes, a long path shortened."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2:]}"


def _limit(path: bytes, name: str, default: int) -> int:
    """The file system's limit where ``path`` would live: asked of its nearest existing folder."""
    folder = os.path.dirname(os.path.abspath(path)) or b"/"
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return int(os.pathconf(folder or b"/", name))
    except (OSError, ValueError, AttributeError):  # no pathconf on this platform
        return default


def name_problem(path: str | bytes | os.PathLike, *, utf8: bool = True) -> str | None:
    """Why ``path`` cannot name a file here, in words, or ``None``. ``utf8``: also require a UTF-8 name (what
    torch and safetensors can open). Cost: a few ``stat`` calls, no file opened."""
    raw = os.fsencode(path)
    if utf8:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"its name is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start}), and torch and "
                    "safetensors open files only by UTF-8 names: rename it")
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    name_max = _limit(raw, "PC_NAME_MAX", _NAME_MAX)
    if longest > name_max:
        return f"a name in it is {longest} bytes long, more than the {name_max} the file system allows: use a shorter name"
    path_max = _limit(raw, "PC_PATH_MAX", _PATH_MAX)
    if len(os.path.abspath(raw)) >= path_max:
        return f"it is {len(os.path.abspath(raw))} bytes long, more than the {path_max} the system allows: use a shorter path"
    return None
