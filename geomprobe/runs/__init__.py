"""The run log: ``meta.json`` + ``records.jsonl`` (+ ``arrays/*.npy``), written by RunWriter, read by RunReader.

Layout of a run folder::

    run_dir/
      meta.json        one JSON object: schema version, versions, creation time, then the caller's meta
      records.jsonl    one JSON object per line, one line per probe; appended, flushed and fsync'd per record
      arrays/          sidecar .npy files for large arrays, named in the records

Encoding (the writer applies it, the reader undoes it; the files stay strict JSON any tool can read):

* Non-finite floats are written as ``null`` (so pandas, polars and DuckDB read numeric columns) and named
  under the record's ``"$nonfinite"`` object by JSON Pointer with ``"NaN"``, ``"Infinity"`` or
  ``"-Infinity"`` (so a diverged ``inf`` stays distinct from an undefined ``nan``); the reader puts the
  floats back (schema version 2, :mod:`geomprobe.runs.encoding`). Runs of schema version 1 wrote the
  strings ``"NaN"``/``"Infinity"`` in place of the value; they are still read.
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

from .encoding import ARRAY_KEY, flatten_record
from .export import export_csv
from .files import SCHEMA_VERSION
from .reader import RunReader
from .writer import INLINE_MAX, RunWriter

__all__ = ["RunWriter", "RunReader", "export_csv", "flatten_record", "ARRAY_KEY", "INLINE_MAX", "SCHEMA_VERSION"]
