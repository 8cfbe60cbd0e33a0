"""Checks of a GeometryProbe's options at construction.

A probe catches every failure at probe time so that training goes on; an option that can never work would
then fail at every probe, and a whole run would finish having measured nothing. So whatever can be checked
before training starts is checked here, each with one message saying what was given and what is accepted.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..engine.landscape import HVP_METHODS
from ..engine.loss import LOSS_FORMS
from ..engine.sharded import fully_sharded
from ..engine.state import MODES
from ..errors import ConfigurationError
from .metric_spec import check_options

__all__ = ["MAX_SEED", "check_metric_options", "check_probe_options", "check_sharded_metrics"]

# numpy's legacy seeding and Lightning's seed_everything take this range; offsets added to a seed stay in
# torch's 64-bit range.
MAX_SEED = 2**32 - 1


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")


def check_probe_options(
    *,
    mode: Any,
    hvp_method: Any,
    loss_form: Any,
    chunk_size: Any,
    micro_batch_size: Any,
    basis_device: Any,
    seed: Any,
    run_dir: Any,
    memory_cap: Any,
    peak_ratio: Any,
    recompute_attention: Any = None,
    vector_device: Any = None,
) -> None:
    """Raise :class:`ConfigurationError` for the first option that no probe could run with. Costs nothing."""
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if hvp_method not in HVP_METHODS:
        raise ConfigurationError(f"hvp_method must be one of {', '.join(map(repr, HVP_METHODS))}, got {hvp_method!r}")
    if loss_form not in LOSS_FORMS:
        raise ConfigurationError(f"loss_form must be one of {', '.join(map(repr, LOSS_FORMS))}, got {loss_form!r}")
    _positive_int_or_none("chunk_size", chunk_size)
    _positive_int_or_none("micro_batch_size", micro_batch_size)
    if memory_cap is not None and (isinstance(memory_cap, bool) or not isinstance(memory_cap, numbers.Real)
                                   or not (math.isfinite(memory_cap) and memory_cap > 0)):
        raise ConfigurationError(f"memory_cap must be a positive number of bytes or None, got {memory_cap!r}")
    if basis_device is not None:
        try:
            torch.device(basis_device)
        except (RuntimeError, TypeError):
            raise ConfigurationError(
                f"basis_device must be a torch device such as 'cpu' or 'cuda:0' (or None: the model's), "
                f"got {basis_device!r}"
            ) from None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigurationError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigurationError(f"seed must be between 0 and {MAX_SEED} (2**32 - 1), got {seed}")
    if run_dir is not None and (not isinstance(run_dir, (str, os.PathLike)) or not os.fspath(run_dir).strip()):
        raise ConfigurationError(f"run_dir must be a folder path (or None for no run log), got {run_dir!r}")
    if isinstance(peak_ratio, bool) or not isinstance(peak_ratio, numbers.Real) or not (
        math.isfinite(peak_ratio) and peak_ratio > 0
    ):
        raise ConfigurationError(f"peak_ratio must be a positive finite number, got {peak_ratio!r}")
    if recompute_attention is not None and not isinstance(recompute_attention, bool):
        raise ConfigurationError(
            f"recompute_attention must be True, False or None (the memory plan chooses), got {recompute_attention!r}")
    if vector_device is not None:
        try:
            torch.device(vector_device)
        except (RuntimeError, TypeError):
            raise ConfigurationError(
                f"vector_device must be 'cpu' (HVP vectors in host memory), the model's device, or None (the "
                f"memory plan chooses), got {vector_device!r}") from None
        if torch.device(vector_device).type == "cpu" and hvp_method == "finite-difference":
            raise ConfigurationError(
                "vector_device='cpu' streams the exact HVP's vectors through the double backward; finite "
                "differences hold whole vectors on the device: use hvp_method='autograd' or leave vector_device "
                "at None")


def check_metric_options(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise :class:`ConfigurationError` for an option no metric of that name takes (a misspelt ``tol`` would
    otherwise fail at every probe), or a value of the wrong type or out of range (:mod:`.metric_spec`);
    metrics that take ``**kwargs`` accept any key."""
    for name, opts in options.items():
        check_options(name, opts)


# Metrics that take a sharded Landscape's slices (their Krylov kernels run on its vector space)
SHARDED_METRICS = ("spectrum",)


def check_sharded_metrics(model: Any, metrics: Any) -> None:
    """Refuse, before training starts, metrics that cannot yet measure an FSDP2-sharded ``model``."""
    if not fully_sharded(model):
        return
    unsupported = [n for n in metrics if n not in SHARDED_METRICS]
    if unsupported:
        raise ConfigurationError(
            f"metric(s) {', '.join(map(repr, unsupported))} cannot yet measure a model sharded by FSDP2; on "
            f"sharded models geomprobe measures {', '.join(map(repr, SHARDED_METRICS))} (see docs/distributed.md)")
