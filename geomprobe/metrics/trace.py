"""Trace of the Hessian, whole and per parameter block (docs/metrics.md#trace).

The default estimator is :func:`geomprobe.linalg.traces.deflated_trace`: a Krylov subspace from a short Lanczos run
is taken exactly and Hutchinson estimates the rest, with plain Hutchinson on the same products as a control
variate. On trained networks, where a few outlying eigenvalues carry most of ``||H||_F``, it reaches a given
standard error in 2-5x fewer HVPs than plain Hutchinson; near initialization, where the spectrum is a flat
bulk, it costs up to ``krylov_steps`` more (benchmarks/RESULTS.md). ``method="hutchinson"`` and
``"hutch++"`` select the plain estimators.

Per-block traces ``tr H[b, b]`` come from the same products at no extra HVP (plain Hutchinson restricted to
the block, with its standard error); they sum to the whole trace in expectation.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigurationError
from ..linalg.traces import deflated_trace, hutchinson_trace, hutchpp_trace
from ._common import checked, resolve_generator, select_blocks
from .registry import register

__all__ = ["trace"]

METHODS = ("deflated", "hutchinson", "hutch++")


@register("trace", cost="hvps HVPs (default 96; deflated: a third of them sequential Lanczos steps)")
def trace(
    land: Any,
    *,
    hvps: int = 96,
    method: str = "deflated",
    krylov_steps: int | None = None,
    rel_tol: float = 0.0,
    blocks: Any = None,
    batch: int | None = None,
    device_vectors: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> dict:
    """``tr H`` with its standard error, and ``tr H[b, b]`` for each parameter block.

    Args:
        land: the Landscape.
        hvps: the HVP budget (an upper bound when ``rel_tol`` stops early).
        method: ``"deflated"`` (default), ``"hutchinson"`` or ``"hutch++"``.
        krylov_steps: Lanczos steps of the deflated estimator (default ``hvps // 3``).
        rel_tol: stop once ``trace_err <= rel_tol * |trace|`` (deflated only; 0 spends the whole budget).
        blocks: glob patterns of the blocks that get a per-block trace (None: all; deflated only).
        batch: vectors per batched HVP (default: the Landscape's chunk, which its memory plan chose; 16 without
            one), so the sketches held at once follow the plan.
        device_vectors: d-vectors the metric may store on the device (the memory plan's ``device_vectors``,
            passed by the probe; None: no limit). The deflated estimator holds its Krylov basis and two sketches
            of ``batch`` vectors, so the default ``krylov_steps`` is cut to ``device_vectors - 2 batch`` (at least 1;
            ``batch`` to a quarter of ``device_vectors``): less
            deflation, a larger ``trace_err``, the same unbiased estimate; the result says the steps taken.
        seed, generator: the randomness.

    Returns ``trace``, ``trace_err``, ``converged`` (``rel_tol`` met, or True without one), ``hvps``,
    ``samples``, ``method`` and, for the deflated method, ``blocks``: ``{name: {"trace", "trace_err"}}``.

    Cost: at most ``hvps`` HVPs. Error: ``trace_err`` is the Monte Carlo standard error (the estimators are
    unbiased); a per-block error covers that block's own estimate.
    """
    if method not in METHODS:
        raise ConfigurationError(f"trace method must be one of {', '.join(METHODS)}; got {method!r}")
    if rel_tol and method != "deflated":
        raise ConfigurationError("rel_tol (stop at a target error) needs method='deflated'")
    gen = resolve_generator(seed, generator)
    mv = checked(land.hvp)
    if batch is None:
        batch = getattr(land, "chunk_size", None) or 16
    if device_vectors is not None:
        if device_vectors < 0:
            raise ConfigurationError(f"device_vectors must be >= 0 or None, got {device_vectors}")
        batch = max(1, min(batch, device_vectors // 4 or 1))
        if method == "deflated" and krylov_steps is None:  # an explicit krylov_steps wins
            krylov_steps = max(1, min(max(1, hvps // 3), device_vectors - 2 * batch))
    kw = dict(batch=batch, generator=gen, dtype=land.dtype, device=land.device)
    out: dict[str, Any] = {"method": method}
    if method == "hutchinson":
        r = hutchinson_trace(mv, land.dim, samples=hvps, **kw)
    elif method == "hutch++":
        r = hutchpp_trace(mv, land.dim, matvecs=hvps, **kw)
    else:
        chosen = select_blocks(land.blocks, blocks)
        r = deflated_trace(mv, land.dim, matvecs=hvps, krylov_steps=krylov_steps, rel_tol=rel_tol,
                           segments=[(b.start, b.stop) for b in chosen], **kw)
        out["blocks"] = {b.name: {"trace": t, "trace_err": e} for b, (t, e) in zip(chosen, r.segments)}
        out["krylov_steps"] = r.matvecs - r.samples
    out.update({"trace": r.trace, "trace_err": r.trace_err, "converged": bool(r.converged), "hvps": r.matvecs,
                "samples": r.samples})
    return out
