"""Extreme Ritz vectors of a Landscape's Hessian, shared by the metrics and views that need eigenvectors.

A Lanczos run that keeps its basis gives unit Ritz vectors ``V_m u_i``; :func:`spectrum` keeps its extreme
ones when it runs warm-started (as in a probe) and records them here, so that the ``direction`` metric and the
``"top"``/``"bottom"`` directions of :mod:`geomprobe.views` at the same parameters cost no further HVP.
The parameters cannot change under a Landscape, so what is recorded for it stays valid for its life; the record
is held beside the Landscape (a weak mapping), not in it, and goes with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigurationError
from ..linalg.lanczos import lanczos
from ..linalg.vectors import default_generator
from ._common import plan_options

__all__ = ["RITZ_READERS", "LazyRitzPair", "RitzVectors", "drop_unformed", "extreme_ritz", "keep_ritz"]

ENDS = ("top", "bottom")
_RECORDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Landscape -> {end: RitzVectors}


class RitzVectors:
    """``k`` extreme Ritz pairs of one end: ``values`` (descending for ``"top"``, ascending for
    ``"bottom"``), their residual bounds ``errs`` (some eigenvalue lies within each) and unit ``vectors``
    ``(k, d)`` where the Landscape's vectors live (its ``vector_device``). ``vectors`` may be given as a callable
    that forms them (:class:`LazyRitzPair`), called the first time they are read."""

    def __init__(self, end: str, values: list[float], errs: list[float],
                 vectors: torch.Tensor | Callable[[], torch.Tensor]):
        self.end, self.values, self.errs = end, list(values), list(errs)
        self._vectors = vectors

    @property
    def vectors(self) -> torch.Tensor:
        if callable(self._vectors):
            self._vectors = self._vectors().detach()
        return self._vectors

    @property
    def formed(self) -> bool:
        """Whether the vectors exist yet (False while a lazy pair has not been read)."""
        return not callable(self._vectors) or bool(getattr(self._vectors, "formed", False))

    def __len__(self) -> int:
        return len(self.values)

    def first(self, k: int) -> "RitzVectors":
        return RitzVectors(self.end, self.values[:k], self.errs[:k], self.vectors[:k])


def _held(land: Any, end: str) -> RitzVectors | None:
    try:
        return _RECORDED.get(land, {}).get(end)
    except TypeError:  # an object that cannot be weakly referenced records nothing
        return None


class LazyRitzPair:
    """Both ends' Ritz vectors of one Lanczos run whose basis lies in host memory, formed in one pass over it
    (:meth:`~geomprobe.linalg.ritz.LanczosResult.take_ritz_vectors`) the first time either end is read: a probe
    whose later metrics never read them (no warm start kept, no ``direction`` or view at the same parameters) never
    pays for the pass (bus-bound for a lean run: ~1 s of the 1.1B Llama's float32 later probe, 2.3 s outside its
    products; benchmarks/RESULTS.md section 6). Until then the basis stays where it is, in host memory (page-locked
    rows go back to their pool with it), held by the Landscape's record and dropped with it. Cost: the pass, once,
    when read; none otherwise."""

    def __init__(self, result: Any, groups: list[list[int]], out: Any = None):
        self._result, self._groups, self._out = result, groups, out
        self._vectors: list[torch.Tensor] | None = None

    def vectors(self) -> list[torch.Tensor]:
        """Each group's vectors (the pass runs now if it has not)."""
        if self._vectors is None:
            self._vectors = self._result.take_ritz_vectors(self._groups, out=self._out)
            self._result = self._out = None  # the basis is spent: only the vectors remain
        return self._vectors

    @property
    def formed(self) -> bool:
        return self._vectors is not None

    def release(self) -> None:
        """Give up the vectors unformed: the run's basis is released (its result, which a metric cache may still
        hold for its values, keeps no basis), as the pass would have."""
        if self._result is not None:
            self._result.basis_blocks = None
        self._result = self._out = None

    def end(self, i: int) -> Callable[[], torch.Tensor]:
        """A callable giving group ``i``'s vectors, for :func:`keep_ritz` (its ``formed``: the pair's)."""
        return _End(self, i)


