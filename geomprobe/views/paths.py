"""The loss between parameter sets: straight lines between checkpoints, and the plane of a trajectory.

``interpolate`` follows Goodfellow, Vinyals, Saxe (2015): the loss along ``(1 - t) theta_a + t theta_b``, and
along a run's sequence of checkpoints, segment by segment. A barrier on the straight line between two minima
says they are not linearly connected; a monotone decrease from initialization to solution is what Goodfellow
et al. found for many networks.

``trajectory`` follows Li et al. (2018, section 7): the differences ``theta_i - theta_n`` of the checkpoints
from the last one, their two principal directions (the top right singular vectors of the difference matrix),
the path projected onto the plane they span through ``theta_n``, and the loss on that plane. A random plane
would miss the path almost entirely (random directions in high dimension are orthogonal to it).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from ..engine.evaluate import ForwardProgress, losses_at
from ..errors import ConfigurationError
from .directions import parameter_vector
from .surface import check_budget, check_points, check_span

__all__ = ["interpolate", "trajectory", "pca_plane"]


def _vectors(land: Any, sources: Any, least: int) -> list[torch.Tensor]:
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise ConfigurationError("give a list of models, state dicts or flat tensors (checkpoint files are loaded "
                                 "by `geomprobe view`)")
    if len(sources) < least:
        raise ConfigurationError(f"this view needs at least {least} parameter sets, got {len(sources)}")
    return [parameter_vector(land, s, f"parameter set {i}") for i, s in enumerate(sources)]


def interpolate(models_or_checkpoints: Sequence[Any], land: Any, *, points: int = 21,
                span: Sequence[float] = (0.0, 1.0), max_forwards: int | None = None,
                progress: ForwardProgress | None = None) -> dict:
    """The loss along straight lines between parameter sets, on ``land``'s probe batches and loss.

    ``models_or_checkpoints``: two or more models of ``land``'s architecture, state dicts or flat tensors
    (``land`` supplies the loss, the probe data and which parameters are measured; its own parameters are not
    used). Two sets: ``points`` values of ``t`` evenly in ``span`` (``(-0.5, 1.5)`` looks beyond both ends) of
    ``(1 - t) theta_0 + t theta_1``. More: the path through them in order, ``points`` per segment (shared
    ends), ``t`` running from 0 to ``n - 1`` with checkpoint ``i`` at ``t = i``; ``span`` must then be (0, 1).

    Returns ``t``, ``loss``, ``ends`` (the loss at each parameter set, measured at exactly those parameters:
    ``t = i`` evaluates ``theta_i`` itself, not a sum that rounds), ``distances`` (``‖theta_{i+1} - theta_i‖``),
    ``barrier`` (the highest loss on each segment above the straight line between its ends' losses),
    ``forwards`` and ``seconds``. Cost: one forward pass per point and probe batch, no HVP.
    """
    points = check_points(points)
    lo, hi = check_span(span)
    thetas = _vectors(land, models_or_checkpoints, 2)
    if len(thetas) > 2 and (lo, hi) != (0.0, 1.0):
        raise ConfigurationError("span applies to two parameter sets; a path through more runs from each to the next")
    segments = len(thetas) - 1
    per = np.linspace(lo, hi, points)
    if len(thetas) == 2:
        ts = per
    else:
        ts = np.concatenate([i + per[(1 if i else 0):] for i in range(segments)])
    count = len(ts)
    check_budget(count * len(land.batches), max_forwards)
    t0 = time.perf_counter()

    def at(t: float) -> torch.Tensor:
        i = min(int(np.floor(t)), segments - 1) if len(thetas) > 2 else 0
        s = t - i
        a, b = thetas[i], thetas[i + 1]
        if s == 0.0:
            return a
        if s == 1.0:
            return b
        return (1.0 - s) * a + s * b

    loss = losses_at(land, (at(float(t)) for t in ts), count=count, progress=progress)
    knots = [np.flatnonzero(ts == i) for i in range(len(thetas))]
    exact_ends = all(len(k) for k in knots)
    # a span that skips an end: measure the ends themselves
    ends = [float(loss[k[0]]) for k in knots] if exact_ends else losses_at(land, thetas).tolist()
    barrier = []
    for i in range(segments):
        on = (ts >= i) & (ts <= i + 1) if len(thetas) > 2 else (ts >= 0) & (ts <= 1)
        chord = ends[i] + (ts[on] - i) * (ends[i + 1] - ends[i])
        barrier.append(float(np.max(loss[on] - chord)) if on.any() else None)
    return {"t": ts.tolist(), "loss": loss.tolist(), "ends": ends, "checkpoints": len(thetas),
            "distances": [float((b - a).double().norm()) for a, b in zip(thetas, thetas[1:])], "barrier": barrier,
            "forwards": (count + (0 if exact_ends else len(thetas))) * len(land.batches),
            "seconds": time.perf_counter() - t0}


def pca_plane(thetas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The two principal directions of ``theta_i - theta_n`` (i < n), unit rows ``(2, d)``; the singular
    values of the difference matrix; the path's coordinates ``(n + 1, 2)`` in that basis (the last at 0).

    Computed from the ``n x n`` Gram matrix of the differences in float64 (``n^2 d`` flops, memory for the
    differences only), whose eigenvectors give the right singular vectors ``D^T U / s``: the same as the SVD
    of the difference matrix, to rounding. Signs: each direction's largest-magnitude entry is positive.
    """
    last = thetas[-1]
    D = torch.stack([(t - last).double() for t in thetas[:-1]])
    G = (D @ D.T).cpu()
    evals, evecs = torch.linalg.eigh(G)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    s = evals.sqrt()
    if len(s) < 2 or s[1] <= 1e-12 * max(float(s[0]), 1e-300):
        raise ConfigurationError("the checkpoints lie on a line (their differences span one direction): a plane "
                                 "needs a path that turns; use interpolate for a line")
    dirs = (evecs[:, :2].T.to(D.device) @ D) / s[:2, None].to(D.device)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    for i in range(2):
        if dirs[i, int(dirs[i].abs().argmax())] < 0:
            dirs[i] = -dirs[i]
    coords = torch.cat([D @ dirs.T, torch.zeros(1, 2, dtype=D.dtype, device=D.device)])
    return dirs, s.numpy(), coords.cpu().numpy()


def trajectory(checkpoints: Sequence[Any], land: Any, *, points: int | Sequence[int] = (21, 21),
               margin: float = 0.2, max_forwards: int | None = None,
               progress: ForwardProgress | None = None) -> dict:
    """The PCA plane of a trajectory through its last point, the path projected onto it, and the loss there.

    ``checkpoints``: three or more parameter sets in training order (models, state dicts or flat tensors;
    ``land`` supplies the loss, the probe data and which parameters are measured). The plane's axes are the two
    principal directions of the differences from the last checkpoint (:func:`pca_plane`); the grid covers the
    projected path with ``margin`` (a fraction of its extent) on each side, ``points`` per axis.

    Returns ``x``, ``y``, ``loss`` (``(n_y, n_x)``, row ``j`` at ``y[j]``), ``path`` (``(n, 2)`` coordinates of
    each checkpoint), ``path_loss`` (the loss at each checkpoint itself), ``offplane`` (each checkpoint's
    distance from the plane: the projection drops it), ``explained`` (each direction's share of the squared
    differences), ``directions`` (the two unit directions, ``(2, d)``: drop them before storing a large
    model's result), ``forwards`` and ``seconds``. Cost: one forward pass per grid point and checkpoint per
    probe batch, no HVP.
    """
    pa, pb = points if isinstance(points, (tuple, list)) else (points, points)
    na, nb = check_points(pa, "points along x"), check_points(pb, "points along y")
    if not (isinstance(margin, (int, float)) and 0 <= margin <= 10):
        raise ConfigurationError(f"margin must be a number in [0, 10] (a fraction of the path's extent), "
                                 f"got {margin!r}")
    thetas = _vectors(land, checkpoints, 3)
    check_budget((na * nb + len(thetas)) * len(land.batches), max_forwards)
    t0 = time.perf_counter()
    dirs, s, coords = pca_plane(thetas)
    dirs = dirs.to(land.dtype)
    lo, hi = coords.min(0), coords.max(0)
    pad = margin * (hi - lo)
    x = np.linspace(lo[0] - pad[0], hi[0] + pad[0], na)
    y = np.linspace(lo[1] - pad[1], hi[1] + pad[1], nb)
    center = thetas[-1]
    grid = (center + float(a) * dirs[0] + float(b) * dirs[1] for b in y for a in x)
    loss = losses_at(land, grid, count=na * nb, progress=progress).reshape(nb, na)
    path_loss = losses_at(land, thetas)
    D = torch.stack([(t - center).double() for t in thetas])
    inplane = torch.as_tensor(coords, dtype=torch.float64, device=D.device) @ dirs.double()
    offplane = (D - inplane).norm(dim=1).cpu().numpy()
    return {"x": x, "y": y, "loss": loss, "path": coords, "path_loss": path_loss.tolist(),
            "offplane": offplane.tolist(), "explained": (s[:2] ** 2 / float((s**2).sum())).tolist(),
            "singular_values": s.tolist(), "directions": dirs, "checkpoints": len(thetas),
            "forwards": (na * nb + len(thetas)) * len(land.batches), "seconds": time.perf_counter() - t0}
