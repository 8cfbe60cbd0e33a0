"""The report of one run as plain data: what ``geomprobe report --json`` prints and the tables render.

>>> import tempfile
>>> from geomprobe.runs import RunWriter
>>> with tempfile.TemporaryDirectory() as tmp:
...     with RunWriter(tmp + "/run", {"model": "MLP", "parameters": 10}) as w:
...         for s in range(3):
...             _ = w.append({"step": s, "loss": 1.0 / (s + 1), "spectrum": {"lambda_max": 1.0 + s}})
...     doc = build_report(tmp + "/run")
>>> doc["header"]["model"], doc["probes"], doc["metrics"]["spectrum.lambda_max"]["sparkline"]
('MLP', 3, '▁▅█')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..runs.reader import RunReader
from ..trajectory.edge_of_stability import edge_of_stability
from ..trajectory.smoothness import smoothness_fit
from ._format import jsonable
from .findings import findings
from .sparkline import sparkline
from .summary import block_series, collect_series, cost_summary, dropped_blocks, schedule_summary, summarize

__all__ = ["build_report", "open_run", "header_of", "SPARK_WIDTH"]

SPARK_WIDTH = 24  # characters of a sparkline; longer runs are averaged into this many bins

RunLike = RunReader | str | os.PathLike


def open_run(run: RunLike) -> RunReader:
    """A :class:`RunReader` for a reader or a path (a clear error for a missing folder or a non-run)."""
    return run if isinstance(run, RunReader) else RunReader(run)


def placed_records(reader: RunReader) -> list[dict[str, Any]]:
    """The run's records that carry an integer ``step``, the axis of every report; others (written by hand
    or by another tool) cannot be placed on it and are left out (``build_report`` counts them)."""
    return [r for r in reader.records if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)
            and r.get("kind") != "schedule"]


def schedule_records(reader: RunReader) -> list[dict[str, Any]]:
    """The probes and the compact ``"kind": "schedule"`` records that carry skip counts written at close."""
    return [r for r in reader.records if isinstance(r.get("schedule"), Mapping)]


def header_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the report's header shows: model, sizes, optimizer and its hyperparameters, probe policy."""
    blocks = meta.get("blocks") if isinstance(meta.get("blocks"), list) else []
    probe = meta.get("probe") if isinstance(meta.get("probe"), Mapping) else {}
    metrics = probe.get("metrics")
    return {
        "model": meta.get("model"),
        "parameters": meta.get("parameters"),
        "measured_parameters": meta.get("measured_parameters"),
        "blocks": len(blocks),
        "block_sizes": {b.get("name"): b.get("size") for b in blocks if isinstance(b, Mapping)},
        "optimizer": meta.get("optimizer"),
        "optimizer_hparams": meta.get("optimizer_hparams"),
        "probe": {
            "mode": probe.get("mode"),
            "metrics": list(metrics) if isinstance(metrics, (Mapping, list)) else metrics,
            "schedule": probe.get("schedule"),
            "batches": probe.get("batches"),
            "seed": probe.get("seed"),
            "hvp_method": probe.get("hvp_method"),
        },
        "device": meta.get("device"),
        "dtype": meta.get("dtype"),
        "created": meta.get("created"),
        "geomprobe_version": meta.get("geomprobe_version"),
    }


def _summaries(series: Mapping[str, Any], headline: set[str] | None) -> dict[str, dict[str, Any]]:
    out = {}
    for path, s in series.items():
        summary = summarize(s)
        summary["sparkline"] = sparkline(s.values, SPARK_WIDTH)
        if headline is not None:
            summary["headline"] = path in headline
        out[path] = summary
    return out


def build_report(run: RunLike, *, per_layer: bool = False) -> dict[str, Any]:
    """The whole report as a strict-JSON-ready dict: ``run``, ``header``, ``probes``, ``steps``, ``schedule``
    (scheduled and skipped probes, :func:`~.summary.schedule_summary`), ``metrics``
    (every numeric leaf's summary; ``headline`` marks the rows the table shows), ``blocks`` (with
    ``per_layer``), ``findings``, ``trajectory`` (the (L0, L1) fit and the edge of stability) and ``cost``.
    """
    reader = open_run(run)
    records, meta = placed_records(reader), reader.meta
    unplaced = sum(1 for r in reader.records if r.get("kind") != "schedule") - len(records)
    shown = collect_series(records)
    # The curated rows first (their labels and order are the table's), then every other numeric leaf.
    every = {**shown, **{p: s for p, s in collect_series(records, every_leaf=True).items() if p not in shown}}
    metrics = _summaries(every, set(shown))
    steps = [int(r["step"]) for r in records if isinstance(r.get("step"), int)]
    try:
        smooth: dict[str, Any] = smoothness_fit(records).to_dict()
    except ConfigurationError as e:
        smooth = {"error": str(e)}
    doc: dict[str, Any] = {
        "run": str(Path(reader.run_dir)),
        "header": header_of(meta),
        "probes": len(records),
        **({"unplaced_records": unplaced} if unplaced else {}),
        "steps": [steps[0], steps[-1]] if steps else None,
        "schedule": schedule_summary(schedule_records(reader)) | {"probes": len(records)},
        "metrics": metrics,
        "findings": [f.to_dict() for f in findings(records, meta, schedule_records(reader))],
        "trajectory": {"smoothness": smooth, "edge_of_stability": edge_of_stability(records, meta).to_dict()},
        "cost": cost_summary(records),
    }
    if per_layer:
        doc["blocks"] = {name: _summaries(series, None) for name, series in block_series(records).items()}
        doc["blocks_dropped"] = dropped_blocks(records)
    return jsonable(doc)
