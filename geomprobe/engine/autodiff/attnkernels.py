"""Blockwise attention kernels: forward, first backward and double backward of softmax attention, recomputing
the probabilities one tile of (batch, key-value heads, query rows) at a time.

Notation for one head: ``S = s Q Kᵀ + M`` (``M`` the additive mask, ``-inf`` where a boolean or causal mask
hides a key), ``P = softmax(S)`` by rows (a row with no visible key is all zeros, as torch's math kernel has it),
``O = P V``. The first backward, given ``dO``::

    dP = dO Vᵀ    δ = rowsum(P ⊙ dP)    dS = P ⊙ (dP - δ)    dQ = s dS K    dK = s dSᵀ Q    dV = Pᵀ dO

Its vector-Jacobian product against upstream ``(gQ, gK, gV)`` (what a Hessian-vector product runs) follows from
``⟨gQ, dQ⟩ + ⟨gK, dK⟩ + ⟨gV, dV⟩ = ⟨dS, G⟩ + ⟨P, W⟩`` with ``G = s (gQ Kᵀ + Q gKᵀ)`` and ``W = dO gVᵀ``::

    γ = rowsum(P ⊙ G)    A = P ⊙ (G - γ)    B = (dP - δ) ⊙ G - γ ⊙ dP + W    C = P ⊙ (B - rowsum(P ⊙ B))
    d dO = P gV + A V    d Q = s (dS gK + C K)    d K = s (dSᵀ gQ + Cᵀ Q)    d V = Aᵀ dO

twelve (rows x keys x head-dim) products per tile against torch's math double backward's eleven. The closed
form rather than recomputing a tile's math attention and differentiating it twice with ``torch.autograd.grad``:
on the CPU (2 x 4 heads x 256 tokens x 32) it took 0.055-0.068 s against 0.084-0.098 s in float32 (0.14-0.16
against 0.20-0.23 in float64), the two agreeing to rounding, and it runs under the legacy vmap of batched
Hessian-vector products, where a nested ``autograd.grad`` on batched cotangents cannot. Every term is
row-local in the queries, so a tile needs its own query rows and all keys; key-side results are summed over
tiles. Grouped-query heads: query head ``h`` reads key-value head ``h // g`` (``g = Hq / Hk``), so queries are
viewed as ``(N, Hk, g, Tq, D)`` and the ``g`` query heads of a key-value head share one tile of keys.

Pure tensor code: no ``nn.Module``, no autograd (callers run it detached); it runs under torch's legacy vmap
(the cotangents of a batched Hessian-vector product), so it uses no in-place writes into unbatched buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CHUNK_BYTES", "Layout", "attention_backward", "attention_double_backward", "attention_forward"]

# The transient memory of one tile: its (rows x keys) temporaries, in the compute dtype, summed. At GPT-2 124M,
# 8 x 512 tokens, float32, a layer's probabilities are 100 MB per temporary; the double backward holds about ten.
CHUNK_BYTES = 256 * 2**20
# (rows x keys) temporaries alive at once in each kernel, counted from the code below (the budget divides by it)
_LIVE = {"forward": 4, "backward": 6, "double": 10}


@dataclass(frozen=True)
class Layout:
    """Shapes of one attention call, normalized: queries ``(N, Hk, g, Tq, D)``, keys ``(N, Hk, Tk, D)``, values
    ``(N, Hk, Tk, Dv)``; the mask (if any) ``(Nm, Hm, gm, Tqm, Tk)`` with each of its leading sizes 1 or full."""

    N: int
    Hk: int
    g: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    scale: float
    causal: bool
    compute_dtype: torch.dtype

    def tile(self, live: int, budget: int | None = None) -> tuple[int, int, int]:
        """(samples, key-value heads, query rows) per tile so that ``live`` (rows x keys) temporaries of the
        compute dtype fit ``budget`` bytes (``CHUNK_BYTES``); one query row of one head is the least."""
        budget = CHUNK_BYTES if budget is None else budget
        per_row = self.g * self.Tk * self.compute_dtype.itemsize * live
        rows = max(1, min(self.Tq, budget // per_row))
        if rows < self.Tq:
            return 1, 1, rows
        heads = max(1, min(self.Hk, budget // (per_row * self.Tq)))
        if heads < self.Hk:
            return 1, heads, self.Tq
        return max(1, min(self.N, budget // (per_row * self.Tq * self.Hk))), self.Hk, self.Tq


def _cut(t: torch.Tensor, dim: int, sl: slice) -> torch.Tensor:
    """``t`` sliced along ``dim``; ``t`` itself when the slice is whole (legacy vmap has no rule for aliases)."""
    start, stop = sl.start, min(sl.stop, t.shape[dim])
    return t if (start, stop) == (0, t.shape[dim]) else t.narrow(dim, start, stop - start)


def _pick(t: torch.Tensor, dim: int, sl: slice) -> torch.Tensor:
    """A broadcast mask's slice: dimensions of size 1 stay whole."""
    return t if t.shape[dim] == 1 else _cut(t, dim, sl)


