"""Which first-order gradients a block of HVP vectors needs: the outputs of the double backward that can be left
out because their part of every vector is zero.

An exact HVP of one probe batch is ``torch.autograd.grad(g, params, grad_outputs=v's parts)`` over the first-order
gradients ``g`` of every parameter. A part of ``v`` that is zero contributes nothing, yet passing it makes
autograd walk every node its output reaches. Left out, those nodes are never visited: for a Hessian column
``H e_j`` of a layer-``L`` weight (the reads of ``rmed``, ``diagshare`` and ``precond``, 16 one-hot vectors a
chunk, in block order), the first-backward nodes that compute only the gradients of layers below ``L`` are
skipped (the forward graph below ``L`` is still walked: the column has entries there). The products are the
same: only exact zeros are dropped, and ``x + 0 = x`` in floating point, so sums that autograd accumulates
keep their terms. A NaN part counts as nonzero, so it still poisons its product as it would.

Finding the zero parts costs two reads of the block and one host sync (:func:`nonzero_parts`); it is done only
for blocks of at least :data:`MIN_ROWS` vectors on the exact device route (:func:`part_mask`), where the column
reads come from and where the sync is small beside the chunk's products, and not for a block whose every part
is nonzero at its first coordinate (a dense block: a gather of one entry per part decides it). A single
vector (a Lanczos step) pays nothing. Host vectors (:mod:`~.host_stream`), finite differences and the sharded
route are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch

__all__ = ["MIN_ROWS", "dense_at_starts", "kept_outputs", "nonzero_parts", "part_mask"]

MIN_ROWS = 2  # blocks from this many vectors look for zero parts; a lone vector is a dense Lanczos step


def nonzero_parts(V: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """A ``(k, P)`` boolean host tensor: whether row ``i`` of ``V`` (``(k, d)``) has a nonzero or NaN entry in
    slice ``[offsets[j], offsets[j + 1])`` (parameter ``j``). Cost: two reads of ``V`` (a max and a min per slice,
    no temporary of ``V``'s size), one host sync; no HVP. Exact (``max != 0 or min != 0``; NaN propagates)."""
    k, pairs = V.shape[0], list(pairwise(offsets))
    found = torch.zeros(k, len(pairs), dtype=torch.bool)
    full = [j for j, (a, b) in enumerate(pairs) if b > a]
    if not full:
        return found
    # max and min over slices: on the CPU about 5x faster than any() of a float tensor (not vectorized), and
    # no bool copy (16 x 38M entries of GPT-2's embedding would be 600 MB)
    hi = torch.stack([V[:, pairs[j][0] : pairs[j][1]].amax(1) for j in full], 1)
    lo = torch.stack([V[:, pairs[j][0] : pairs[j][1]].amin(1) for j in full], 1)
    found[:, full] = (hi.ne(0) | lo.ne(0)).cpu()
    return found


def dense_at_starts(V: torch.Tensor, offsets: Sequence[int]) -> bool:
    """Whether every nonempty slice of ``V`` has a nonzero entry in its first coordinate in some row: then no
    part is zero and nothing can be left out (a dense block: Rademacher, Gaussian, Lanczos). Cost: a gather of
    ``k x P`` entries and one host sync, instead of a read of the whole block."""
    starts = [a for a, b in pairwise(offsets) if b > a]
    if not starts:
        return False
    return bool(V[:, torch.tensor(starts, device=V.device)].ne(0).any(0).all())


def part_mask(land: Any, V: torch.Tensor) -> torch.Tensor | None:
    """The nonzero parts of the block ``V`` (:func:`nonzero_parts`) where the Landscape ``land`` can leave zero
    outputs out: exact double backward on the device, at least :data:`MIN_ROWS` vectors, two or more
    parameters, and not every part nonzero at its first coordinate (:func:`dense_at_starts`). ``None``
    elsewhere: every output is kept (at no cost; a dense block pays the gather). Cost: no HVP; a block of
    columns pays one read of the block and two host syncs, a fraction of a percent of its products."""
    if (V.shape[0] < MIN_ROWS or land.hvp_method != "autograd" or land.host is not None or land.sharded
            or len(land.params) < 2):
        return None
    offsets = land.space.offsets
    return None if dense_at_starts(V, offsets) else nonzero_parts(V, offsets)


def kept_outputs(grads: Sequence[torch.Tensor | None], parts: Sequence[torch.Tensor],
                 mask: torch.Tensor | None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(j, g_j, part_j)`` for the first-order gradients that take part in the double backward of a block: those
    in the graph (not ``None``, requiring grad) whose part is nonzero in some row (``mask``, ``(k, P)``, from
    :func:`nonzero_parts`; ``None``: all of them). Cost: none beyond a pass over the mask."""
    keep = None if mask is None else mask.any(0).tolist()
    return [(j, g, p) for j, (g, p) in enumerate(zip(grads, parts))
            if g is not None and g.requires_grad and (keep is None or keep[j])]
