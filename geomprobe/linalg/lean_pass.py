"""A lean Lanczos step that takes a whole-basis pass: its three-term part and the pass in one read of each stored row.

A lean run (:mod:`.lean_vectors`) keeps its basis in host memory and at most ``w``, the newest and the previous vector
on the device. Its ordinary step reads the previous vector's row back after the product (and, with streamed inputs,
the newest vector's), subtracts the three-term part, then streams every stored row for the whole-basis pass: both of
those rows cross the bus twice. Where every step takes a pass (a half-precision HVP's asymmetry: the 1.1B Llama in
bf16 from its fifth step, each row 2.2 GB, 44 ms at the bus's speed) that was two rows more per step than the pass
needs. Here the pass itself brings them, first: the newest row gives ``alpha = v_j^T w`` and leaves ``w - alpha
v_j``; the previous row takes ``beta_{j-1} v_{j-1}`` and then its own Gram-Schmidt coefficient (the matvec's
asymmetry, as the local pass measures it); then every older row once, classical Gram-Schmidt piece by piece as in
:meth:`.krylov_basis.LanczosBasis.reorthogonalize`. The order is modified Gram-Schmidt's over the newest two first:
the same arithmetic as the three-term step followed by the pass, each large coefficient removed before the small
ones are taken, and the newest row's coefficient after its own subtraction (rounding, which the pass used to take
again) is left to the orthogonality estimate's rounding term.
"""

from __future__ import annotations

import torch

from .vectors import sub_rows

__all__ = ["lean_whole_step"]


def lean_whole_step(basis, w: torch.Tensor, cur: torch.Tensor, beta_prev: float,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w = H v_j`` (on the compute device) turned into ``w - alpha v_j - beta_{j-1} v_{j-1}`` made orthogonal to
    every stored vector, in place, for a lean ``basis`` whose newest row is ``v_j`` (``cur``: its device vector,
    or a given-back one whose row is read instead) and whose row before it is ``v_{j-1}``.

    Returns ``w``, the coefficients of every stored row in order (``[c_0, .., beta_{j-1} + c_{j-1}, alpha]``, as
    :func:`.krylov_basis.krylov_step` returns them) and the norm after the three-term part (for the DGKS test).
    Cost: one read of each stored row (``j + 1`` rows over the bus, ``j`` where ``cur`` is on the device), no matvec;
    device memory: ``w`` and one row at a time."""
    space, lean = basis.space, basis.lean_vectors
    n = basis.n
    basis.rows_readable()

    def row(i: int) -> torch.Tensor:
        return basis._on_compute(basis._row(i)[None], w.device)

    v = cur[None] if cur.untyped_storage().nbytes() else row(n - 1)
    alpha = space.dots(v, w)
    sub_rows(w, alpha, v)
    del v
    lean.give_back(cur)
    p = row(n - 2)
    w.sub_(p[0], alpha=beta_prev)
    before = space.norm(w)
    c_prev = space.dots(p, w)
    sub_rows(w, c_prev, p)
    del p
    parts = []
    for i in range(n - 2):
        r = row(i)
        c = space.dots(r, w)
        sub_rows(w, c, r)
        parts.append(c)
        del r
    return w, torch.cat(parts + [c_prev + beta_prev, alpha]), before
