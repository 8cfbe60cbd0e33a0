"""Replacing a run by a new one so that a crash at any moment leaves one of the two whole.

``RunWriter(force=True)`` deletes the old run's files and then writes the new ones: a process killed in
between, or a first record that never comes, loses the old run for nothing. :func:`replace_run` writes the new
run (its meta and first records, sidecars included) into a hidden sibling folder first and then swaps the two
folders: atomically where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), else by two renames with the
old run set aside under a hidden name in between (a crash in that instant leaves both runs on disk, the old one
as ``.NAME.geomprobe-old``). Files in the folder that are not the writer's (a user's notes, a checkpoint) are
moved into the new run before the swap, so they stay where they were. Where the folder's parent cannot be
written, the run is replaced in place (as ``RunWriter(force=True)``), once the new records are at hand.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .files import ARRAYS_DIR, LOCK_FILE, META_FILE, RECORDS_FILE, check_unlocked, fsync_dir
from .writer import RunWriter

__all__ = ["replace_run", "staging_folder"]

_OWNED = {META_FILE, RECORDS_FILE, LOCK_FILE, f".{META_FILE}.tmp", f".{RECORDS_FILE}.tmp"}
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def staging_folder(run_dir: Path) -> Path:
    """Where the new run of ``run_dir`` is written before it takes the old one's place (hidden, beside it)."""
    return run_dir.parent / f".{run_dir.name}.geomprobe-new"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _owned_sidecar(name: str) -> bool:
    return name.endswith(".npy") or (name.startswith(".") and name.endswith(".npy.tmp"))


def _foreign(run_dir: Path) -> list[Path]:
    """The entries of ``run_dir`` a writer did not create, relative to it (in ``arrays/`` too)."""
    out = []
    for entry in run_dir.iterdir():
        if entry.name == ARRAYS_DIR and entry.is_dir():
            out += [Path(ARRAYS_DIR) / p.name for p in entry.iterdir() if not _owned_sidecar(p.name)]
        elif entry.name not in _OWNED:
            out.append(Path(entry.name))
    return out


def _renameat2() -> Any:
    """The C library's ``renameat2`` (Linux, glibc 2.28 and later), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> None:
    """Swap folders ``a`` and ``b``: atomically with renameat2 where the C library and the file system have
    it, else ``a`` set aside, ``b`` renamed into its place and the old ``a`` renamed to ``b``."""
    fn = _renameat2()
    if fn is not None and fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        fsync_dir(a.parent)
        return
    aside = a.with_name(f".{a.name}.geomprobe-old")
    _remove(aside)
    os.rename(a, aside)
    try:
        os.rename(b, a)
    except BaseException:
        os.rename(aside, a)
        raise
    os.rename(aside, b)
    fsync_dir(a.parent)


def replace_run(run_dir: str | os.PathLike[str], meta: Mapping[str, Any] | None,
                records: Iterable[Mapping[str, Any]]) -> RunWriter:
    """Replace the run in ``run_dir`` by a new run of ``meta`` holding ``records``, and return a writer that
    appends to the new run.

    The old run is left byte-identical until the new one is complete on disk (meta, records, sidecars,
    fsync'd), and is then swapped out in one step (see the module docstring); a failure before that (a full
    disk, an unstorable record) removes the half-written new run and leaves the old one as it was. A folder
    that is missing or empty just receives the new run. Cost: the records are written once, then renames.
    """
    run_dir = Path(run_dir)
    records = list(records)
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        writer = RunWriter(run_dir, meta)
        for record in records:
            writer.append(record)
        return writer
    if not run_dir.is_dir():
        raise ConfigurationError(f"run_dir {str(run_dir)!r} is a file, not a folder; choose another run_dir")
    check_unlocked(run_dir)  # another live process appending to it: refuse before touching anything
    staging = staging_folder(run_dir)
    _remove(staging)  # left by a replacement that was killed before its swap
    if not os.access(run_dir.parent, os.W_OK | os.X_OK):
        # no room beside the run (a folder the user may write into but not next to): replaced in place, the
        # old files deleted just before the new ones are written
        writer = RunWriter(run_dir, meta, force=True)
        for record in records:
            writer.append(record)
        return writer
    try:
        with RunWriter(staging, meta) as writer:
            for record in records:
                writer.append(record)
        moved = []
        for rel in _foreign(run_dir):  # the user's files stay in the run folder
            (staging / rel).parent.mkdir(exist_ok=True)
            os.rename(run_dir / rel, staging / rel)
            moved.append(rel)
        try:
            _exchange(run_dir, staging)
        except BaseException:
            for rel in moved:
                os.rename(staging / rel, run_dir / rel)
            raise
    except BaseException:
        _remove(staging)
        raise
    _remove(staging)  # now the old run
    return RunWriter(run_dir, resume=True)
