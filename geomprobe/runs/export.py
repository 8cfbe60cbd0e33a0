"""CSV export of a run: one row per record with the union of flattened columns, in first-seen order; needs
no pandas."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigurationError
from .encoding import flatten_record
from .reader import RunReader

__all__ = ["export_csv"]





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