def _tile(t: torch.Tensor, ns: slice, hs: slice, rs: slice | None = None) -> torch.Tensor:
    """A key tile ``(n, h, Tk, ·)``, or with ``rs`` a query tile ``(n, h, g * r, ·)``: the ``g`` query heads of a
    key-value head are rows of one matrix against its keys."""
    t = _cut(_cut(t, 0, ns), 1, hs)
    if rs is None:
        return t
    t = _cut(t, 3, rs)
    return t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3], t.shape[4])


def _probabilities(L: Layout, qs: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, r0: int) -> torch.Tensor:
    """``P`` of a tile: scaled queries ``qs (n, h, g * r, D)`` against ``k (n, h, Tk, D)``, rows from ``r0``.
    Rows with no visible key are zeros."""
    S = torch.matmul(qs, k.transpose(-1, -2))
    if mask is not None or L.causal:
        n, h, gr, tk = S.shape
        S = S.reshape(n, h, L.g, gr // L.g, tk)
        if mask is not None:
            S = S.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else S + mask
        if L.causal:  # top-left aligned, as torch's is_causal: query row i sees keys 0..i
            rows = torch.arange(r0, r0 + S.shape[-2], device=S.device)
            S = S.masked_fill(rows[:, None] < torch.arange(L.Tk, device=S.device)[None, :], -math.inf)
        S = S.reshape(n, h, gr, tk)
    top = S.amax(-1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    E = torch.exp(S - top)
    del S
    Z = E.sum(-1, keepdim=True)
    return E.div_(torch.where(Z == 0, torch.ones_like(Z), Z))


Kernel = Callable[[torch.Tensor, list, list], tuple[list, list]]


def _sweep(L: Layout, live: int, rows: Sequence[torch.Tensor], keys: Sequence[torch.Tensor],
           mask: torch.Tensor | None, kernel: Kernel,
           budget: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``kernel(P, row_tiles, key_tiles) -> (row_outputs, key_outputs)`` over the tiles of :meth:`Layout.tile`.

    ``rows`` are ``(N, Hk, g, Tq, ·)``, the queries first; ``keys`` are ``(N, Hk, Tk, ·)``, the keys first. Tiles
    reach the kernel in the compute dtype as ``(n, h, g * r, ·)`` and ``(n, h, Tk, ·)``, the queries multiplied by
    the scale. Row outputs (``(n, h, g * r, ·)``) are put together along rows, heads and samples; key outputs
    ``(n, h, Tk, ·)`` are summed over row tiles. Outputs stay in the compute dtype.
    """
    nb, hb, rb = L.tile(live, budget)
    ct = L.compute_dtype
    row_out_n: list[list] = []
    key_out_n: list[list] = []
    for n0 in range(0, L.N, nb):
        ns = slice(n0, n0 + nb)
        row_out_h: list[list] = []
        key_out_h: list[list] = []
        for h0 in range(0, L.Hk, hb):
            hs = slice(h0, h0 + hb)
            key_tiles = [_tile(t, ns, hs).to(ct) for t in keys]
            row_out_r: list[list] = []
            key_acc: list[torch.Tensor] | None = None
            for r0 in range(0, L.Tq, rb):
                rs = slice(r0, r0 + rb)
                mt = None
                if mask is not None:
                    mt = _pick(_pick(_pick(mask, 0, ns), 1, hs), 3, rs)
                    mt = mt if mt.dtype == torch.bool else mt.to(ct)
                row_tiles = [_tile(t, ns, hs, rs).to(ct) for t in rows]
                row_tiles[0] = row_tiles[0] * L.scale
                P = _probabilities(L, row_tiles[0], key_tiles[0], mt, r0)
                r_out, k_out = kernel(P, row_tiles, key_tiles)
                del P, row_tiles
                row_out_r.append([t.reshape(t.shape[0], t.shape[1], L.g, -1, t.shape[-1]) for t in r_out])
                key_acc = k_out if key_acc is None else [a + b for a, b in zip(key_acc, k_out)]
            row_out_h.append([_cat(parts, 3) for parts in zip(*row_out_r)])
            key_out_h.append(key_acc or [])
        row_out_n.append([_cat(parts, 1) for parts in zip(*row_out_h)])
        key_out_n.append([_cat(parts, 1) for parts in zip(*key_out_h)])
    return [_cat(p, 0) for p in zip(*row_out_n)], [_cat(p, 0) for p in zip(*key_out_n)]


def _cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# ---------------------------------------------------------------------------------------------- the kernels
def attention_forward(L: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      budget: int | None = None) -> torch.Tensor:
    """``O = softmax(s Q Kᵀ + M) V`` in the compute dtype, ``(N, Hk, g, Tq, Dv)``. Cost: two (rows x keys x
    head-dim) products per tile; exact to rounding (float32 for half inputs)."""

    def kernel(P, rows, keys):
        return [torch.matmul(P, keys[1])], []

    return _sweep(L, _LIVE["forward"], [q], [k, v], mask, kernel, budget)[0][0]


def attention_backward(L: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       dO: torch.Tensor, budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dQ, dK, dV)`` of the module docstring, in the compute dtype: queries' shape, then ``(N, Hk, Tk, ·)``.
    Cost: five products per tile (``P`` recomputed); exact to rounding."""

    def kernel(P, rows, keys):
        qs, dOt = rows
        kt, vt = keys
        dP = torch.matmul(dOt, vt.transpose(-1, -2))
        dS = P * (dP - (P * dP).sum(-1, keepdim=True))
        del dP
        dq = torch.matmul(dS, kt) * L.scale
        dk = torch.matmul(dS.transpose(-1, -2), qs)
        dv = torch.matmul(P.transpose(-1, -2), dOt)
        return [dq], [dk, dv]

    (dq,), (dk, dv) = _sweep(L, _LIVE["backward"], [q, dO], [k, v], mask, kernel, budget)
    return dq, dk, dv


def attention_double_backward(
    L: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dO: torch.Tensor,
    gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of ``(dO, Q, K, V) -> (dQ, dK, dV)`` against ``(gQ, gK, gV)``: ``(d dO, d Q,
    d K, d V)`` of the module docstring, in the compute dtype. Cost: twelve (rows x keys x head-dim) products
    per tile plus the recomputed ``P``; exact to rounding. The cotangents may be legacy-vmap batched tensors."""

    def kernel(P, rows, keys):
        qs, dOt, gqt = rows
        kt, vt, gkt, gvt = keys
        dP = torch.matmul(dOt, vt.transpose(-1, -2))
        dPc = dP - (P * dP).sum(-1, keepdim=True)
        G = torch.matmul(gqt * L.scale, kt.transpose(-1, -2)) + torch.matmul(qs, gkt.transpose(-1, -2))
        gamma = (P * G).sum(-1, keepdim=True)
        A = P * (G - gamma)
        B = dPc * G - dP * gamma + torch.matmul(dOt, gvt.transpose(-1, -2))
        del G, dP
        C = P * (B - (P * B).sum(-1, keepdim=True))
        del B
        dS = P * dPc
        del dPc
        d_dO = torch.matmul(P, gvt) + torch.matmul(A, vt)
        d_q = (torch.matmul(dS, gkt) + torch.matmul(C, kt)) * L.scale
        d_k = torch.matmul(dS.transpose(-1, -2), gqt * L.scale) + torch.matmul(C.transpose(-1, -2), qs)
        d_v = torch.matmul(A.transpose(-1, -2), dOt)
        return [d_dO, d_q], [d_k, d_v]

    (d_dO, d_q), (d_k, d_v) = _sweep(L, _LIVE["double"], [q, dO, gq], [k, v, gk, gv], mask, kernel, budget)
    return d_dO, d_q, d_k, d_v

