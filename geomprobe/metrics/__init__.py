"""Metrics: one module per statistic, each registered by name with its cost in HVPs.

Every metric takes a :class:`geomprobe.Landscape` plus options and returns a plain dict in the result shape
of DESIGN.md: each estimate ``x`` beside its error ``x_err``, ``converged`` where an iteration can stop
short, ``hvps`` for its cost, and ``blocks`` per parameter block.
"""

from .registry import REGISTRY, Metric, available, get, register
from .spectrum import spectrum

__all__ = ["Metric", "REGISTRY", "available", "get", "register", "spectrum"]
