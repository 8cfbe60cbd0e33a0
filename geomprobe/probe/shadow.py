"""Wrapping a method of one object (a probe's Landscape) for the object's remaining life, without a reference
cycle.

The probe follows a Landscape's HVPs and forward passes (progress, the budget's deadline) by shadowing its
bound methods with instance attributes. A wrapper that closes over the bound method it replaces refers back
to the Landscape (instance dict -> wrapper -> bound method -> Landscape): a reference cycle that only
Python's cyclic garbage collector frees, and that collector runs by counts of objects, never by bytes, so the
Landscape's gradient, cached vectors and anything else it holds stayed allocated through the training steps
after the probe. The wrappers made here reach the method they wrap through a weak reference instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError

__all__ = ["shadow"]


def shadow(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Set ``obj.<name>`` to ``wrap(inner)`` for ``obj``'s life, where ``inner(*args, **kwargs)`` calls what
    ``obj.<name>`` was before: a wrapper installed earlier (wrappers chain), or the bound method, held through
    a :class:`weakref.WeakMethod` so that nothing in ``obj`` refers back to ``obj``. ``wrap`` must not close
    over ``obj`` either. Cost per call: one weak dereference."""
    earlier = obj.__dict__.get(name)
    method = weakref.WeakMethod(getattr(obj, name)) if earlier is None else None
    kind = type(obj).__name__

    def inner(*args: Any, **kwargs: Any) -> Any:
        fn = earlier if earlier is not None else method()
        if fn is None:
            raise ConfigurationError(f"the {kind} whose {name}() this wrapper calls no longer exists")
        return fn(*args, **kwargs)

    # what inner calls now, for a wrapper that needs its signature (whether it takes out=, linalg.vectors)
    inner.target = lambda: earlier if earlier is not None else method()  # type: ignore[attr-defined]
    setattr(obj, name, wrap(inner))
