"""The exact route's double-backward products of one probe batch, written or added into a flat output: the part of
:class:`~geomprobe.engine.landscape.Landscape` that turns autograd's per-parameter results into rows of ``out``
(:class:`~geomprobe.engine.sharded_landscape.ShardedLandscape` shares it)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch

from .doublecheck import no_double_backward
from .pruned_outputs import kept_outputs

__all__ = ["BatchProducts"]

_VMAP_FAILURE = re.compile(r"vmap|batching rule|Batched", re.IGNORECASE)


class BatchProducts:
    """Mixin of a Landscape: :meth:`_hvp_batch` and :meth:`_flat` (it reads ``params``, ``space`` and
    ``batched_hvp`` of the Landscape)."""

    def _hvp_batch(self, grads: list[torch.Tensor | None], V: torch.Tensor, out: torch.Tensor | None = None,
                   accumulate: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One probe batch's products of the rows of ``V``, written (or with ``accumulate`` added) into ``out``;
        outputs whose part is zero in every row (``mask``; in a row, one vector at a time) are left out."""
        if out is None:
            out, accumulate = torch.empty_like(V), False
        outs = kept_outputs(grads, self.space.split(V), mask)
        if not outs:
            return out if accumulate else out.zero_()
        try:
            if V.shape[0] > 1 and self.batched_hvp:
                try:
                    res = torch.autograd.grad([g for _, g, _ in outs], self.params, [p for _, _, p in outs],
                                              retain_graph=True, allow_unused=True, is_grads_batched=True)
                    return self._flat(res, out, accumulate)
                except RuntimeError as e:
                    if no_double_backward(e) is not None or not _VMAP_FAILURE.search(str(e)):
                        raise
                    # Some operations have no batching rule; one vector at a time still works.
                    self.batched_hvp = False
                    warnings.warn(
                        f"batched HVPs are not supported by this model ({str(e).splitlines()[0][:120]}); "
                        "falling back to one vector at a time", RuntimeWarning, stacklevel=3,
                    )
            for i in range(V.shape[0]):
                row = outs if mask is None else [o for o in outs if mask[i, o[0]]]
                res = torch.autograd.grad([g for _, g, _ in row], self.params, [p[i] for _, _, p in row],
                                          retain_graph=True, allow_unused=True) if row else [None]
                self._flat(res, out[i], accumulate)
            return out
        except RuntimeError as e:
            refusal = no_double_backward(e)
            if refusal is None:
                raise
            raise refusal from e

    def _flat(self, res: Sequence[torch.Tensor | None], out: torch.Tensor, accumulate: bool) -> torch.Tensor:
        """Per-parameter results (``None``: zero) flattened into ``out``, or added into it with ``accumulate``."""
        if all(r is None for r in res):
            return out if accumulate else out.zero_()
        return self.space.flatten(res, batch_dims=out.dim() - 1, out=out, accumulate=accumulate)
