"""Synthetic run folders for the report, compare and trajectory tests, written with RunWriter directly.

The records have the shape GeometryProbe writes (step, time, wall, loss, grad_norm, one dict per metric,
lr per param group, cost, errors) with made-up but plausible numbers, so these tests need no model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from geomprobe.runs.writer import RunWriter

BLOCKS = [{"name": "0.weight", "size": 256, "params": ["0.weight"]},
          {"name": "2.weight", "size": 80, "params": ["2.weight"]}]


def optimizer_meta(optimizer: str) -> tuple[str, list[dict[str, Any]]]:
    if optimizer == "sgd":
        return "SGD", [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": False}]
    if optimizer == "adam":
        return "Adam", [{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0, "amsgrad": False}]
    raise ValueError(optimizer)


def record(step: int, optimizer: str, *, lr: float) -> dict[str, Any]:
    """One probe at ``step``: sharpness grows, loss falls, R_med grows for SGD and stays low for Adam."""
    t = step / 100.0
    lam = 10.0 + 12.0 * t
    rmed = (20.0 + 30.0 * t) if optimizer == "sgd" else (8.0 + 0.5 * t)
    rec: dict[str, Any] = {
        "step": step, "time": 1.7e9 + step, "wall": 0.5 * step + 0.1,
        "loss": 2.0 * math.exp(-t) + 0.05, "grad_norm": 3.0 * math.exp(-0.5 * t),
        "spectrum": {"lambda_max": lam, "lambda_max_err": 0.01 * lam, "lambda_min": -0.5, "lambda_min_err": 0.05,
                     "top": [lam], "top_err": [0.01 * lam], "converged": step != 300, "steps": 12, "hvps": 12},
        "rmed": {"rmed": rmed, "rmed_err": 0.5, "rmed_ci": [rmed - 0.5, rmed + 0.5], "rmed_q99": rmed / 2,
                 "rmed_q99_err": 0.2, "max": 4.0, "median": 4.0 / rmed, "exact": True, "hvps": 336,
                 "blocks": {b["name"]: {"rmed": rmed * (1 + i), "rmed_err": 0.1, "median": 0.1, "size": b["size"]}
                            for i, b in enumerate(BLOCKS)}},
        "diagshare": {"diagshare": 0.31, "diagshare_err": 0.01, "diagshare_ci": [0.3, 0.32], "wigner": 0.003,
                      "ols": 0.05, "d": 336, "n": 128, "hvps": 64,
                      "blocks": {b["name"]: {"diagshare": 0.4 - 0.1 * i, "diagshare_err": 0.02}
                                 for i, b in enumerate(BLOCKS)}},
        "noise": {"alpha_pooled": 1.3, "alpha_pooled_err": 0.05, "alpha_standardized": 1.55,
                  "alpha_standardized_err": 0.05, "gap": 0.25, "scale_heterogeneity": True, "samples": 64,
                  "hill_alpha": 2.5, "hill_alpha_err": 0.3, "hvps": 0,
                  "blocks": {b["name"]: {"alpha": 1.4, "alpha_standardized": 1.6, "alpha_standardized_err": 0.1}
                             for b in BLOCKS}},
        "saddle": {"saddle": "yes" if step == 200 else "no", "flag": step == 200, "lambda_min": -0.5,
                   "lambda_min_err": 0.01, "eps_h": 0.01, "converged": True, "hvps": 20},
        "lr": [lr],
        "cost": {"hvps": 432, "seconds": 0.05, "peak_mib": None, "graph_mib": 1.5, "chunk_size": 16},
    }
    if optimizer == "adam":
        rec["precond"] = {"lambda_max": 300.0 + 40.0 * t, "lambda_max_err": 1.0, "lambda_min": -2.0,
                          "rmed": 3.0, "raw_rmed": rmed, "raw_lambda_max": lam, "converged": True, "hvps": 40}
    if step == 100:
        rec["errors"] = {"isotropy": "OutOfMemory: CUDA out of memory (simulated)"}
    return rec


def make_run(path: Path, optimizer: str = "sgd", steps: range = range(0, 600, 100), *,
             lr_schedule: Any = None) -> Path:
    """A run folder at ``path`` with one record per step; ``lr_schedule(step)`` overrides the constant lr."""
    name, hparams = optimizer_meta(optimizer)
    meta = {"model": "Sequential", "parameters": 336, "measured_parameters": 336, "blocks": BLOCKS,
            "optimizer": name, "optimizer_hparams": hparams,
            "probe": {"mode": "eval", "metrics": {"spectrum": {}, "rmed": {}, "diagshare": {}, "noise": {},
                                                  "saddle": {}}, "schedule": "every(100)", "batches": 2,
                      "seed": 0, "hvp_method": "autograd"},
            "device": "cpu", "dtype": "float32"}
    with RunWriter(path, meta) as writer:
        for step in steps:
            lr = hparams[0]["lr"] if lr_schedule is None else lr_schedule(step)
            writer.append(record(step, optimizer, lr=lr))
    return path
