"""Optional TensorBoard scalars for probe records.

:class:`TensorBoardWriter` logs every scalar leaf of a record (``spectrum/lambda_max``, ``rmed/rmed``, ...)
at the record's step. It needs ``torch.utils.tensorboard`` and the ``tensorboard`` package; without them it
warns once per process and does nothing, so a training script runs the same with or without TensorBoard
installed (the run log is the record of truth either way).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from .encoding import flatten_record

__all__ = ["TensorBoardWriter", "scalar_leaves"]

_WARNED = False  # one warning per process, however many probes or writers are created


def _summary_writer_class() -> Any | None:
    """``torch.utils.tensorboard.SummaryWriter`` if usable, else ``None`` (the reason is warned about once)."""
    try:
        import tensorboard  # noqa: F401  (torch's wrapper imports it too, but names it less clearly when missing)
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # a broken install (protobuf mismatch, ...) must not stop training either
        _warn_once(f"{type(exc).__name__}: {exc}")
        return None
    return SummaryWriter


def _warn_once(reason: str) -> None:
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    warnings.warn(
        f"TensorBoard logging is off ({reason}); install it with `pip install tensorboard`. Records still go "
        "to the run log.",
        UserWarning,
        stacklevel=3,
    )


def scalar_leaves(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numeric leaves (bools as 0/1, non-finite kept) under ``/``-joined tags, ``step`` excluded.

    >>> scalar_leaves({"step": 5, "loss": 0.5, "spectrum": {"top": [2.0], "converged": True}, "note": "x"})
    {'loss': 0.5, 'spectrum/converged': 1.0}
    """
    leaves = {}
    for tag, value in flatten_record(record, sep="/").items():
        if tag != "step" and isinstance(value, (int, float)):  # bool is an int: converged flags plot as 0/1
            leaves[tag] = float(value)
    return leaves


class TensorBoardWriter:
    """Logs the scalar leaves of run records to TensorBoard; a no-op (warned once) without tensorboard.

    ``log_dir`` is the event folder (e.g. ``run_dir / "tensorboard"``); ``kwargs`` go to ``SummaryWriter``.
    """

    def __init__(self, log_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        writer_class = _summary_writer_class()
        self._writer = None if writer_class is None else writer_class(log_dir=os.fspath(log_dir), **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether scalars are actually written."""
        return self._writer is not None

    def log(self, record: Mapping[str, Any], step: int | None = None) -> int:
        """Log the record's scalars at ``step`` (default: ``record["step"]``); returns how many were logged."""
        if self._writer is None:
            return 0
        if step is None:
            step = record.get("step")
        leaves = scalar_leaves(record)
        for tag, value in leaves.items():
            # NaN/inf are logged as they are: TensorBoard shows them, and a diverged value should be seen.
            self._writer.add_scalar(tag, value, global_step=step)
        return len(leaves)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
