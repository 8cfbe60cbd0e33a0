"""The loss of a LightningModule's own ``training_step``, computed so that no trace of the call is left.

A probe needs the loss the module trains on, and in Lightning that loss is whatever ``training_step``
returns (or, under manual optimization, what it hands to ``manual_backward``). Calling ``training_step``
as it is would run the user's code with its effects: ``self.log`` would log the probe's loss as the user's
``train_loss`` (monitors and checkpoint callbacks act on it), ``manual_backward`` and ``opt.step()`` would
change the parameters, counters kept on the module would count the probe's calls. :func:`training_step_loss`
runs it in a sandbox instead, for the length of the call:

- ``log``, ``log_dict`` and ``print`` do nothing;
- ``optimizers()`` and ``lr_schedulers()`` hand out inert stand-ins: ``step()`` and ``zero_grad()`` do
  nothing (a closure given to ``step`` is called, so a loss computed inside it is still seen), any other
  attribute reads through to the real object;
- ``manual_backward(loss)`` and ``loss.backward()`` record the loss instead of running backward, so
  ``.grad`` is untouched and the graph stays whole for the probe's own ``torch.autograd.grad``;
- ``toggle_optimizer``, ``untoggle_optimizer``, ``toggled_optimizer`` and ``clip_gradients`` do nothing;
- the module's plain attributes (counters, lists it appends to, dicts, values it rebinds, tensors it
  changes in place) and the states of its torchmetrics metrics are put back as found afterwards, attributes
  it added are removed. Plain tensor attributes (not parameters or buffers, which the probe's state guard
  handles) are copied for each call: one copy of each, usually a few numbers.

The loss is the one tensor handed to ``manual_backward``/``backward`` when there is exactly one, otherwise the
returned tensor (or the ``"loss"`` of a returned dict). What the sandbox cannot undo are effects outside the
module (globals, files, prints, objects held by reference and mutated inside); pass ``loss_fn=`` to the
callback to keep ``training_step`` out of the probe entirely.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError

__all__ = ["sandboxed", "training_step_loss"]

_TORCH_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


class _Inert:
    """Stands in for an optimizer or a scheduler inside the sandbox: stepping and zeroing do nothing."""

    def __init__(self, real: Any):
        object.__setattr__(self, "_real", real)

    def step(self, closure: Callable[[], Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        # A closure computes the loss (and calls manual_backward, which is recorded): run it for the loss only.
        return closure() if callable(closure) else None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return None

    @contextlib.contextmanager
    def toggle_model(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _inert(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_inert(v) for v in value)
    return _Inert(value)


class _AttributeState:
    """The plain attributes of a module (not its parameters, buffers or submodules): their bindings, the
    contents of the lists, dicts and sets they hold, and a copy of each tensor they hold directly. (Tensors
    inside lists are not copied: lists of outputs grow over an epoch, and their items are appended, not
    changed in place.)

    Restoring rebinds every attribute to the object it held, refills those containers in place (so a list
    the user keeps a reference to is the same list again) and removes attributes added since."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.bindings = {k: v for k, v in module.__dict__.items() if k not in _TORCH_MODULE_DICTS}
        self.contents: list[tuple[Any, Any]] = []
        self.tensors: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        for value in self.bindings.values():
            if isinstance(value, (list, dict, set)):
                self.contents.append((value, copy.copy(value)))
            if isinstance(value, torch.Tensor):
                self.tensors.append((value, value._version, value.detach().clone()))

    def restore(self) -> None:
        d = self.module.__dict__
        for key in [k for k in d if k not in _TORCH_MODULE_DICTS and k not in self.bindings]:
            del d[key]
        d.update(self.bindings)
        for container, saved in self.contents:
            if isinstance(container, list):
                container[:] = saved
            else:
                container.clear()
                container.update(saved)
        with torch.no_grad():
            for t, version, saved in self.tensors:
                if t._version != version:  # changed in place, as a metric's ``self.total += ...``
                    t.copy_(saved)


def _metric_modules(module: nn.Module) -> list[nn.Module]:
    tm = sys.modules.get("torchmetrics")
    metric = getattr(tm, "Metric", None) if tm is not None else None
    return [m for m in module.modules() if metric is not None and isinstance(m, metric)]


@contextlib.contextmanager
def sandboxed(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Run code on ``module`` with logging, optimizer steps and backward disabled and its plain attributes
    restored afterwards (the module docstring lists what is covered). Yields the list the losses handed to
    ``manual_backward``/``backward`` are appended to."""
    states = [_AttributeState(module)] + [_AttributeState(m) for m in _metric_modules(module) if m is not module]
    backwarded: list[torch.Tensor] = []

    def record(loss: Any, *args: Any, **kwargs: Any) -> None:
        backwarded.append(loss)

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    @contextlib.contextmanager
    def no_toggle(*args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    def stand_in(real: Callable) -> Callable:
        def get(*args: Any, **kwargs: Any) -> Any:
            try:
                return _inert(real(*args, **kwargs))
            except RuntimeError:  # not attached to a Trainer (a plain loop): nothing to step anyway
                return _Inert(None)
        return get

    patches = {
        "log": nothing, "log_dict": nothing, "print": nothing,
        "optimizers": stand_in(module.optimizers), "lr_schedulers": stand_in(module.lr_schedulers),
        "manual_backward": record, "toggle_optimizer": nothing, "untoggle_optimizer": nothing,
        "toggled_optimizer": no_toggle, "clip_gradients": nothing,
    }
    tensor_backward = torch.Tensor.backward
    try:
        for name, fn in patches.items():
            object.__setattr__(module, name, fn)  # an instance attribute shadows the method for this call
        torch.Tensor.backward = record  # a direct loss.backward() would write .grad and free the graph
        yield backwarded
    finally:
        torch.Tensor.backward = tensor_backward
        for state in states:
            state.restore()  # also removes the patches, which were not there when the state was taken


def _call(module: nn.Module, batch: Any) -> Any:
    try:
        params = inspect.signature(module.training_step).parameters.values()
    except (TypeError, ValueError):
        return module.training_step(batch, 0)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_index = len(positional) > 1 or any(p.kind is p.VAR_POSITIONAL for p in params)
    # Lightning passes batch_idx only to a training_step that takes it; the probe's batch is batch 0
    return module.training_step(batch, 0) if takes_index else module.training_step(batch)


def training_step_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """The loss ``module.training_step(batch, 0)`` trains on, computed in the :func:`sandboxed` call: the
    single loss handed to ``manual_backward``/``backward``, else the returned tensor or ``"loss"``.

    Cost: one forward of the user's training step. Raises :class:`ConfigurationError` when there is no loss
    or several (one per optimizer, say), naming the fix: ``GeometryProbeCallback(loss_fn=...)``.
    """
    with sandboxed(module) as backwarded:
        out = _call(module, batch)
    if len(backwarded) > 1:
        raise ConfigurationError(
            f"training_step called manual_backward/backward {len(backwarded)} times (one loss per optimizer?), "
            "so the probe cannot tell which loss to measure; pass GeometryProbeCallback(loss_fn=lambda model, "
            "batch: ...) returning the loss whose geometry you want"
        )
    if backwarded:
        return backwarded[0]
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise ConfigurationError(
            f"training_step returned {type(out).__name__} and called no backward, so the probe has no loss to "
            "measure; return the loss (or a dict with 'loss') from training_step, or pass "
            "GeometryProbeCallback(loss_fn=lambda model, batch: ...)"
        )
    return loss
