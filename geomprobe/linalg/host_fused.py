"""Fused chunked passes over host-memory vectors for the Lanczos loop whose projection runs beside the matvec
(:mod:`.delayed_host`): a projection that writes the projected vector and a second combination of the same
rows in one read of them, and a linear combination of a few vectors with the inner products a step needs,
taken from the same read.

Each pass walks the columns in chunks as :mod:`.host_arith` does (half-precision chunks converted into float32
scratch that lives as long as the thread, float32/float64 chunks used where they lie, every result rounded
once to the vectors' type, the chunks' partial sums added in float64), so a step of a 1.1e9-entry model reads
each vector once per pass and allocates nothing of length d. Error: as :mod:`.host_arith` states (per chunk a
float32 sum of at most ``columns`` products, float64 for float64 vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .host_arith import _SCRATCH, PARALLEL_PRODUCTS_FROM_THREADS, _acc, _load, chunk_dot, chunk_norm_sq, columns

__all__ = ["host_combine", "host_project"]


def _check_host(*tensors: torch.Tensor) -> None:
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the fused host passes take host (CPU) tensors only")


def host_project(x: torch.Tensor, groups: Sequence[torch.Tensor], c: torch.Tensor, t: torch.Tensor,
                 z: torch.Tensor, u: torch.Tensor, *, width: int | None = None) -> float:
    """``z = x - c @ B`` and ``u = -(t @ B)`` for the ``n`` rows ``B`` of ``groups`` (2-D ``(r_g, d)``), from one
    read of the rows and of ``x``; returns ``||z||^2`` (float) of ``z`` as stored (after its rounding).

    ``c`` and ``t``: ``(n,)`` coefficients (any float type, taken in the accumulation type). ``x`` is only read
    (a matvec may read it meanwhile); ``z`` and ``u`` are written, never read, and must not overlap ``x`` or
    the rows. Cost: one read of the rows and of ``x``, one write each of ``z`` and ``u``, no matvec, no
    allocation of length d. Error: one float32 rounding per term (float64 for float64 vectors) before the one
    rounding to the vectors' type; the norm as :mod:`.host_arith` states."""
    _check_host(x, z, u, *groups)
    acc = _acc(x.dtype)
    d = x.shape[0]
    sizes = [G.shape[0] for G in groups]
    n = sum(sizes)
    if c.numel() != n or t.numel() != n:
        raise ValueError(f"c and t must have {n} entries (one per row), got {c.numel()} and {t.numel()}")
    c_acc, t_acc = c.reshape(-1).to("cpu", acc), t.reshape(-1).to("cpu", acc)
    parallel = torch.get_num_threads() >= PARALLEL_PRODUCTS_FROM_THREADS
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    if parallel:
        c_list, t_list = c_acc.tolist(), t_acc.tolist()
    cols = columns(max(sizes, default=0) + 1, width)
    chunks = (d + cols - 1) // cols
    norm_parts = torch.empty(chunks, dtype=acc)
    for ci in range(chunks):
        a, b = ci * cols, min(d, (ci + 1) * cols)
        zf = _SCRATCH.get("z", acc, (b - a,))
        zf.copy_(x[a:b])
        uf = _SCRATCH.get("u", acc, (b - a,))
        uf.zero_()
        for g, G in enumerate(groups):
            rows = _load(G[:, a:b], "rows", acc)
            s0, s1 = starts[g], starts[g + 1]
            if parallel:
                for i in range(s1 - s0):
                    zf.add_(rows[i], alpha=-c_list[s0 + i])
                    uf.add_(rows[i], alpha=-t_list[s0 + i])
            else:
                zf.addmv_(rows.T, c_acc[s0:s1], alpha=-1)
                uf.addmv_(rows.T, t_acc[s0:s1], alpha=-1)
        z[a:b].copy_(zf)
        u[a:b].copy_(uf)
        if z.dtype != acc:
            zf.copy_(z[a:b])  # the norm is that of the stored vector
        chunk_norm_sq(zf, norm_parts[ci])
    return float(norm_parts.to(torch.float64).sum()) if chunks else 0.0


def host_combine(out: torch.Tensor, terms: Sequence[tuple[torch.Tensor, float]], *,
                 before: Sequence[tuple[int, int]] = (), after: Sequence[int] = (),
                 width: int | None = None) -> torch.Tensor:
    """``out = sum_k a_k v_k`` for ``terms = [(v_k, a_k)]`` in one chunked pass, with inner products taken from
    the same read: ``before`` pairs ``(i, j)`` give ``v_i . v_j`` of the terms as they were, ``after`` indices
    ``i`` give ``out . v_i`` of the result as stored (``-1``: ``out . out``). Returns the inner products
    (float64, ``before`` then ``after``).

    ``out`` may be one of the terms (each chunk of every term is read before the chunk of ``out`` is written);
    ``after`` must not name a term that is ``out`` (its old values are gone). Cost: one read of each term, one
    write of ``out``, no allocation of length d. Error: one float32 (float64) rounding per term before the one
    rounding to ``out``'s type; the inner products as :mod:`.host_arith` states."""
    vecs = [v for v, _ in terms]
    _check_host(out, *vecs)
    acc = _acc(out.dtype)
    d = out.shape[0]
    if any(v.shape != out.shape for v in vecs):
        raise ValueError(f"every term must have the shape of out {tuple(out.shape)}")
    aliased = {i for i, v in enumerate(vecs) if v.data_ptr() == out.data_ptr()}
    if any(i in aliased for i in after):
        raise ValueError("an inner product after the pass cannot name the term that out overwrites")
    cols = columns(len(vecs), width)
    chunks = (d + cols - 1) // cols
    parts = torch.zeros(max(chunks, 1), len(before) + len(after), dtype=acc)
    for ci in range(chunks):
        a, b = ci * cols, min(d, (ci + 1) * cols)
        loaded = [_load(v[a:b], f"term{k}", acc) for k, v in enumerate(vecs)]
        for p, (i, j) in enumerate(before):
            chunk_dot(loaded[i], loaded[j], parts[ci, p])
        # straight into out where it holds the accumulation type and is not a term (no scratch, no copy)
        direct = out.dtype == acc and not aliased
        of = out[a:b] if direct else _SCRATCH.get("combined", acc, (b - a,))
        for k, (f, (_, coef)) in enumerate(zip(loaded, terms)):
            if k == 0:
                torch.mul(f, coef, out=of)
            else:
                of.add_(f, alpha=coef)
        if not direct:
            out[a:b].copy_(of)
            if out.dtype != acc:
                of.copy_(out[a:b])  # the products are those of the stored vector
        for p, i in enumerate(after):
            chunk_dot(of, of if i == -1 else loaded[i], parts[ci, len(before) + p])
    return parts.to(torch.float64).sum(0)
