"""How a loss function is called and how it reduces over a batch: the two facts a Landscape needs about the
user's ``loss_fn`` before it can combine several probe batches into the loss of their union."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from ..errors import ConfigurationError

__all__ = ["LOSS_FORMS", "REDUCTIONS", "dict_call_form", "loss_reduction", "resolve_loss_form"]

LOSS_FORMS = ("auto", "outputs", "model")
_MODEL_ARG_NAMES = ("model", "module", "net", "network")
REDUCTIONS = ("auto", "mean", "sum")


def loss_reduction(loss_fn: Callable, reduction: str = "auto") -> str:
    """How ``loss_fn`` reduces over a batch's samples: ``"mean"`` or ``"sum"``. ``"auto"`` reads a torch loss
    module's own ``reduction`` (``nn.MSELoss(reduction="sum")``) and takes ``"mean"`` for anything else, so a
    ``loss_fn(model, batch)`` that sums must say ``reduction="sum"``; a loss that returns one value per sample
    (``reduction="none"``) is refused: the Hessian is of a scalar."""
    if reduction not in REDUCTIONS:
        raise ConfigurationError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if reduction != "auto":
        return reduction
    own = getattr(loss_fn, "reduction", None) if isinstance(loss_fn, nn.Module) else None
    if own == "none":
        raise ConfigurationError(
            f"{type(loss_fn).__name__}(reduction='none') returns one loss per sample; the Hessian is of a scalar "
            "loss: use reduction='mean' (or 'sum') in the loss"
        )
    return "sum" if own == "sum" else "mean"


def resolve_loss_form(loss_fn: Callable, loss_form: str) -> str:
    """``"outputs"`` (``loss_fn(outputs, targets)``) or ``"model"`` (``loss_fn(model, batch)``); ``"auto"``
    reads the first argument's name (a torch loss module takes outputs)."""
    if loss_form in ("outputs", "model"):
        return loss_form
    if loss_form != "auto":
        raise ConfigurationError(f"loss_form must be 'auto', 'outputs' or 'model', got {loss_form!r}")
    if isinstance(loss_fn, nn.Module):
        return "outputs"
    try:
        first = next(iter(inspect.signature(loss_fn).parameters))
    except (TypeError, ValueError, StopIteration):
        return "outputs"
    return "model" if first in _MODEL_ARG_NAMES else "outputs"


_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_POSITIONAL_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def dict_call_form(model: nn.Module, inputs: dict[str, Any]) -> str:
    """How a model takes a dict of inputs: ``"keywords"`` (``model(**inputs)``, as Hugging Face models do) when
    ``forward`` accepts every key by name or takes ``**kwargs``; ``"whole"`` (``model(inputs)``) when it needs
    one positional argument and no key names a parameter (``forward(self, batch, train=False)``). A forward that fits neither is
    refused, naming its parameters and the keys. A forward whose signature cannot be read gets keywords."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return "keywords"
    keys = [str(k) for k in inputs]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return "keywords"
    names = {p.name for p in params if p.kind in _KEYWORD_KINDS}
    if set(keys) <= names and keys:
        return "keywords"
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    # keys naming some parameters mean keywords were meant: passing the dict whole would only move the error
    if not names & set(keys):
        if len(required) == 1 and required[0].kind in _POSITIONAL_KINDS:
            return "whole"
        if not required and any(p.kind in _POSITIONAL_KINDS or p.kind is inspect.Parameter.VAR_POSITIONAL
                                for p in params):
            return "whole"
    shown = ", ".join(p.name for p in params)
    raise ConfigurationError(
        f"the probe batch's inputs are a dict with keys {', '.join(keys)}, but {type(model).__name__}.forward takes "
        f"({shown}): name forward's parameters after the keys, give forward one parameter for the whole dict, or "
        "pass loss_fn(model, batch) and call the model yourself"
    )
