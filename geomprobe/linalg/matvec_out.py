"""A matvec's product written into a buffer the caller gives (``out``): which matvecs take it, and the fallback for
those that do not (:func:`matvec_into`)."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch

from ..errors import ConfigurationError

__all__ = ["matvec_into", "takes_out"]


# Whether a matvec takes a keyword (``out``), per function: a bound method is keyed by its function
# (``land.hvp`` is a new bound method at every attribute access, its signature the same), anything else by
# itself; weak keys, so a matvec's entry goes with it.
_TAKES: dict[str, weakref.WeakKeyDictionary] = {"out": weakref.WeakKeyDictionary()}


def _takes(matvec: Callable, name: str) -> bool:
    cache = _TAKES[name]
    key = getattr(matvec, "__func__", matvec)
    try:
        return cache[key]
    except (KeyError, TypeError):
        pass
    try:
        param = inspect.signature(matvec).parameters.get(name)
    except (TypeError, ValueError):
        param = None
    found = param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)
    try:
        cache[key] = found
    except TypeError:
        pass  # not weakly referable: read again at the next call
    return found


def takes_out(matvec: Callable) -> bool:
    """Whether ``matvec`` has a parameter named ``out`` that can be passed by keyword (``**kwargs`` alone does
    not count: a wrapper that forwards them may reach a matvec without ``out``). Read once per callable with
    :func:`inspect.signature` and cached; a callable whose signature cannot be read counts as without."""
    return _takes(matvec, "out")


def matvec_into(matvec: Callable, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``matvec(v)`` written into ``out``; always returns ``out``.

    A matvec that takes ``out`` (:func:`takes_out`, e.g. ``Landscape.hvp``) is called as ``matvec(v, out=out)``
    and writes there itself: no product-sized allocation of its own. Any other (a plain ``lambda v: A @ v``)
    is called as ``matvec(v)`` and its fresh product copied into ``out`` (one pass over ``out``, converted to
    ``out``'s dtype): the same values either way, and the caller's buffer holds them in both cases. A product
    of another shape than ``out`` raises ConfigurationError. Cost: one matvec (``k`` for a ``(k, d)`` block).
    """
    if takes_out(matvec):
        res = matvec(v, out=out)
        if res is out:
            return out
    else:
        res = matvec(v)
    if not isinstance(res, torch.Tensor) or res.shape != out.shape:
        got = tuple(res.shape) if isinstance(res, torch.Tensor) else type(res).__name__
        raise ConfigurationError(f"the matvec returned {got} for a product written into a buffer of shape "
                                 f"{tuple(out.shape)}; it must return the product of v's shape")
    return out.copy_(res)
