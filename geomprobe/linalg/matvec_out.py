"""A matvec's product written into, or added onto, a buffer the caller gives (``out``): which matvecs take it, and
the fallback for those that do not (:func:`matvec_into`)."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch

from ..errors import ConfigurationError

__all__ = ["matvec_into", "takes_add", "takes_out", "wait_added"]


# Whether a matvec takes a keyword (``out``, ``add``), per function: a bound method is keyed by its function
# (``land.hvp`` is a new bound method at every attribute access, its signature the same), anything else by
# itself; weak keys, so a matvec's entry goes with it.
_TAKES: dict[str, weakref.WeakKeyDictionary] = {"out": weakref.WeakKeyDictionary(), "add": weakref.WeakKeyDictionary()}


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


def takes_add(matvec: Callable) -> bool:
    """Whether ``matvec`` takes ``out`` and ``add`` by keyword (:func:`matvec_into` with ``add``: the product
    added onto ``out``'s values by the matvec itself, e.g. ``Landscape.hvp``), read as :func:`takes_out`."""
    return _takes(matvec, "out") and _takes(matvec, "add")


def wait_added(add) -> None:
    """Before a matvec's first write into ``out`` under ``add``: where ``add`` is a CUDA event (the copy that
    wrote ``out``'s values ran on another stream), the current stream waits for it; ``True`` waits for nothing."""
    if add is not True and add is not False and add is not None:
        add.wait()


def matvec_into(matvec: Callable, v: torch.Tensor, out: torch.Tensor, add=False) -> torch.Tensor:
    """``matvec(v)`` written into ``out`` (with ``add``: added onto ``out``'s values); always returns ``out``.

    A matvec that takes ``out`` (:func:`takes_out`, e.g. ``Landscape.hvp``) is called as ``matvec(v, out=out)``
    and writes there itself: no product-sized allocation of its own. Any other (a plain ``lambda v: A @ v``)
    is called as ``matvec(v)`` and its fresh product copied into ``out`` (one pass over ``out``, converted to
    ``out``'s dtype): the same values either way, and the caller's buffer holds them in both cases. A product
    of another shape than ``out`` raises ConfigurationError. Cost: one matvec (``k`` for a ``(k, d)`` block).

    ``add``: ``True``, or a CUDA event a copy into ``out`` on another stream recorded, which the matvec waits for
    just before its first write (:func:`wait_added`), so the copy runs beside the product's first part: the
    matvec adds its product onto ``out`` itself where it takes ``add`` (:func:`takes_add`: a Lanczos step's
    previous vector is written there before the product, which then needs no third d-vector beside it); any
    other matvec's fresh product is added after it returns.
    """
    if add is not False and add is not None:
        if takes_add(matvec):
            res = matvec(v, out=out, add=add)
            if res is not out:
                raise ConfigurationError("a matvec that takes add must return the out it was given")
            return out
        res = matvec(v)
        _check_product(res, out)
        wait_added(add)
        return out.add_(res.reshape(out.shape))
    if takes_out(matvec):
        res = matvec(v, out=out)
        if res is out:
            return out
    else:
        res = matvec(v)
    _check_product(res, out)
    return out.copy_(res)


def _check_product(res, out: torch.Tensor) -> None:
    if not isinstance(res, torch.Tensor) or res.shape != out.shape:
        got = tuple(res.shape) if isinstance(res, torch.Tensor) else type(res).__name__
        raise ConfigurationError(f"the matvec returned {got} for a product written into a buffer of shape "
                                 f"{tuple(out.shape)}; it must return the product of v's shape")
