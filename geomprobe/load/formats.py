"""Reading checkpoint files: torch files (safe by default), safetensors, Hugging Face folders.

Each reader returns a :class:`Source`: the weights as key -> tensor (memory-mapped where the format allows,
so looking at a large checkpoint's keys and shapes costs little), the optimizer state if the file holds one,
the top-level scalars a step can be read from, and a format name.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError
from .pathnames import name_problem, shown_path

__all__ = ["Source", "read_source", "HF_WEIGHT_FILES"]

# Keys under which training scripts keep the model's weights, most specific first.
MODEL_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "weights")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_state", "optim", "opt")
STEP_KEYS = ("global_step", "step", "iteration", "epoch")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Harmless classes training scripts often save beside the weights (argparse arguments); allowed in safe loading.
_SAFE_EXTRA_GLOBALS = [argparse.Namespace]
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_SAFETENSORS_HEADER_MAX = 100_000_000


@dataclass
class Source:
    """What a checkpoint holds, read once."""

    path: str
    format: str
    tensors: Mapping[str, Any]
    optimizer_state: dict | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    # Safetensors are read lazily: shapes from the header, tensors on demand.
    loader: Callable[[str], torch.Tensor] | None = None

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {k: tuple(v.shape) if hasattr(v, "shape") else None for k, v in self.tensors.items()}

    def integer_keys(self) -> dict[str, str]:
        """Keys of tensors stored as integers or booleans, with their dtype: never trainable weights."""
        out = {}
        for k, v in self.tensors.items():
            dtype = getattr(v, "dtype", None)
            if isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex):
                out[k] = str(dtype).replace("torch.", "")
            elif isinstance(dtype, str) and dtype.upper().startswith(_SAFETENSORS_INTEGER):
                out[k] = dtype
        return out

    def tensor(self, key: str) -> Any:
        return self.loader(key) if self.loader is not None else self.tensors[key]


def _first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(". ")[0][:160]


def _corrupt(path: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"checkpoint {path!r} is corrupt or not a checkpoint ({why})")


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, torch.Tensor):
            tensors += 1
        elif not k.endswith("_extra_state"):
            return False
    return tensors > 0


def _is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def _scalar(v: Any) -> int | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and v >= 0 else None


# ------------------------------------------------------------------------------------------ torch files


def _torch_load(path: str, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    zipped = head == b"PK\x03\x04"
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            # mmap: tensors stay on disk until copied into the model (zip format only).
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        if found is None:
            raise _corrupt(path, "the safe unpickler cannot read it") from None
        if not trust_pickle:
            raise ConfigurationError(
                f"checkpoint {path!r} holds pickled Python objects ({found.group(1)}), which safe loading "
                "(weights_only=True) refuses; if you trust the file pass --trust-pickle (trust_pickle=True in "
                "Python; unpickling can run arbitrary code), or re-save it with torch.save(model.state_dict(), path)"
            ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise _corrupt(path, _first_sentence(e)) from None
    warnings.warn(
        f"loading {path!r} with weights_only=False (--trust-pickle): unpickling can run arbitrary code; "
        "do this only for files you trust",
        UserWarning,
        stacklevel=4,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=zipped)
    except Exception as e:
        raise ConfigurationError(
            f"unpickling checkpoint {path!r} failed ({type(e).__name__}: {_first_sentence(e)}); the classes it "
            "names must be importable here, e.g. run from the training code's folder"
        ) from None


def _weights_of(obj: Any) -> tuple[Mapping[str, Any], str] | None:
    if isinstance(obj, nn.Module):
        return obj.state_dict(), "pickled-module"
    if _is_state_dict(obj):
        return obj, "state-dict"
    if isinstance(obj, Mapping):
        for key in MODEL_KEYS:
            v = obj.get(key)
            if isinstance(v, nn.Module):
                return v.state_dict(), "pickled-module"
            if _is_state_dict(v):
                lightning = "pytorch-lightning_version" in obj or "optimizer_states" in obj
                return v, "lightning" if lightning else "training-dict"
    return None


def _optimizer_of(obj: Mapping) -> dict | None:
    for key in OPTIMIZER_KEYS:
        v = obj.get(key)
        if isinstance(v, torch.optim.Optimizer):
            return v.state_dict()
        if _is_optimizer_state(v):
            return dict(v)
    states = obj.get("optimizer_states")  # Lightning: one per optimizer, the first drives the model
    if isinstance(states, (list, tuple)) and states and _is_optimizer_state(states[0]):
        return dict(states[0])
    return None


def _read_torch(path: str, trust_pickle: bool) -> Source:
    obj = _torch_load(path, trust_pickle)
    found = _weights_of(obj)
    if found is None:
        if isinstance(obj, Mapping):
            keys = _shown_keys(obj)
            raise ConfigurationError(
                f"found no model weights in {path!r}: a dict with keys {keys}; expected a state dict, or a "
                f"training dict holding one under {', '.join(repr(k) for k in MODEL_KEYS[:4])}"
            )
        raise ConfigurationError(f"found no model weights in {path!r}: it holds a {type(obj).__name__}")
    tensors, fmt = found
    fields: dict[str, Any] = {}
    optimizer = None
    if isinstance(obj, Mapping) and fmt != "state-dict":
        fields = {k: obj[k] for k in STEP_KEYS if k in obj}
        optimizer = _optimizer_of(obj)
    return Source(path, fmt, tensors, optimizer, fields)


def _shown_keys(obj: Mapping, limit: int = 8) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    return ", ".join(keys) + (", ..." if len(obj) > limit else "")


# ------------------------------------------------------------------------------------------ safetensors


def _safetensors_open(path: str) -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ConfigurationError(
            f"reading {path!r} needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a damaged header
        raise _corrupt(path, _first_sentence(e)) from None


class _LazySafetensors(Mapping):
    """Keys and shapes from safetensors headers; a tensor is read only when asked for."""

    def __init__(self, files: Mapping[str, str]):
        self.files = dict(files)  # key -> file
        self.handles: dict[str, Any] = {}
        self.meta: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # safetensors' names: F32, BF16, I64, BOOL, ...
        for file in sorted(set(self.files.values())):
            h = self.handles[file] = _safetensors_open(file)
            self.meta.update(h.metadata() or {})
            for k in h.keys():
                piece = h.get_slice(k)
                self._shapes[k] = tuple(piece.get_shape())
                self._dtypes[k] = str(piece.get_dtype())

    def __getitem__(self, key: str) -> Any:
        return _Shaped(self._shapes[key], self._dtypes[key])

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def load(self, key: str) -> torch.Tensor:
        file = self.files.get(key)
        try:
            return self.handles[file].get_tensor(key)
        except Exception as e:
            raise _corrupt(file, f"tensor {key!r}: {_first_sentence(e)}") from None


@dataclass(frozen=True)
class _Shaped:
    shape: tuple[int, ...]
    dtype: str = "F32"


_SAFETENSORS_INTEGER = ("I", "U", "BOOL")  # I8..I64, U8..U64, BOOL


def _read_safetensors(files: Mapping[str, str], path: str, fmt: str) -> Source:
    lazy = _LazySafetensors(files)
    fields = {k: lazy.meta[k] for k in STEP_KEYS if k in lazy.meta}
    fields = {k: int(v) for k, v in fields.items() if str(v).isdigit()}
    return Source(path, fmt, lazy, None, fields, loader=lazy.load)


def _single_safetensors(path: str) -> Source:
    handle = _safetensors_open(path)
    return _read_safetensors({k: path for k in handle.keys()}, path, "safetensors")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < _SAFETENSORS_HEADER_MAX and head[8:9] == b"{"


# ------------------------------------------------------------------------------------------ HF folders


def _index_files(folder: Path, index_name: str) -> dict[str, str]:
    index = folder / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _corrupt(str(index), f"unreadable shard index: {_first_sentence(e)}") from None
    return {k: str(folder / v) for k, v in weight_map.items()}


def _read_hf_folder(folder: Path, trust_pickle: bool) -> Source:
    path = str(folder)
    if (folder / "model.safetensors").is_file():
        src = _single_safetensors(str(folder / "model.safetensors"))
    elif (folder / "model.safetensors.index.json").is_file():
        src = _read_safetensors(_index_files(folder, "model.safetensors.index.json"), path, "hf-folder")
    elif (folder / "pytorch_model.bin").is_file():
        src = _read_torch(str(folder / "pytorch_model.bin"), trust_pickle)
    elif (folder / "pytorch_model.bin.index.json").is_file():
        tensors: dict[str, Any] = {}
        for file in sorted(set(_index_files(folder, "pytorch_model.bin.index.json").values())):
            tensors.update(_read_torch(file, trust_pickle).tensors)
        src = Source(path, "hf-folder", tensors)
    else:
        raise ConfigurationError(
            f"folder {path!r} is not a Hugging Face save_pretrained folder: it has none of {', '.join(HF_WEIGHT_FILES)}; "
            "pass checkpoint files (e.g. dir/*.pt) or the folder save_pretrained wrote"
        )
    src.path, src.format = path, "hf-folder"
    state = folder / "trainer_state.json"  # a Trainer checkpoint folder records its step here
    if state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError, AttributeError):
            step = None
        if _scalar(step) is not None:
            src.fields = {"global_step": step}
    optimizer = folder / "optimizer.pt"
    if optimizer.is_file():
        obj = _torch_load(str(optimizer), trust_pickle)
        src.optimizer_state = dict(obj) if _is_optimizer_state(obj) else None
    return src


# ------------------------------------------------------------------------------------------ dispatch


def read_source(path: str | bytes | Path, *, trust_pickle: bool = False) -> Source:
    """Open one checkpoint (a file of any supported format, or a ``save_pretrained`` folder), by its content."""
    problem = name_problem(path)
    if problem is not None:
        raise ConfigurationError(f"checkpoint '{shown_path(path)}': {problem}")
    p = Path(os.fsdecode(path))
    if p.is_dir():
        return _read_hf_folder(p, trust_pickle)
    if not p.exists():
        raise ConfigurationError(f"checkpoint {str(p)!r} does not exist")
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        raise _corrupt(str(path), "the file is empty")
    if p.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _single_safetensors(str(p))
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise _corrupt(str(path), "neither a torch.save zip archive, a pickle nor a safetensors file")
    return _read_torch(str(p), trust_pickle)
