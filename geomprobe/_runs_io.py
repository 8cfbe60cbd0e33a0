"""Private helpers of the run log: the JSON-safe encoding of records and crash-safe file writes.

Kept apart from runs.py so that module reads as the format and its two classes; nothing here is public.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import ConfigurationError
from .runs_export import ARRAY_KEY

__all__ = ["Encoder", "decode", "is_tensor", "tensor_to_numpy", "save_npy", "write_durable", "append_line",
           "repair_tail", "fsync_dir"]

_NONFINITE_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_float(x: float) -> float | str:
    return x if math.isfinite(x) else _NONFINITE_TO_STR[repr(x)]


def tensor_to_numpy(value: Any) -> np.ndarray:
    torch = sys.modules["torch"]
    t = value.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().resolve_conj().resolve_neg()
    try:
        return t.numpy()
    except TypeError:  # bfloat16 and float8 have no numpy dtype; float32 holds them exactly
        return t.float().numpy()


def is_tensor(value: Any) -> bool:
    # Looked up, not imported: if torch was never imported, nothing can be a tensor, and readers stay light.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class Encoder:
    """Turns a record into JSON-safe values; large arrays are set aside in ``pending`` for sidecar files.

    Nothing touches the disk here, so an unstorable value fails the whole record before any file is written.
    """

    def __init__(self, inline_max: int | None) -> None:
        self.inline_max = inline_max  # None: everything inline (meta.json has no sidecars)
        self.pending: list[tuple[str, np.ndarray, dict[str, Any]]] = []

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return encode_float(float(value))
        if isinstance(value, Mapping):
            return {self._key(k, path): self.encode(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if is_tensor(value):
            return self._array(tensor_to_numpy(value), path)
        if isinstance(value, np.ndarray):
            return self._array(value, path)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (_dt.datetime, _dt.date)):
            return value.isoformat()
        raise ConfigurationError(
            f"run log value at {path or '<record>'!r} has type {type(value).__name__}, which the run log cannot "
            "store; convert it to a number, string, list, dict, numpy array or tensor"
        )

    @staticmethod
    def _key(key: Any, path: str) -> str:
        if isinstance(key, str):
            return key
        if isinstance(key, numbers.Integral) and not isinstance(key, (bool, np.bool_)):
            return str(int(key))
        raise ConfigurationError(
            f"run log key {key!r} under {path or '<record>'!r} has type {type(key).__name__}; "
            "JSON keys must be strings (or integers), so convert it with str()"
        )

    def _array(self, array: np.ndarray, path: str) -> Any:
        if array.ndim == 0:
            return self.encode(array.item(), path)
        kind = array.dtype.kind
        if kind in "biuf":
            if self.inline_max is not None and array.size > self.inline_max:
                return self._defer(array, path)
            return self.encode(array.tolist(), path)
        if kind == "c" and self.inline_max is not None:
            return self._defer(array, path)  # JSON has no complex numbers; .npy keeps them exactly
        if kind in "OU":
            return self.encode(array.tolist(), path)
        raise ConfigurationError(
            f"run log value at {path or '<record>'!r} is an array of dtype {array.dtype}, which the run log "
            "cannot store; convert it to a numeric array"
        )

    def _defer(self, array: np.ndarray, path: str) -> dict[str, Any]:
        ref = {ARRAY_KEY: None, "shape": list(array.shape), "dtype": str(array.dtype)}
        self.pending.append((path, np.ascontiguousarray(array), ref))
        return ref


def decode(value: Any) -> Any:
    """Undo the non-finite encoding, recursively."""
    if isinstance(value, str):
        return _STR_TO_NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# Files: every write is complete before it becomes visible, and is fsync'd before the call returns.


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
    """Append ``data`` (one complete line) to ``path`` and fsync before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked; finish the line before returning
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


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
