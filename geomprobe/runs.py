"""The run log: ``meta.json`` + ``records.jsonl`` (+ ``arrays/*.npy``), written by RunWriter, read by RunReader.

Layout of a run folder::

    run_dir/
      meta.json        one JSON object: schema version, versions, creation time, then the caller's meta
      records.jsonl    one JSON object per line, one line per probe; appended, flushed and fsync'd per record
      arrays/          sidecar .npy files for large arrays, named in the records

Encoding (the writer applies it, the reader undoes it; the files stay strict JSON any tool can read):

* Non-finite floats are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (strings, not
  ``null``, so a diverged ``inf`` stays distinct from an undefined ``nan``) and read back as floats. A string
  value spelled exactly so therefore also reads back as a float.
* numpy scalars become Python numbers; tuples become lists; dict keys become strings (integer keys in
  decimal); paths become strings.
* numpy arrays and torch tensors with at most ``inline_max`` elements become nested lists. Larger ones (a
  density grid) are saved to ``arrays/`` and the record holds a reference
  ``{"$array": "arrays/<file>.npy", "shape": [...], "dtype": "..."}`` that :meth:`RunReader.load_array` opens.
  Plain Python lists always stay inline: the caller chose them.

Crash safety: each record is a single ``write`` of one complete line, then ``fsync``; a sidecar is written
to a temporary name, fsync'd and renamed before the line that names it. A process killed at any point leaves
every completed record readable and at most a partial last line, which :class:`RunReader` skips.

>>> import tempfile, numpy as np
>>> with tempfile.TemporaryDirectory() as tmp:
...     with RunWriter(tmp + "/run", {"model": "MLP"}) as w:
...         _ = w.append({"step": 0, "loss": float("nan"), "spectrum": {"lambda_max": 2.5}})
...         _ = w.append({"step": 10, "loss": 0.5, "spectrum": {"lambda_max": 3.0}, "grid": np.zeros(1000)})
...     r = RunReader(tmp + "/run")
...     print(r.meta["model"], r.records[0]["loss"], r.series("spectrum.lambda_max"))
...     print(r.load_array(r.records[1]["grid"]).shape)
MLP nan (array([ 0, 10]), array([2.5, 3. ]))
(1000,)
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ._runs_io import Encoder, append_line, decode, is_tensor, repair_tail, save_npy, tensor_to_numpy, write_durable
from .errors import ConfigurationError
from .runs_export import ARRAY_KEY, export_csv, flatten_record

__all__ = [
    "SCHEMA_VERSION",
    "INLINE_MAX",
    "ARRAY_KEY",
    "RunWriter",
    "RunReader",
    "export_csv",
    "flatten_record",
]

SCHEMA_VERSION = 1
META_FILE = "meta.json"
RECORDS_FILE = "records.jsonl"
ARRAYS_DIR = "arrays"
# Arrays with more elements than this go to a sidecar: a top-k list (k <= a few dozen) stays in the line,
# a density grid (hundreds of points) does not.
INLINE_MAX = 64

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# ---------------------------------------------------------------------------------------------- meta


def _read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META_FILE
    if not path.is_file():
        raise ConfigurationError(
            f"{str(run_dir)!r} is not a geomprobe run: it has no {META_FILE} (a run folder holds {META_FILE} "
            f"and {RECORDS_FILE}); pass the run_dir a GeometryProbe or `geomprobe probe` wrote"
        )
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ConfigurationError(f"{str(path)!r} is not valid JSON ({exc}); the run's metadata is damaged") from None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigurationError(f"{str(path)!r} has no integer schema_version, so it is not a geomprobe run's meta")
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"run {str(run_dir)!r} has schema version {version}, newer than the {SCHEMA_VERSION} this geomprobe "
            "reads; upgrade geomprobe (pip install -U geomprobe)"
        )
    return decode(meta)


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


# ---------------------------------------------------------------------------------------------- writer


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
        full_meta = {**_base_meta(), **Encoder(None).encode(dict(meta or {}), "meta")}

        state = self._inspect()
        if state == "run" and resume:
            self.meta: dict[str, Any] = self._resume()
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
        self.meta = decode(full_meta)

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
        meta = _read_meta(self.run_dir)
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
        line = json.dumps(out, allow_nan=False, separators=(",", ":"))  # ASCII: no encoding questions anywhere
        append_line(self.records_path, (line + "\n").encode("ascii"))
        self.n_records += 1
        return out

    def close(self) -> None:
        """Mark the writer closed (each record is already on disk: no file stays open between appends)."""
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


# ---------------------------------------------------------------------------------------------- reader


def _split_path(path: str | Sequence[str]) -> list[str]:
    if isinstance(path, str):
        if not path:
            raise ConfigurationError("series: path is empty; name a metric value such as 'spectrum.lambda_max'")
        return path.split(".")
    return [str(p) for p in path]


def _lookup(obj: Any, parts: list[str], exact: bool) -> tuple[bool, Any]:
    """Find ``parts`` in nested dicts; with ``exact=False`` a key may itself contain dots (``layer1.weight``)."""
    if not parts:
        return True, obj
    if not isinstance(obj, dict) or ARRAY_KEY in obj:
        return False, None
    widths = [1] if exact else range(len(parts), 0, -1)  # longest key first
    for n in widths:
        key = ".".join(parts[:n])
        if key in obj:
            found, value = _lookup(obj[key], parts[n:], exact)
            if found:
                return True, value
    return False, None


class RunReader:
    """Reads a run folder written by :class:`RunWriter`; every access sees the records on disk now.

    ``records`` skips a partial or corrupt *last* line silently (that is what a crash leaves); a corrupt line
    anywhere else raises :class:`ConfigurationError` naming its line number.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.exists():
            raise ConfigurationError(f"run folder {str(self.run_dir)!r} does not exist; check the path")
        if not self.run_dir.is_dir():
            raise ConfigurationError(f"{str(self.run_dir)!r} is a file; a run is a folder holding {META_FILE}")
        self.meta: dict[str, Any] = _read_meta(self.run_dir)
        self.records_path = self.run_dir / RECORDS_FILE

    @property
    def records(self) -> list[dict[str, Any]]:
        """All complete records, in the order written (re-read from disk at each access)."""
        if not self.records_path.exists():
            return []
        lines = self.records_path.read_bytes().split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if i == last:
                    break  # a crash mid-write truncates only the last line: the records before it are whole
                raise ConfigurationError(
                    f"{str(self.records_path)!r}: line {i + 1} is not a complete JSON record ({exc}). A crash only "
                    f"ever truncates the last line, so the file was damaged or edited; repair or delete line "
                    f"{i + 1} to read the run"
                ) from None
            records.append(decode(record))
        return records

    def __len__(self) -> int:
        return len(self.records)

    def load_array(self, ref: Mapping[str, Any] | str | os.PathLike[str]) -> np.ndarray:
        """The sidecar array behind ``ref``: a reference dict from a record, or a filename from write_array."""
        if isinstance(ref, Mapping) and isinstance(ref.get(ARRAY_KEY), str):
            rel = ref[ARRAY_KEY]
        elif isinstance(ref, (str, os.PathLike)):
            rel = os.fspath(ref)
        else:
            raise ConfigurationError(
                f"load_array: expected a record's array reference (a dict with {ARRAY_KEY!r}) or a filename such "
                f"as 'arrays/x.npy', got {ref!r}"
            )
        root = self.run_dir.resolve()
        path = (root / rel).resolve()
        if root not in path.parents:
            raise ConfigurationError(f"load_array: {rel!r} points outside the run folder {str(self.run_dir)!r}")
        if not path.is_file():
            raise ConfigurationError(f"load_array: sidecar {rel!r} is missing from run folder {str(self.run_dir)!r}")
        return np.load(path, allow_pickle=False)

    def series(self, path: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one value along the run, e.g. ``series("spectrum.lambda_max")``.

        ``path`` is dotted; keys containing dots (block names such as ``layer1.weight``) are matched longest
        first, or pass a tuple of keys to be exact. Records without ``step`` or without the value are
        skipped; ``null`` reads as NaN. A list-valued leaf (``spectrum.top``) gives a 2-D ``values``.
        """
        parts, exact = _split_path(path), not isinstance(path, str)
        records = self.records
        steps, values = [], []
        for record in records:
            found, value = _lookup(record, parts, exact)
            if not found or "step" not in record:
                continue
            if isinstance(value, dict):
                what = "a sidecar array; use load_array" if ARRAY_KEY in value else f"a dict with keys {sorted(value)}"
                raise ConfigurationError(f"series: {path!r} at step {record['step']} is {what}; name a number")
            if isinstance(value, str):
                raise ConfigurationError(
                    f"series: {path!r} at step {record['step']} is the string {value!r}, not a number"
                )
            steps.append(record["step"])
            values.append(math.nan if value is None else value)
        if records and not steps:
            leaves = sorted({k for r in records for k, v in flatten_record(r).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
            shown = ", ".join(leaves[:20]) + (", ..." if len(leaves) > 20 else "")
            raise ConfigurationError(f"series: no record of {str(self.run_dir)!r} has {path!r}; numeric values "
                                     f"present: {shown or '(none)'}")
        try:
            return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"series: the values of {path!r} do not form a numeric array ({exc})") from None

    def to_dataframe(self) -> Any:
        """The records as a pandas DataFrame, one row per record, nested values as dotted columns."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("RunReader.to_dataframe() needs pandas, which is not installed; install it with "
                              "`pip install pandas`") from exc
        return pd.DataFrame([flatten_record(r) for r in self.records])

    def __repr__(self) -> str:
        return f"RunReader({str(self.run_dir)!r})"
