"""How far the Landscape's HVPs are from float64 ones: the error floor under every eigenvalue bound.

Lanczos's residual bounds say how well the Ritz values fit the matvec they were given; they say nothing of
how well that matvec fits the true Hessian. In float32 on a GPU the gap can be large: ResNet-18's HVP
through cuDNN differs from a float64 HVP by 2.7e-4 relative (benchmarks/RESULTS.md), almost all of it
symmetric (the float32 forward is a slightly different function), so Lanczos's own asymmetry check does not
see it. This metric measures it directly: the same Rademacher vectors through the Landscape and through a
float64 copy of the model on the same data, ``rel_err = ||Hv - H64 v|| / ||H64 v||`` per vector.
A bound on an eigenvalue below about ``hvp_rel_err * max|lambda|`` claims more than the products carry.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from torch import nn

from ..linalg.vectors import rademacher
from ._common import resolve_generator
from .registry import register

__all__ = ["precision"]


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


@register("precision", cost="vectors HVPs, and as many in float64 on a float64 copy of the model")
def precision(land: Any, *, vectors: int = 2, seed: int = 0, generator: torch.Generator | None = None) -> dict:
    """Relative error of the Landscape's HVPs against float64 HVPs of the same model, data and vectors.

    Returns ``hvp_rel_err`` (the largest over the vectors), ``hvp_rel_err_median``, ``vectors``, ``hvps``
    (the Landscape's own) and ``reference_hvps`` (the float64 ones). A float64 Landscape is its own
    reference (0.0, no HVPs).

    Cost: ``vectors`` HVPs here and ``vectors`` in float64 (on most GPUs float64 runs several times slower),
    plus a float64 copy of the model and a float64 graph of the probe batches while it runs. The user's
    model is not touched: the copy is a deep copy.
    """
    if land.dtype == torch.float64:
        return {"hvp_rel_err": 0.0, "hvp_rel_err_median": 0.0, "vectors": 0, "hvps": 0, "reference_hvps": 0}
    from ..engine.batches import map_tensors
    from ..engine.landscape import Landscape

    model64 = copy.deepcopy(land.model).double()
    loss64 = copy.deepcopy(land.loss_fn)
    if isinstance(loss64, nn.Module):
        loss64 = loss64.double()
    group = getattr(land.reducer, "group", None) if land.reducer.active else False
    ref = Landscape(model64, loss64, [map_tensors(b, _float64) for b in land.batches], params=list(land.param_names),
                    mode=land.mode, loss_form=land.loss_form, chunk_size=land.chunk_size, seed=land.seed,
                    process_group=group)
    try:
        V = rademacher((vectors, land.dim), resolve_generator(seed, generator), land.dtype, land.device)
        got = land.hvp(V).double()
        want = ref.hvp(V.double())
    finally:
        ref.close()
    errs = [float((g - w).norm() / w.norm()) if float(w.norm()) > 0 else float((g - w).norm())
            for g, w in zip(got, want)]
    return {"hvp_rel_err": max(errs), "hvp_rel_err_median": statistics.median(errs), "vectors": vectors,
            "hvps": vectors, "reference_hvps": vectors}
