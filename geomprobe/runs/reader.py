"""RunReader: a run folder read back, skipping a truncated last line; series, arrays and data frames."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .encoding import ARRAY_KEY, decode, flatten_record
from .files import META_FILE, RECORDS_FILE, SCHEMA_VERSION

__all__ = ["RunReader", "read_meta"]


def read_meta(run_dir: Path) -> dict[str, Any]:
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
    return decode(meta, version)


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
        self.meta: dict[str, Any] = read_meta(self.run_dir)
        self.records_path = self.run_dir / RECORDS_FILE

    @property
    def records(self) -> list[dict[str, Any]]:
        """All complete records, in the order written (re-read from disk at each access)."""
        if not self.records_path.exists():
            return []
        version = int(self.meta.get("schema_version", SCHEMA_VERSION))
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
            records.append(decode(record, version))
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