class _End:
    def __init__(self, pair: LazyRitzPair, i: int):
        self.pair, self.i = pair, i

    @property
    def formed(self) -> bool:
        return self.pair.formed

    def release(self) -> None:
        self.pair.release()

    def __call__(self) -> torch.Tensor:
        return self.pair.vectors()[self.i]


# metrics that read the Ritz vectors a spectrum records (the views only for their "top"/"bottom" directions)
RITZ_READERS = frozenset({"direction", "view_line", "view_plane"})


def drop_unformed(land: Any) -> int:
    """Forget ``land``'s recorded Ritz pairs whose vectors were never formed (a :class:`LazyRitzPair` nobody read),
    so that their basis is released now rather than with the Landscape (or with a cached Lanczos result that still
    holds it): a probe calls it once none of its remaining metrics is among :data:`RITZ_READERS`. Returns how many
    ends were dropped."""
    try:
        held = _RECORDED.get(land, {})
    except TypeError:
        return 0
    unformed = [end for end, r in held.items() if not r.formed]
    for end in unformed:
        held.pop(end)._vectors.release()  # the basis goes now, also from a result a metric cache holds
    return len(unformed)


def keep_ritz(land: Any, end: str, values: list[float], errs: list[float],
              vectors: torch.Tensor | Callable[[], torch.Tensor]) -> None:
    """Record ``end``'s Ritz pairs of ``land`` for later metrics and views (kept when more than held); ``vectors``
    may be a callable forming them when first read (:class:`LazyRitzPair`)."""
    if end not in ENDS:
        return
    held = _held(land, end)
    if held is None or len(held) < len(values):
        try:
            kept = vectors if callable(vectors) else vectors.detach()
            _RECORDED.setdefault(land, {})[end] = RitzVectors(end, values, errs, kept)
        except TypeError:
            pass


def extreme_ritz(land: Any, end: str, k: int = 1, *, tol: float = 1e-3, max_iter: int | None = None,
                 seed: int = 0, basis_device: torch.device | str | None = None) -> RitzVectors:
    """The ``k`` Ritz pairs at ``end`` (``"top"``: largest, ``"bottom"``: smallest) of ``land``'s Hessian.

    Reuses pairs already recorded on ``land`` (by :func:`spectrum`, or an earlier call) when they number at
    least ``k``: no HVP. Otherwise one Lanczos run at that end with its basis kept (``min(d, max_iter or 300)``
    HVPs at most, ``m d`` numbers of basis memory, on ``basis_device`` if given) until the ``k`` values' residual
    bounds meet ``tol``. Each value is within its bound ``errs[i]`` of an eigenvalue; a vector's angle to the
    eigenspace is at most its residual over the gap to the rest of the spectrum.
    """
    if end not in ENDS:
        raise ConfigurationError(f"end must be 'top' or 'bottom', got {end!r}")
    if not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"k must be a positive integer, got {k!r}")
    k = min(k, land.dim)
    where = getattr(land, "vector_device", None) or land.device  # the host in the host-vector mode
    held = _held(land, end)
    if held is not None and len(held) >= k:
        return held.first(k)
    r = lanczos(land.hvp, land.dim, k=k, tol=tol, max_iter=max_iter, which="largest" if end == "top" else "smallest",
                generator=default_generator(seed), dtype=land.dtype, device=where, keep_basis=True,
                basis_device=basis_device, **plan_options(land))
    n = len(r.ritz_values)
    k = min(k, n)
    idx = list(range(n - 1, n - 1 - k, -1)) if end == "top" else list(range(k))
    values, errs = (r.top(k) if end == "top" else r.bottom(k))
    vectors = r.take_ritz_vectors([idx])[0].to(where)  # one pass over the basis, which is released
    keep_ritz(land, end, values, errs, vectors)
    return RitzVectors(end, values, errs, vectors)
