"""Optimizers whose geometry geomprobe compares: torch's first-order methods by name, and the ellipsoidal
trust region (docs/metrics.md#trust_region), with work counted in backprops and the batch-size scaling rules
(docs/metrics.md#batch_scaling)."""

from .counting import FUNCTION_VALUE_COST, GRADIENT_COST, HVP_COST, BackpropCounter, track_backprops
from .ellipsoid import ELLIPSOIDS, DiagonalEllipsoid
from .registry import REGISTRY, OptimizerSpec, available, get, make, make_closure
from .scaling import scale_for_batch
from .steihaug import SteihaugResult, cauchy_point, steihaug_cg
from .trust_region import TR_DEFAULTS, EllipsoidalTR

__all__ = [
    # registry
    "REGISTRY",
    "OptimizerSpec",
    "available",
    "get",
    "make",
    "make_closure",
    # trust region and its parts
    "EllipsoidalTR",
    "TR_DEFAULTS",
    "DiagonalEllipsoid",
    "ELLIPSOIDS",
    "steihaug_cg",
    "cauchy_point",
    "SteihaugResult",
    # accounting
    "BackpropCounter",
    "track_backprops",
    "GRADIENT_COST",
    "HVP_COST",
    "FUNCTION_VALUE_COST",
    # batch-size scaling
    "scale_for_batch",
]
