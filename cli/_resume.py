"""`geomprobe probe --resume RUN_DIR`: what the interrupted command was, read back from its run, and which
checkpoints it already recorded.

A probe run written by `geomprobe probe` keeps its command in ``meta.json`` (``probe_command``: checkpoints,
spec, metrics with their options, mode, seed, samples, warm start). Resuming repeats that command for the
checkpoints without a record; anything the user gives again must be what the run was made with, since a run
whose records were measured differently cannot be compared along its steps (the comparison is shared with
``GeometryProbe(resume=True)``: :mod:`geomprobe.probe.resume_check`).
"""

from __future__ import annotations

import os
from typing import Any

from geomprobe.errors import ConfigurationError
from geomprobe.load.checkpoints import expand_checkpoint_paths
from geomprobe.probe.resume_check import metrics_text, plain, same_metrics
from geomprobe.runs.reader import RunReader

__all__ = ["resumed_command"]

_FLAG = {"checkpoints": "CKPT...", "spec": "--spec", "metrics": "--metric", "mode": "--mode", "seed": "--seed",
         "samples": "--samples", "warm_start": "--no-warm-start"}


def resumed_command(run_dir: str, given_command: dict[str, Any], *, given: set[str]) -> tuple[dict, set[int]]:
    """The command that wrote the run in ``run_dir`` and the steps it recorded.

    ``given_command`` holds this invocation's values, ``given`` the fields the user set explicitly; each of
    those must equal the run's (for ``checkpoints``: the same files). Raises :class:`ConfigurationError`
    with what differs and what to do. Reads ``meta.json`` and ``records.jsonl`` only.
    """
    if not os.path.isdir(run_dir):
        raise ConfigurationError(f"--resume {run_dir}: no such run folder; give the --out of the interrupted "
                                 "`geomprobe probe`")
    reader = RunReader(run_dir)
    saved = reader.meta.get("probe_command")
    if not isinstance(saved, dict):
        raise ConfigurationError(
            f"--resume {run_dir}: this run was not written by `geomprobe probe` (its meta.json holds no "
            "probe_command), so there is nothing to continue; probe into a new --out")
    for field in sorted(given):
        mine, theirs = plain(given_command[field]), saved.get(field)
        if field == "checkpoints":
            paths = sorted(os.path.abspath(c["path"]) for c in reader.meta.get("checkpoints", []))
            if mine == theirs:
                continue
            try:
                mine_paths = sorted(os.path.abspath(p) for p in expand_checkpoint_paths(mine))
            except ConfigurationError:
                mine_paths = None
            if mine_paths == paths:
                continue
            raise ConfigurationError(
                f"--resume {run_dir}: the run probes {len(paths)} other checkpoints than the {len(mine)} given; "
                "drop CKPT... to continue the run as it was, or probe these into a new --out")
        if not (same_metrics(theirs, mine) if field == "metrics" else mine == theirs):
            shown = {"metrics": metrics_text, "warm_start": lambda w: "warm starts" if w else "--no-warm-start"}
            fmt = shown.get(field, repr)
            raise ConfigurationError(
                f"--resume {run_dir}: the run was probed with {_FLAG[field]} {fmt(theirs)}, not {fmt(mine)}; "
                f"drop {_FLAG[field]} to continue it as it was, or probe into a new --out")
    command = {**given_command, **saved}
    steps = {r["step"] for r in reader.records if isinstance(r.get("step"), int)}
    return command, steps
