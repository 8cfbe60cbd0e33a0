"""Loading saved weights (and optimizer state) into a spec's model, from every common checkpoint format.

Formats, told apart by content rather than by file name:

=================  ==========================================================================================
``state-dict``     ``torch.save(model.state_dict())`` (``.pt``/``.pth``/``.bin``); ``module.`` (DDP) and
                   ``_orig_mod.`` (``torch.compile``) prefixes are removed
``training-dict``  a dict holding the weights under ``model``/``model_state_dict``/``state_dict``/..., the
                   optimizer's state under ``optimizer``/``optimizer_state_dict``, and ``step``/``global_step``/
                   ``epoch``
``lightning``      a Lightning ``.ckpt``: ``state_dict`` keyed by the LightningModule's attribute names (the
                   common prefix such as ``model.`` is stripped), ``optimizer_states``, ``global_step``
``safetensors``    a ``.safetensors`` file (needs the ``safetensors`` package)
``hf-folder``      a Hugging Face ``save_pretrained`` folder: ``model.safetensors`` or ``pytorch_model.bin``
                   (sharded with an index, or not), a Trainer checkpoint's ``trainer_state.json`` step and
                   ``optimizer.pt``
``pickled-module`` a whole pickled ``nn.Module`` (``torch.save(model)``): only with ``trust_pickle=True``
=================  ==========================================================================================

Files are read with ``torch.load(..., weights_only=True)``, which runs no code from the file; a checkpoint
holding other pickled objects is refused unless ``trust_pickle=True`` (a warning says what that risks).

Steps: a checkpoint's step is its own record (``global_step``, ``step``, ``iteration``, ``epoch``; a Trainer
folder's ``trainer_state.json``), else the number in its name (``step=450`` or ``step_450`` first, else the
last integer: ``ckpt-1200.pt`` -> 1200, ``epoch=3-step=450.ckpt`` -> 450, ``checkpoint-500/`` -> 500), else,
when any checkpoint of a set has neither, each one's position in the order given.

>>> import tempfile, torch
>>> from torch import nn
>>> net = nn.Linear(2, 1)
>>> with tempfile.TemporaryDirectory() as tmp:
...     torch.save({"model": net.state_dict(), "global_step": 300}, tmp + "/ckpt-300.pt")
...     fresh = nn.Linear(2, 1)
...     loaded = load_checkpoint(tmp + "/ckpt-300.pt", fresh)
...     loaded.info.format, loaded.info.step, torch.equal(fresh.weight, net.weight)
('training-dict', 300, True)
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigurationError
from .formats import Source, _scalar, read_source
from .keymatch import KeyMatch, match_state_dict
from .pathnames import name_problem, shown_path

__all__ = [
    "CheckpointInfo",
    "LoadedCheckpoint",
    "expand_checkpoint_paths",
    "inspect_checkpoint",
    "load_checkpoint",
    "step_from_name",
    "plan_checkpoints",
]

STEP_SOURCES = ("global_step", "step", "iteration", "epoch", "file name", "order")
_NAMED_STEP = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)
_INTEGER = re.compile(r"\d+")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as found: its path, format, step (and where the step came from), optimizer state."""

    path: str
    format: str
    step: int | None
    step_source: str | None
    has_optimizer: bool
    tensors: int


@dataclass
class LoadedCheckpoint:
    """The result of :func:`load_checkpoint`: the model now holds the weights; ``optimizer`` holds the state."""

    info: CheckpointInfo
    match: KeyMatch
    optimizer: torch.optim.Optimizer | None


def step_from_name(path: str | os.PathLike) -> int | None:
    """The step a checkpoint's name gives: ``step=N``/``step_N`` if present, else the last integer, else None."""
    p = Path(path)
    name = p.name if p.is_dir() else p.stem
    named = _NAMED_STEP.findall(name)
    if named:
        return int(named[-1])
    numbers = _INTEGER.findall(name)
    return int(numbers[-1]) if numbers else None


def _recorded_step(src: Source) -> tuple[int | None, str | None]:
    for key in STEP_SOURCES[:4]:
        v = _scalar(src.fields.get(key))
        if v is not None:
            return v, key
    return None, None


