"""Probe specs: ``"module:function"`` or ``"path/to/file.py:function"`` naming what to probe.

A checkpoint holds weights, not the code that uses them. A *spec function* supplies the rest: it builds the
model (freshly initialised is fine: the weights come from the checkpoint), the loss and the probe data.

The contract
------------
The spec function is called with no arguments and returns one of:

* a :class:`ProbeSpec` (the documented form),
* a dict with the same field names (``model``, ``loss_fn``, ``probe_data`` required; ``optimizer_factory``
  and ``noise_data`` optional; any other key is refused, so a typo cannot pass silently),
* a tuple ``(model, loss_fn, probe_data)``.

Fields:

``model``
    an ``nn.Module`` with the architecture of the checkpoints (its initial weights are overwritten). Put it
    on the device and in the dtype to probe in; checkpoint tensors are copied into it.
``loss_fn``
    ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)`` (first argument named ``model``), a mean over
    the batch's samples, as :class:`geomprobe.Landscape` takes it.
``probe_data``
    a DataLoader over a map-style dataset (``--samples`` examples are drawn from it, seeded by ``--seed``), an
    ``(inputs, targets)`` pair, or a list of batches. Every checkpoint is probed on the same batches.
``optimizer_factory``
    ``optimizer_factory(model) -> torch.optim.Optimizer``, building the optimizer as training did (same
    class, same parameter groups in the same order), so a training checkpoint's optimizer state can be
    loaded into it for the ``precond`` metric. ``None`` when not needed.
``noise_data``
    batches of the training batch size for the gradient-noise metrics; ``None`` uses per-example gradients.

Before calling the function, :func:`load_spec` seeds torch's global RNG (and restores it afterwards), so a
spec that draws random data or initial weights builds the same thing every time.

Example (``examples/probe_spec_example.py`` is a runnable one)::

    def spec():
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        X, y = torch.load("probe_batch.pt", weights_only=True)
        return ProbeSpec(model, nn.CrossEntropyLoss(), (X, y),
                         optimizer_factory=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))

>>> s = load_spec("geomprobe.load.spec:_doctest_spec")
>>> type(s.model).__name__, s.optimizer_factory is None
('Linear', True)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError

__all__ = ["ProbeSpec", "load_spec", "resolve_callable", "spec_from_result"]

_FORMS = "'module:function' or 'path/to/file.py:function'"


@dataclass
class ProbeSpec:
    """What a spec function returns: the model, the loss and the probe data (module docstring)."""

    model: nn.Module
    loss_fn: Callable
    probe_data: Any
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    noise_data: Any = None

    def build_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer from :attr:`optimizer_factory` for :attr:`model`, or ``None`` without a factory."""
        if self.optimizer_factory is None:
            return None
        try:
            opt = self.optimizer_factory(self.model)
        except Exception as e:  # the user's code: one line saying where it failed
            raise ConfigurationError(f"the spec's optimizer_factory(model) raised {_describe(e)}") from None
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigurationError(
                f"the spec's optimizer_factory(model) must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        return opt


def _describe(e: BaseException) -> str:
    """``Type: first line (at file:line)``, the innermost frame, for one-line messages about user code."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return f"{type(e).__name__}{': ' + first if first else ''}{where}"


def _split(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigurationError(f"spec {spec!r} is not of the form {_FORMS}")
    # rsplit: a Windows path ("C:\\x\\spec.py:fn") has a colon of its own.
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ConfigurationError(f"spec {spec!r} is not of the form {_FORMS}")
    return target, attr


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _import_file(path_str: str) -> Any:
    path = Path(path_str).expanduser()
    if not path.is_file():
        what = "is a folder, not a Python file" if path.is_dir() else "does not exist"
        raise ConfigurationError(f"spec file {path_str!r} {what}; give {_FORMS}")
    name = f"_geomprobe_spec_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigurationError(f"spec file {path_str!r} cannot be imported as Python source")
    module = importlib.util.module_from_spec(loader_spec)
    # The file may import modules beside it, as it would when run as a script.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ConfigurationError(f"importing spec file {path_str!r} failed: {_describe(e)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(target: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
            raise ConfigurationError(
                f"no module named {target!r} for the spec; check the name and that it is importable from here "
                f"(or give a file: 'path/to/file.py:function')"
            ) from None
        raise ConfigurationError(f"importing spec module {target!r} failed: {_describe(e)}") from None
    except Exception as e:
        raise ConfigurationError(f"importing spec module {target!r} failed: {_describe(e)}") from None


def resolve_callable(spec: str) -> Callable:
    """The function ``spec`` names: ``"package.module:function"`` or ``"path/to/file.py:function"``.

    A dotted attribute (``"module:Class.factory"``) is followed. Anything that does not resolve to a callable
    raises :class:`ConfigurationError` with one line saying what was missing.
    """
    target, attr = _split(spec)
    module = _import_file(target) if _is_path(target) else _import_module(target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            hint = f"; it has {', '.join(public[:8])}{', ...' if len(public) > 8 else ''}" if public else ""
            raise ConfigurationError(f"spec {spec!r}: {target!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigurationError(
            f"spec {spec!r} names a {type(obj).__name__}, not a function; it must name a function returning "
            "a ProbeSpec (model, loss_fn, probe_data)"
        )
    return obj


def spec_from_result(result: Any, name: str = "the spec function") -> ProbeSpec:
    """Check what a spec function returned and turn it into a :class:`ProbeSpec` (module docstring)."""
    allowed = [f.name for f in fields(ProbeSpec)]
    if isinstance(result, ProbeSpec):
        spec = result
    elif isinstance(result, Mapping):
        unknown = sorted(set(map(str, result)) - set(allowed))
        if unknown:
            raise ConfigurationError(
                f"{name} returned a dict with unknown key(s) {', '.join(unknown)}; the keys are {', '.join(allowed)}"
            )
        missing = [k for k in allowed[:3] if k not in result]
        if missing:
            raise ConfigurationError(f"{name} returned a dict without {', '.join(missing)}; it needs {', '.join(allowed[:3])}")
        spec = ProbeSpec(**result)
    elif isinstance(result, tuple) and len(result) == 3:
        spec = ProbeSpec(*result)
    else:
        raise ConfigurationError(
            f"{name} returned {type(result).__name__}; it must return a geomprobe.load.spec.ProbeSpec, a dict with "
            "model, loss_fn and probe_data, or a (model, loss_fn, probe_data) tuple"
        )
    if not isinstance(spec.model, nn.Module):
        raise ConfigurationError(f"{name} gave a model of type {type(spec.model).__name__}; it must be a torch.nn.Module")
    if not callable(spec.loss_fn):
        raise ConfigurationError(f"{name} gave a loss_fn of type {type(spec.loss_fn).__name__}, which is not callable")
    if spec.probe_data is None:
        raise ConfigurationError(f"{name} gave no probe_data; give a DataLoader, an (inputs, targets) pair or batches")
    if spec.optimizer_factory is not None and not callable(spec.optimizer_factory):
        raise ConfigurationError(
            f"{name} gave an optimizer_factory of type {type(spec.optimizer_factory).__name__}; it must be a "
            "function of the model returning the optimizer (e.g. lambda m: torch.optim.Adam(m.parameters()))"
        )
    return spec


def load_spec(spec: str, *, seed: int = 0) -> ProbeSpec:
    """Resolve ``spec``, call the function with torch's global RNG seeded by ``seed``, and check the result.

    The global RNG is restored afterwards, so loading a spec moves no one else's random stream.
    """
    if not -(2**63) <= seed < 2**64:  # beyond torch's generator, which the spec's own code would be blamed for
        raise ConfigurationError(f"seed {seed} is outside the range of torch's random generator; use 0 to 2**32 - 1")
    fn = resolve_callable(spec)
    try:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            result = fn()
    except ConfigurationError:
        raise
    except Exception as e:
        raise ConfigurationError(f"spec function {spec!r} raised {_describe(e)}") from None
    return spec_from_result(result, f"spec function {spec!r}")


def _doctest_spec() -> ProbeSpec:
    # A spec small enough for the module's doctest.
    X = torch.randn(4, 2)
    return ProbeSpec(nn.Linear(2, 1), nn.MSELoss(), (X, X.sum(1, keepdim=True)))
