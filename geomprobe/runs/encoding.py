"""The JSON-safe encoding of records (non-finite floats, numpy and torch values, sidecar references) and
its inverse, and the flattening of nested records to columns.

Non-finite floats (schema version 2 on): standard JSON has no NaN or infinity, and the strings older runs
wrote in their place (``"NaN"``, ``"Infinity"``) turn whole columns into strings in pandas, polars and
DuckDB. So a non-finite value is written as ``null`` where it stands, and the object that holds the record
(or meta.json) lists it under :data:`NONFINITE_KEY`, keyed by its RFC 6901 JSON Pointer, with ``"NaN"``,
``"Infinity"`` or ``"-Infinity"``::

    {"step": 3, "loss": null, "spectrum": {"top": [2.5, null]},
     "$nonfinite": {"/loss": "NaN", "/spectrum/top/1": "Infinity"}}

Any JSON reader gets numeric columns (``null`` is a missing value); :func:`decode` puts the floats back, so a
diverged ``inf`` stays distinct from an undefined ``nan``. Runs of schema version 1 are still read: there,
the strings are the non-finite values (:func:`decode` with ``schema_version=1``).
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigurationError

__all__ = ["ARRAY_KEY", "NONFINITE_KEY", "Encoder", "decode", "encode_float", "flatten_record", "is_tensor",
           "strip_nonfinite", "tensor_to_numpy"]

# The key that marks a sidecar-array reference in a record.
ARRAY_KEY = "$array"
# The key of the top-level object that names the non-finite values written as null (module docstring).
NONFINITE_KEY = "$nonfinite"


_NONFINITE_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_float(x: float) -> float | str:
    """The schema-1 spelling of a float: itself when finite, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    return x if math.isfinite(x) else _NONFINITE_TO_STR[repr(x)]


def _pointer_token(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _pointer_keys(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def strip_nonfinite(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (already JSON-safe but for non-finite floats) with each non-finite float replaced by
    ``None`` and listed under :data:`NONFINITE_KEY` by JSON Pointer; unchanged when it holds none.

    >>> strip_nonfinite({"loss": float("nan"), "top": [1.0, float("-inf")], "a/b": {"x": float("inf")}})
    {'loss': None, 'top': [1.0, None], 'a/b': {'x': None}, '$nonfinite': {'/loss': 'NaN', '/top/1': '-Infinity', '/a~1b/x': 'Infinity'}}
    """
    if NONFINITE_KEY in document:
        raise ConfigurationError(f"a record may not use the key {NONFINITE_KEY!r}: the run log keeps it for "
                                 "non-finite values; rename it")
    found: dict[str, str] = {}

    def walk(value: Any, pointer: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found[pointer] = _NONFINITE_TO_STR[repr(value)]
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{pointer}/{_pointer_token(k)}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{pointer}/{i}") for i, v in enumerate(value)]
        return value

    out = walk(document, "")
    if found:
        out[NONFINITE_KEY] = found
    return out


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
            return float(value)  # a non-finite one is written as null by strip_nonfinite
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


def _decode_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _STR_TO_NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _decode_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_strings(v) for v in value]
    return value


def decode(document: Any, schema_version: int = 2) -> Any:
    """Undo the non-finite encoding of one record or meta document (module docstring): from schema version
    2 the nulls listed under :data:`NONFINITE_KEY` become floats again (the key is removed); in version 1
    the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` are the non-finite floats.

    >>> decode({"loss": None, "s": {"top": [1.0, None]}, "$nonfinite": {"/loss": "NaN", "/s/top/1": "Infinity"}})
    {'loss': nan, 's': {'top': [1.0, inf]}}
    >>> decode({"loss": "Infinity"}, schema_version=1)
    {'loss': inf}
    """
    if schema_version < 2:
        return _decode_strings(document)
    if not isinstance(document, dict) or not isinstance(document.get(NONFINITE_KEY), dict):
        return document
    out = {k: v for k, v in document.items() if k != NONFINITE_KEY}
    for pointer, spelling in document[NONFINITE_KEY].items():
        keys = _pointer_keys(str(pointer))
        holder: Any = out
        for key in keys[:-1]:
            if isinstance(holder, list) and key.isdigit() and int(key) < len(holder):
                holder = holder[int(key)]
            else:
                holder = holder.get(key) if isinstance(holder, dict) else None
        if not keys or spelling not in _STR_TO_NONFINITE:
            continue  # a pointer or spelling no writer produces: leave the null as it is
        last = keys[-1]
        if isinstance(holder, list) and last.isdigit() and int(last) < len(holder):
            holder[int(last)] = _STR_TO_NONFINITE[spelling]
        elif isinstance(holder, dict) and last in holder:
            holder[last] = _STR_TO_NONFINITE[spelling]
    return out

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