def expand_checkpoint_paths(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """Paths as given, with glob patterns the shell left alone expanded (sorted); duplicates dropped.

    A pattern matching nothing, or a path that does not exist, raises :class:`ConfigurationError`.
    """
    if not patterns:
        raise ConfigurationError("no checkpoints given; pass one or more files, folders or glob patterns")
    out: list[str] = []
    seen: set[str] = set()
    for pattern in map(os.fsdecode, patterns):
        problem = name_problem(pattern)
        if problem is not None:
            raise ConfigurationError(f"checkpoint '{shown_path(pattern)}': {problem}")
        if os.path.exists(pattern):
            found = [pattern]
        elif _GLOB_CHARS.search(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise ConfigurationError(f"no checkpoint matches {pattern!r}")
        else:
            raise ConfigurationError(f"checkpoint {pattern!r} does not exist")
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _info(src: Source) -> CheckpointInfo:
    step, source = _recorded_step(src)
    return CheckpointInfo(
        path=src.path, format=src.format, step=step, step_source=source,
        has_optimizer=src.optimizer_state is not None, tensors=len(src.tensors),
    )


def inspect_checkpoint(
    path: str | os.PathLike, *, model: nn.Module | None = None, trust_pickle: bool = False
) -> CheckpointInfo:
    """Read ``path``'s format, recorded step and contents; with ``model``, also check its keys and shapes fit.

    Tensors are memory-mapped (torch zip files) or read from headers (safetensors), so this is cheap even
    for a large checkpoint. Raises :class:`ConfigurationError` for anything that would fail to load.
    """
    src = read_source(path, trust_pickle=trust_pickle)
    if model is not None:
        match = match_state_dict(src.shapes(), model, source=f"checkpoint {src.path!r}")
        _refuse_integer_parameters(src, match, model)
    return _info(src)


def _refuse_integer_parameters(src: Source, match: KeyMatch, model: nn.Module) -> None:
    """Refuse a checkpoint that stores one of the model's (floating-point) parameters as integers or booleans:
    copying would cast it silently, and the probe would measure a model that never trained (a quantized export,
    or the wrong file). Integer buffers (BatchNorm's ``num_batches_tracked``) are loaded as torch loads them."""
    integer = src.integer_keys()
    if not integer:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    bad = [(key, ck, integer[ck]) for key, ck in match.mapping.items() if ck in integer and key in params]
    if bad:
        key, _, dtype = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigurationError(
            f"checkpoint {src.path!r} stores the model's parameter {key!r} as {dtype}{more}: trainable parameters are "
            f"floating point, and loading would cast the integers silently; probe the float checkpoint (not a "
            "quantized or converted export)"
        )


def plan_checkpoints(
    paths: Sequence[str | os.PathLike], *, model: nn.Module | None = None, trust_pickle: bool = False
) -> list[CheckpointInfo]:
    """Expand, inspect (and, with ``model``, check) every checkpoint, give each a step, and order them by step.

    Every checkpoint is checked before any is probed, so bad input fails before a run is written. Two
    checkpoints with the same step raise :class:`ConfigurationError` (one run holds one record per step).
    """
    infos = [inspect_checkpoint(p, model=model, trust_pickle=trust_pickle) for p in expand_checkpoint_paths(paths)]
    named = [step_from_name(i.path) for i in infos]
    if all(i.step is not None or n is not None for i, n in zip(infos, named)):
        infos = [
            i if i.step is not None else dataclasses.replace(i, step=n, step_source="file name")
            for i, n in zip(infos, named)
        ]
    else:
        infos = [dataclasses.replace(i, step=k, step_source="order") for k, i in enumerate(infos)]
    infos.sort(key=lambda i: i.step)
    for a, b in itertools.pairwise(infos):
        if a.step == b.step:
            raise ConfigurationError(
                f"checkpoints {a.path!r} and {b.path!r} both have step {a.step}; a run holds one probe per "
                "step, so probe them into separate runs"
            )
    return infos


def load_checkpoint(
    checkpoint: str | os.PathLike | CheckpointInfo,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    trust_pickle: bool = False,
) -> LoadedCheckpoint:
    """Copy a checkpoint's weights into ``model`` (and its optimizer state into ``optimizer``, if given).

    ``model`` must have the checkpoint's architecture; its parameters keep their device and dtype (values
    are copied, converted as needed). ``optimizer`` must be built over ``model``'s parameters as in training
    (same class, same parameter groups in the same order); it is returned in ``LoadedCheckpoint.optimizer``
    when the checkpoint holds optimizer state, else ``None`` is. A :class:`CheckpointInfo` from
    :func:`plan_checkpoints` keeps its step; a path gets its recorded step, else the step in its name.
    """
    planned = checkpoint if isinstance(checkpoint, CheckpointInfo) else None
    src = read_source(planned.path if planned else checkpoint, trust_pickle=trust_pickle)
    label = f"checkpoint {src.path!r}"
    match = match_state_dict(src.shapes(), model, source=label)
    _refuse_integer_parameters(src, match, model)
    state = {k: src.tensor(ck) for k, ck in match.mapping.items()}
    result = model.load_state_dict(state, strict=False)
    leftover = sorted(set(result.missing_keys) - set(match.tied)) + list(result.unexpected_keys)
    if leftover:  # match_state_dict should have caught these; never report a partial load as success
        raise ConfigurationError(f"{label} did not fill the model: {', '.join(leftover[:5])}")
    info = planned or _info(src)
    if info.step is None:
        named = step_from_name(info.path)
        info = dataclasses.replace(info, step=named, step_source="file name" if named is not None else None)
    loaded_opt = None
    if optimizer is not None and src.optimizer_state is not None:
        try:
            optimizer.load_state_dict(src.optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise ConfigurationError(
                f"the optimizer state in {label} does not fit the optimizer the spec builds "
                f"({type(optimizer).__name__}: {' '.join(str(e).split())[:160]}); build it as in training: same "
                "class, same parameter groups in the same order"
            ) from None
        _check_optimizer_class(optimizer, src.optimizer_state, label)
        loaded_opt = optimizer
    return LoadedCheckpoint(info, match, loaded_opt)


# State entries each optimizer family creates; a checkpoint's state with another family's entries was saved
# by a different optimizer class, and loading it would silently give wrong preconditioners.
_STATE_KEYS = {
    torch.optim.Adam: "exp_avg_sq",
    torch.optim.AdamW: "exp_avg_sq",
    torch.optim.RMSprop: "square_avg",
    torch.optim.Adagrad: "sum",
}


def _check_optimizer_class(optimizer: torch.optim.Optimizer, state: dict, label: str) -> None:
    key = _STATE_KEYS.get(type(optimizer))
    entries = [s for s in state.get("state", {}).values() if isinstance(s, dict) and s]
    if key is not None and entries and not any(key in s for s in entries):
        found = sorted({k for s in entries for k in s})
        raise ConfigurationError(
            f"the optimizer state in {label} has entries {', '.join(found)} but the spec builds "
            f"{type(optimizer).__name__}, whose state holds {key!r}; build the optimizer class training used"
        )
