"""The files of a run folder and how they are written: names, schema version, and crash-safe writes
(whole-line appends with fsync, sidecars published by rename, repair of a partial last line)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import ConfigurationError

__all__ = ["ARRAYS_DIR", "LOCK_FILE", "META_FILE", "RECORDS_FILE", "SCHEMA_VERSION", "append_line", "check_unlocked",
           "fsync_dir", "release_lock", "repair_tail", "save_npy", "take_lock", "write_durable"]


# 1: non-finite floats as the strings "NaN"/"Infinity"/"-Infinity"; 2: as null, named under "$nonfinite"
# (runs/encoding.py). Readers read both; a writer resumes only runs of its own version.
SCHEMA_VERSION = 2


META_FILE = "meta.json"


RECORDS_FILE = "records.jsonl"


ARRAYS_DIR = "arrays"
LOCK_FILE = ".writer.lock"  # pid and host of the process appending to the run


def fsync_dir(path: Path) -> None:
    # Makes a created or renamed entry durable; not possible on every platform (Windows), and not needed
    # for SIGKILL safety, only for power loss, so failure is ignored.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file, fsync and a rename, so ``path`` is always whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: readers and listings never mistake it for data
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` (no pickles) at ``path``, atomically."""
    _publish(path, lambda f: np.save(f, array, allow_pickle=False))


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, atomically."""
    _publish(path, lambda f: f.write(data))


def append_line(path: Path, data: bytes) -> None:
    """Append ``data`` (one complete line) to ``path`` and fsync before returning.

    A line always starts a line: when an earlier write stopped short (a full disk, a killed process) and left
    a partial last line, that tail is repaired first (:func:`repair_tail`), so the new record is never glued to
    it and the run stays readable.
    """
    if _ends_mid_line(path):
        repair_tail(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked; finish the line before returning
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_mid_line(path: Path) -> bool:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) != b"\n"


def repair_tail(path: Path) -> None:
    """Before appending to a crashed run: drop a partial last line, so the next record starts on its own line."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline in chunks; records are small, so this reads little.
        end, chunk, start = size, 65536, 0
        while end > 0:
            begin = max(0, end - chunk)
            f.seek(begin)
            block = f.read(end - begin)
            idx = block.rfind(b"\n")
            if idx >= 0:
                start = begin + idx + 1
                break
            end = begin
        f.seek(start)
        tail = f.read()
        try:
            complete = isinstance(json.loads(tail), dict)
        except ValueError:
            complete = False
        if complete:  # the write stopped just before its newline: the record is whole, keep it
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def _lock_holder(run_dir: Path) -> tuple[int, str] | None:
    """(pid, host) of a live process other than this one holding the run's lock, else None (no lock, ours,
    or one left by a process that has ended on this host)."""
    try:
        pid_s, _, host = (run_dir / LOCK_FILE).read_text().strip().partition(" ")
        pid = int(pid_s)
    except (FileNotFoundError, ValueError):
        return None
    if pid == os.getpid() and host == socket.gethostname():
        return None
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # stale: its writer died without closing
        except PermissionError:
            pass  # alive, another user's
    return pid, host


def check_unlocked(run_dir: Path) -> None:
    """Refuse a run another live process is writing: two writers would interleave their records."""
    holder = _lock_holder(run_dir)
    if holder is not None:
        pid, host = holder
        raise ConfigurationError(
            f"run {str(run_dir)!r} is being written by process {pid} on {host}; two writers would interleave "
            f"their records. Wait for it to finish, choose another run_dir, or, if that process is gone, delete "
            f"{str(run_dir / LOCK_FILE)!r}"
        )


def take_lock(run_dir: Path) -> None:
    """Mark the run as written by this process (checked first: :func:`check_unlocked`)."""
    check_unlocked(run_dir)
    (run_dir / LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")


def release_lock(run_dir: Path) -> None:
    """Remove this process's lock; leave another's alone."""
    path = run_dir / LOCK_FILE
    try:
        pid_s, _, host = path.read_text().strip().partition(" ")
        if int(pid_s) == os.getpid() and host == socket.gethostname():
            path.unlink()
    except (FileNotFoundError, ValueError, OSError):
        pass
