"""Flattening run records to columns, and CSV export of a run.

A record is a nested dict (``{"step": 200, "spectrum": {"lambda_max": 3.1, ...}}``); analysis tools want
columns (``step``, ``spectrum.lambda_max``). :func:`flatten_record` joins nested keys with a separator,
keeps lists as lists, and replaces a sidecar-array reference by its relative filename. :func:`export_csv`
writes one row per record with the union of columns, in first-seen order. Neither needs pandas.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import ConfigurationError

if TYPE_CHECKING:  # runs imports this module; only the annotation needs RunReader
    from .runs import RunReader

__all__ = ["flatten_record", "export_csv", "ARRAY_KEY"]

# The key that marks a sidecar-array reference in a record; defined here so runs.py and this module agree.
ARRAY_KEY = "$array"


def flatten_record(record: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Nested dicts flattened to ``sep``-joined keys; lists kept; array references become their filename.

    >>> flatten_record({"step": 3, "spectrum": {"lambda_max": 2.0, "top": [2.0, 1.0]},
    ...                 "density": {"$array": "arrays/d.npy", "shape": [100], "dtype": "float64"}})
    {'step': 3, 'spectrum.lambda_max': 2.0, 'spectrum.top': [2.0, 1.0], 'density': 'arrays/d.npy'}
    """
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, Mapping) and ARRAY_KEY in value:
            flat[prefix] = value[ARRAY_KEY]
        elif isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{prefix}{sep}{key}" if prefix else str(key))
        elif isinstance(value, Mapping):
            flat[prefix] = None  # an empty dict has no leaves; keep the column so it is not silently lost
        else:
            flat[prefix] = value

    for key, value in record.items():
        walk(value, str(key))
    return flat


def _cell(value: Any) -> str:
    """One CSV cell: empty for missing, JSON for lists, ``nan``/``inf``/``-inf`` for non-finite floats."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        # NaN inside a list stays JSON's NaN token: readable by Python's json and by pandas.
        return json.dumps(value)
    return str(value)  # str(float) is the shortest string that reads back to the same float


def export_csv(reader: RunReader, path: str | os.PathLike[str] | TextIO, *, overwrite: bool = False) -> int:
    """Write the run's records to CSV, one row per record, dotted columns; returns the number of rows.

    ``path`` is a file name or an open text stream (``sys.stdout`` for the CLI). An existing file is
    refused unless ``overwrite=True``. Missing values are empty cells; lists are JSON; sidecar arrays
    appear as their filename relative to the run folder.
    """
    rows = [flatten_record(r) for r in reader.records]
    columns: dict[str, None] = {}  # ordered set: first-seen order, "step" first when present
    for row in rows:
        columns.update(dict.fromkeys(row))
    header = list(columns)

    def write(stream: TextIO) -> None:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(col)) for col in header])

    if isinstance(path, io.TextIOBase) or hasattr(path, "write"):
        write(path)  # type: ignore[arg-type]
        return len(rows)
    target = Path(path)
    if target.is_dir():
        raise ConfigurationError(f"{str(target)!r} is a folder; give a file name such as {str(target / 'run.csv')!r}")
    if target.exists() and not overwrite:
        raise ConfigurationError(f"CSV file {str(target)!r} already exists; pass overwrite=True to replace it "
                                 "or choose another path")
    with open(target, "w", newline="", encoding="utf-8") as stream:
        write(stream)
    return len(rows)
