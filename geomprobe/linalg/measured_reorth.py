"""Partial reorthogonalization on measured inner products: the regime a Lanczos run enters where its product's
asymmetry would otherwise send every later step to a whole-basis pass (:mod:`.orthogonality`), with the inner
products read from random sketches of the vectors (:mod:`.sketched_gram`) instead of Simon's worst-case estimate.

A step's new vector takes a whole-basis pass only when a measured bound passes the level the product's own error
allows (:meth:`.orthogonality.OrthogonalityEstimate.measured_threshold`), or when keeping its bounds would let the
Gram matrix's Gershgorin spread pass :data:`SPREAD_LIMIT` (the residual bounds widen by ``1 / sqrt(1 - spread)``,
at most 1.16x; past it every step takes a pass, as before). The bounds of the kept vectors enter the run's
``omega`` like the estimate's, so the residual bounds widen by what they allow.
"""

from __future__ import annotations

import torch

from .krylov_basis import LanczosBasis, orthogonalize_step
from .orthogonality import OrthogonalityEstimate
from .sketched_gram import SketchedGram, sketch_size
from .vectors import HALF_TYPES

__all__ = ["SPREAD_LIMIT", "measured_step", "sketched_gram"]

SPREAD_LIMIT = 0.25


def sketched_gram(ortho: OrthogonalityEstimate | None, dtype: torch.dtype, dim: int, on: bool) -> SketchedGram | None:
    """The sketches a run keeps so that it may measure its inner products: for partial reorthogonalization of
    half-precision vectors (whose products are asymmetric at ~1e-3 of ``||T||``; float32 products are at 1e-7 and
    the estimate serves) long enough to sketch (:func:`.sketched_gram.sketch_size`), when ``on``; else None."""
    if not on or ortho is None or dtype not in HALF_TYPES or sketch_size(dim) is None:
        return None
    return SketchedGram(dim)


def measured_step(gram: SketchedGram, ortho: OrthogonalityEstimate, basis: LanczosBasis, w: torch.Tensor,
                  beta: float, step: int, eta: float) -> tuple[torch.Tensor, float]:
    """One step of the measured regime for the candidate ``w`` (norm ``beta``) after its local pass: its inner
    products with every stored vector measured; a whole-basis pass when a bound exceeds ``eta`` or would widen
    the bounds past :data:`SPREAD_LIMIT`. Returns ``w`` and its norm (changed only by a pass); ``gram`` holds the
    final vector's sketch for :meth:`.SketchedGram.push`. Cost: one sketch (two after a pass), and a pass (two
    reads of the basis) only when due."""
    _est, bounds = gram.measure(w, beta)
    if bounds.size and (float(bounds.max()) > eta or ortho.spread_with(bounds) > SPREAD_LIMIT):
        w, beta = orthogonalize_step(basis, w, beta, step)
        # measured again: a half-precision vector concentrated on few entries keeps its storage's rounding
        # there, ~1e-3 along the vectors sharing them, far above the pass's own rounding
        _est, bounds = gram.measure(w, beta)
        if ortho.spread_with(bounds) > SPREAD_LIMIT:  # the bounds alone fill the allowance: passes from here
            ortho.measured, ortho.always = False, True
            ortho.regime += f", whole-basis from step {step} (the measured bounds' spread)"
            ortho.full_step()
            return w, beta
        ortho.measured_step(bounds, passed=True)
    else:
        ortho.measured_step(bounds)
    return w, beta
