"""RunWriter: creates a run folder and appends one record per probe, crash-safe (see :mod:`geomprobe.runs`
for the format)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .encoding import ARRAY_KEY, Encoder, decode, is_tensor, strip_nonfinite, tensor_to_numpy
from .files import (
    ARRAYS_DIR,
    META_FILE,
    RECORDS_FILE,
    SCHEMA_VERSION,
    append_line,
    check_unlocked,
    release_lock,
    repair_tail,
    save_npy,
    take_lock,
    write_durable,
)
from .reader import read_meta

__all__ = ["INLINE_MAX", "RunWriter"]


# Arrays with more elements than this go to a sidecar: a top-k list (k <= a few dozen) stays in the line,
# a density grid (hundreds of points) does not.
INLINE_MAX = 64


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _version_of(module: str) -> str | None:
    # The loaded module's own version first (a source tree has no installed metadata), then the metadata.
    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _base_meta() -> dict[str, Any]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema_version": SCHEMA_VERSION,
        "geomprobe_version": _version_of("geomprobe"),
        "torch_version": _version_of("torch"),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "created": now.isoformat(timespec="seconds"),
        "created_unix": time.time(),
    }


def _safe_name(name: str) -> str:
    return _UNSAFE_NAME.sub("_", name).strip("._")[:120]


class RunWriter:
    """Creates a run folder and appends one record per probe; see the module docstring for the format.

    ``meta`` (model class, parameter count, blocks, optimizer and hyperparameters, probe policy, ...) is
    merged after the writer's own fields (schema version, geomprobe/torch/numpy/python versions, creation
    time), so the caller's value wins on any key except ``schema_version``, which is the writer's alone.

    An existing non-empty ``run_dir`` is refused with :class:`ConfigurationError` before anything is written,
    unless ``force=True`` (its meta.json, records.jsonl and arrays/*.npy are deleted and a new run starts;
    other files are left alone) or ``resume=True`` (records are appended to the existing run, whose
    meta.json must carry this schema version and is kept as it is; a partial last line left by a crash is
    dropped first). ``resume=True`` on a missing or empty folder starts a new run, so one training script
    serves both the first launch and restarts.

    ``inline_max``: arrays and tensors with more elements go to sidecar .npy files.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        meta: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
        resume: bool = False,
        inline_max: int = INLINE_MAX,
    ) -> None:
        if force and resume:
            raise ConfigurationError("RunWriter: force=True replaces a run and resume=True appends to it; pass one")
        if isinstance(inline_max, bool) or not isinstance(inline_max, int) or inline_max < 0:
            raise ConfigurationError(f"RunWriter: inline_max must be an integer >= 0, got {inline_max!r}")
        if meta is not None and not isinstance(meta, Mapping):
            raise ConfigurationError(f"RunWriter: meta must be a dict, got {type(meta).__name__}")
        if meta is not None and "schema_version" in meta:
            raise ConfigurationError("RunWriter: meta may not set 'schema_version'; the writer records it itself")
        self.run_dir = Path(run_dir)
        self.inline_max = inline_max
        self.records_path = self.run_dir / RECORDS_FILE
        self.arrays_dir = self.run_dir / ARRAYS_DIR
        self._closed = False
        self.n_records = 0  # records in records.jsonl, counting those of a resumed run
        # Encode the meta before looking at the disk: an unstorable value fails without creating anything.
        full_meta = strip_nonfinite({**_base_meta(), **Encoder(None).encode(dict(meta or {}), "meta")})

        state = self._inspect()
        if state == "run" and (resume or force):
            check_unlocked(self.run_dir)  # another live process appending to it: refuse before touching it
        if state == "run" and resume:
            self.meta: dict[str, Any] = self._resume()
            take_lock(self.run_dir)
            return
        if state in ("run", "other") and force:
            self._clear()
        elif state == "run":
            raise ConfigurationError(
                f"run folder {str(self.run_dir)!r} already holds a geomprobe run; refusing to overwrite it. "
                "Pass force=True to replace it, resume=True to append to it, or choose a new run_dir"
            )
        elif state == "other":
            entries = sorted(os.listdir(self.run_dir))
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigurationError(
                f"run folder {str(self.run_dir)!r} is not empty ({shown}) and holds no {META_FILE}, so it is not "
                "a geomprobe run" + ("" if not resume else " to resume")
                + "; choose a new or empty run_dir, or pass force=True to write the run into it anyway"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_durable(self.run_dir / META_FILE, (json.dumps(full_meta, indent=2, allow_nan=False) + "\n").encode())
        write_durable(self.records_path, b"")
        self.meta = decode(json.loads(json.dumps(full_meta)))
        take_lock(self.run_dir)

    # The folder's state decides between create, refuse, replace and resume.
    def _inspect(self) -> str:
        if not self.run_dir.exists():
            return "absent"
        if not self.run_dir.is_dir():
            raise ConfigurationError(f"run_dir {str(self.run_dir)!r} is a file, not a folder; choose another run_dir")
        entries = os.listdir(self.run_dir)
        if not entries:
            return "empty"
        return "run" if META_FILE in entries else "other"

    def _resume(self) -> dict[str, Any]:
        meta = read_meta(self.run_dir)
        if meta["schema_version"] != SCHEMA_VERSION:
            raise ConfigurationError(
                f"cannot resume run {str(self.run_dir)!r}: it has schema version {meta['schema_version']}, this "
                f"geomprobe writes {SCHEMA_VERSION}; start a new run_dir"
            )
        if self.records_path.exists():
            repair_tail(self.records_path)
            with open(self.records_path, "rb") as f:
                self.n_records = sum(1 for line in f if line.strip())
        else:
            write_durable(self.records_path, b"")
        return meta

    def _clear(self) -> None:
        # Only what a writer creates (including its temporary files); anything else in the folder is the user's.
        for name in (META_FILE, RECORDS_FILE, f".{META_FILE}.tmp", f".{RECORDS_FILE}.tmp"):
            (self.run_dir / name).unlink(missing_ok=True)
        if self.arrays_dir.is_dir():
            for path in self.arrays_dir.iterdir():
                if path.suffix == ".npy" or (path.name.startswith(".") and path.name.endswith(".npy.tmp")):
                    path.unlink()
            if not any(self.arrays_dir.iterdir()):
                self.arrays_dir.rmdir()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"RunWriter for {str(self.run_dir)!r} is closed; open a new one with resume=True")

    def _save_array(self, stem: str, array: np.ndarray) -> str:
        """Save ``array`` under a free name ``arrays/<stem>[-k].npy``; returns the path relative to run_dir."""
        self.arrays_dir.mkdir(exist_ok=True)
        name, k = f"{stem}.npy", 0
        while (self.arrays_dir / name).exists():  # orphans of a crashed record, or a repeated explicit name
            k += 1
            name = f"{stem}-{k}.npy"
        save_npy(self.arrays_dir / name, array)
        return f"{ARRAYS_DIR}/{name}"

    def write_array(self, name: str, array: Any) -> str:
        """Save ``array`` (numpy array, tensor or nested list of numbers) as a sidecar; returns its filename.

        The filename is relative to the run folder (``"arrays/<name>.npy"``, with ``-1``, ``-2``, ... added if
        taken); put it in a record and read it back with :meth:`RunReader.load_array`.
        """
        self._check_open()
        stem = _safe_name(str(name).removesuffix(".npy"))
        if not stem:
            raise ConfigurationError(f"write_array: name {name!r} has no usable characters; use e.g. 'density'")
        data = tensor_to_numpy(array) if is_tensor(array) else np.asarray(array)
        if data.dtype.kind not in "biufc":
            raise ConfigurationError(f"write_array: {name!r} has dtype {data.dtype}; only numeric arrays can be saved")
        return self._save_array(stem, data)

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record as a JSON line, durably; returns the record as written (JSON-safe, refs filled).

        Large arrays are saved to sidecars first, so a line never names a file that is not there.
        """
        self._check_open()
        if not isinstance(record, Mapping):
            raise ConfigurationError(f"RunWriter.append: a record is a dict, got {type(record).__name__}")
        encoder = Encoder(self.inline_max)
        out = encoder.encode(record, "")
        step = out.get("step")
        # Sidecars sort by step in a listing; records without a step fall back to their position in the run.
        has_step = isinstance(step, int) and not isinstance(step, bool)
        prefix = f"step{step:08d}" if has_step else f"record{self.n_records:06d}"
        for path, array, ref in encoder.pending:
            ref[ARRAY_KEY] = self._save_array(f"{prefix}-{_safe_name(path) or 'array'}", array)
        out = strip_nonfinite(out)  # after the sidecars: the references it copies are filled in
        line = json.dumps(out, allow_nan=False, separators=(",", ":"))  # ASCII: no encoding questions anywhere
        append_line(self.records_path, (line + "\n").encode("ascii"))
        self.n_records += 1
        return out

    def close(self) -> None:
        """Mark the writer closed and release the run (each record is already on disk: no file stays open
        between appends)."""
        if not self._closed:
            release_lock(self.run_dir)
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.run_dir)!r}, records={self.n_records})"
