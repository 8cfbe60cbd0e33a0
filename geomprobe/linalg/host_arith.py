"""Krylov arithmetic on host-memory (CPU) vectors: inner products, updates and norms of a basis and a vector,
the fused passes of one Lanczos step, and the rotation of a basis, all taken in column chunks through
reusable scratch.

In the host-vector mode a Lanczos basis of a 7B model's shard holds vectors of 3e9 bf16 entries, and every
step's arithmetic runs on the CPU. The generic torch forms of that arithmetic are slow there in three ways
(benchmarks/RESULTS.md §6, "Host-vector Lanczos arithmetic on the CPU"):

- a CPU operation on mixed types, or a half-precision reduction with ``dtype=torch.float32``, first converts
  its whole input to float32: a fresh d-sized allocation (its page faults cost ~6x a copy into an existing
  buffer) and a single-threaded conversion;
- any other fresh d-sized temporary (``x.float()``, ``.clone()``, ``torch.cat``) pays the same page faults;
- separate passes (a dot, then an update, then a norm) read the vector and the basis once each.

Here every pass walks the columns in chunks: a chunk of each half-precision row is converted into a float32
scratch buffer that lives as long as the thread (:data:`HOST_CHUNK_ELEMENTS` elements for the rows, so the
chunk stays in cache while it is used; float32 and float64 rows are used in place), the inner products and
norms are float32 (float64 for float64 vectors) elementwise products with pairwise row sums
(:func:`chunk_dot`), the updates matrix-vector products over the chunk on one or two threads and scaled rows,
which every torch thread shares, from :data:`PARALLEL_PRODUCTS_FROM_THREADS` threads on (the matrix-vector
products ran on one thread only), the updated chunk is rounded once back to the vector's type, and the partial
sums of the chunks are added in float64.
A Lanczos step's passes are fused (:func:`lanczos_pass`): the three-term step, the Gram-Schmidt
coefficients and the norm before the update come from one read of the basis, the update and the norm after it
from a second.

Every function here takes CPU tensors; the CUDA paths of :mod:`.vectors` are separate and unchanged.

Error of every inner product here: per chunk a pairwise float32 sum (float64 for float64 vectors) of at most
``columns`` products, ``|err| <= log2(columns) * u * sum_j |x_j y_j|`` with ``u`` that type's unit roundoff,
the chunks' sums then added in float64; products of half-precision values are exact in float32. (Summed in
order, as a BLAS ``dot`` or matrix-vector product does, the bound is ``columns * u`` times it, and it was
reached: see :func:`chunk_dot`.)
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import torch

__all__ = [
    "HOST_CHUNK_ELEMENTS", "PARALLEL_PRODUCTS_FROM_THREADS", "chunk_dot", "chunk_norm_sq", "columns", "host_dots",
    "host_norm_sq", "host_rotate", "host_round", "host_sub", "is_host", "lanczos_pass", "row_groups",
]

# float32 elements of row scratch per chunk (8 MB): large enough that a chunk's few operations cost little
# Python next to the bytes they move (about 10 us each against ~0.2 ms of memory traffic at 40 GB/s), small
# enough to stay in the last-level cache between its conversion and its product (benchmarks/host_lanczos.py).
HOST_CHUNK_ELEMENTS = 1 << 21
# fewest columns per chunk whatever the rows: many rows at once (a rotation of a large basis) would otherwise
# cut the columns so short that the per-chunk overhead dominates
MIN_COLUMNS = 1 << 15
# rows converted at once: a basis block of more rows is taken this many rows at a time, so the columns per
# chunk (HOST_CHUNK_ELEMENTS over the rows) stay long
GROUP_ROWS = 16
# BLAS sizes are 32-bit: rows farther apart than this go through the scratch even when already float32
LD_LIMIT = 2**31 - 1
# From this many torch threads on, a chunk's updates are one scaled row at a time, which runs on every thread,
# instead of the matrix-vector product, which ran on one thread whatever the setting (a (6, 299593) float32
# chunk in cache, benchmarks/RESULTS.md §6: addmv_ 115 and 114 us at one and two threads, the row updates 194
# and 119 us). The inner products are a product and a pairwise sum at any thread count (chunk_dot: torch.mv
# was faster, 134 us against 395 at one thread, but summed in order).
PARALLEL_PRODUCTS_FROM_THREADS = 3


def is_host(*tensors: torch.Tensor) -> bool:
    """Whether every tensor lives in host memory (the CPU), where these kernels apply."""
    return all(t.device.type == "cpu" for t in tensors)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Scratch(threading.local):
    """Per-thread scratch buffers by slot and type, grown (never shrunk) to the largest request."""

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self.buffers.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[(slot, dtype)] = buf
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def columns(rows: int, width: int | None = None) -> int:
    """Columns per chunk of a pass holding ``rows`` rows (and the vector) in float scratch at once."""
    if width is not None:
        return max(1, width)
    return max(MIN_COLUMNS, HOST_CHUNK_ELEMENTS // (max(rows, 1) + 1))


def row_groups(blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The rows of ``blocks`` (2-D, each ``(r, d)``) as consecutive groups of at most :data:`GROUP_ROWS`."""
    out = []
    for B in blocks:
        for s in range(0, B.shape[0], GROUP_ROWS):
            out.append(B[s : s + GROUP_ROWS])
    return out


def _load(x: torch.Tensor, slot: str, acc: torch.dtype) -> torch.Tensor:
    """``x`` (a chunk of one row or of several) as ``acc`` values: itself when it already is and BLAS can take
    its layout, else converted into scratch (no allocation once the scratch has grown)."""
    if x.dtype == acc and (x.dim() == 1 or x.shape[0] == 1 or x.stride(0) <= LD_LIMIT):
        return x
    buf = _SCRATCH.get(slot, acc, tuple(x.shape))
    buf.copy_(x)
    return buf


SMALL_CHUNK = 1 << 16  # entries up to which chunk_dot's product is not written into scratch


def chunk_dot(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inner products of the rows of ``x`` (a 1-D chunk, or 2-D rows of one) with ``y`` (broadcast along them),
    into ``out`` (0-d, or one entry per row; None: a new tensor): their products in scratch, then torch's pairwise
    sum along the last dimension. BLAS's ``dot`` sums the products one after another (per SIMD lane): on a vector
    whose mass sits in a few entries, a Lanczos vector along a converged outlier, a 700k-entry float32 norm came out
    2.9e-5 off (1.2e-4 with ``vector_norm``) against 3e-7 summed pairwise, and Lanczos took the wrong norms for its
    matvec's asymmetry (a whole-basis pass at every step of an exactly symmetric product). Cost: one write and read
    of a cache-sized scratch chunk more."""
    # a small chunk's product is a fresh tensor: cheaper than the scratch's lookup at a Lanczos step of a small model
    prod = torch.mul(x, y) if x.numel() <= SMALL_CHUNK else torch.mul(x, y, out=_SCRATCH.get("dot", x.dtype, x.shape))
    return torch.sum(prod, -1) if out is None else torch.sum(prod, -1, out=out)


NORM_ROW = 256  # entries per row of chunk_norm_sq's row norms: summed in order, at most this many per row


def chunk_norm_sq(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``||x||^2`` of a 1-D chunk into ``out`` (0-d, ``x``'s type): the norms of rows of :data:`NORM_ROW`
    entries (one read of ``x``, nothing written at its length), their squares summed pairwise, and the tail's
    products. :func:`chunk_dot` of ``x`` with itself writes the products into scratch and reads them back: on
    one thread a 2M-entry float32 chunk took 330 us that way against 200 us here. Error: at most
    ``NORM_ROW * u`` relative per row (summed in order within it), ``log2(rows) * u`` over the rows; on a
    vector whose mass sits in a few entries 6e-8 relative (the pairwise sum 1.7e-7, BLAS ``dot`` 6.5e-5)."""
    n = x.numel()
    main = n - n % NORM_ROW
    if main == 0 or not x.is_contiguous():
        return chunk_dot(x, x, out)
    r = torch.linalg.vector_norm(x[:main].view(-1, NORM_ROW), dim=1)
    torch.sum(r.mul_(r), 0, out=out)
    if main < n:
        tail = x[main:]
        out += torch.sum(tail * tail)
    return out


def _find_row(groups: Sequence[torch.Tensor], v: torch.Tensor) -> tuple[int, int] | None:
    """``(group, row)`` of the row of ``groups`` that is ``v`` itself (same memory), or None."""
    if v.dim() != 1:
        return None
    for g, G in enumerate(groups):
        if G.untyped_storage().data_ptr() != v.untyped_storage().data_ptr() or G.stride(1) != v.stride(0):
            continue
        off = v.storage_offset() - G.storage_offset()
        if G.stride(0) > 0 and off >= 0 and off % G.stride(0) == 0 and off // G.stride(0) < G.shape[0]:
            return g, off // G.stride(0)
    return None


def lanczos_pass(w: torch.Tensor, groups: Sequence[torch.Tensor], *,
                 pre: Sequence[tuple[torch.Tensor, float]] = (), sub: torch.Tensor | None = None,
                 dots: bool = False, norm: bool = False, width: int | None = None,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the columns of ``w`` ``(d,)`` and the basis rows ``groups`` (2-D tensors ``(r_g, d)``, ``n``
    rows in all, in order), in chunks, doing in turn on each chunk:

    1. ``w -= sum_k a_k v_k`` for ``pre = [(v_k, a_k)]`` (the three-term step; a ``v_k`` that is a row of
       ``groups`` is read with them, not again);
    2. ``w -= sub @ B`` (``sub`` ``(n,)``, any float type);
    3. ``B @ w`` of the updated ``w`` (``dots``) and ``||w||^2`` (``norm``), both of ``w`` as stored (for half
       types, after its rounding).

    The updated ``w`` is written back in its type, rounded once from float32 (float64 for float64 vectors).
    ``sub`` together with ``dots`` needs a single group (the coefficients of every group must have been
    applied before any product); else call twice. Returns ``(B @ w, ||w||^2)`` as float64 tensors (None for
    what was not asked). Cost: one read of ``w`` and of the rows (plus the ``pre`` vectors not among them),
    one write of ``w`` when it is updated, no matvec, no allocation of length d. ``width`` forces the columns
    per chunk (tests: chunks that do not divide d). Error: see the module docstring; the update adds one
    float32 (float64) rounding per term before the one rounding to ``w``'s type.
    """
    if w.device.type != "cpu" or any(G.device.type != "cpu" for G in groups):
        raise ValueError("lanczos_pass takes host (CPU) tensors only")
    if sub is not None and dots and len(groups) > 1:
        raise ValueError("sub together with dots needs a single row group (apply every group's update first)")
    acc = _acc(w.dtype)
    d = w.shape[0]
    sizes = [G.shape[0] for G in groups]
    n = sum(sizes)
    starts = list(itertools.accumulate(sizes, initial=0))
    where = [_find_row(groups, v) for v, _ in pre]
    # the group holding a pre vector is loaded first, so the three-term step reads it with the rest
    home = next((p[0] for p in where if p is not None), None)
    order = list(range(len(groups)))
    if home is not None:
        order.remove(home)
        order.insert(0, home)
    cols = columns(max(sizes, default=0), width)
    chunks = (d + cols - 1) // cols
    dot_parts = torch.empty(chunks, n, dtype=acc) if dots else None
    norm_parts = torch.empty(chunks, dtype=acc) if norm else None
    sub_acc = None if sub is None else sub.to(dtype=acc)
    update = bool(pre) or sub is not None
    parallel = torch.get_num_threads() >= PARALLEL_PRODUCTS_FROM_THREADS
    sub_lists = None
    if parallel and sub_acc is not None:
        sub_lists = [sub_acc[starts[g] : starts[g + 1]].tolist() for g in range(len(groups))]
    for ci in range(chunks):
        a, b = ci * cols, min(d, (ci + 1) * cols)
        wc = w[a:b]
        wf = _load(wc, "w", acc)
        # one group's rows of this chunk in scratch at a time, loaded on first use: every group is visited
        # once per step of the chunk, the group of the three-term vectors first
        loaded_g, rows = None, None
        for k, ((v, coef), pos) in enumerate(zip(pre, where)):
            if coef == 0.0:
                continue
            if pos is not None and pos[0] == home:
                if loaded_g != home:
                    loaded_g, rows = home, _load(groups[home][:, a:b], "rows", acc)
                vf = rows[pos[1]]
            else:
                vf = _load(v[a:b], f"pre{k}", acc)
            wf.sub_(vf, alpha=coef)
        if sub_acc is not None:
            for g in order:
                if loaded_g != g:
                    loaded_g, rows = g, _load(groups[g][:, a:b], "rows", acc)
                if parallel:
                    for i, coef in enumerate(sub_lists[g]):
                        wf.add_(rows[i], alpha=-coef)
                else:
                    wf.addmv_(rows.T, sub_acc[starts[g] : starts[g + 1]], alpha=-1)
        if update and wf is not wc:
            wc.copy_(wf)  # the one rounding to w's type
            if dots or norm:
                wf.copy_(wc)  # the products are those of the stored vector
        if dots:
            for g in order:
                if loaded_g != g:
                    loaded_g, rows = g, _load(groups[g][:, a:b], "rows", acc)
                chunk_dot(rows, wf, dot_parts[ci, starts[g] : starts[g + 1]])  # not mv: it sums in order
        if norm:
            chunk_norm_sq(wf, norm_parts[ci])
    out_dots = out_norm = None
    if dots:
        out_dots = dot_parts[0].to(torch.float64) if chunks == 1 else dot_parts.to(torch.float64).sum(0)
    if norm:
        out_norm = norm_parts[0].to(torch.float64) if chunks == 1 else norm_parts.to(torch.float64).sum()
    return out_dots, out_norm


def host_dots(B: torch.Tensor, w: torch.Tensor, *, width: int | None = None) -> torch.Tensor:
    """``B @ w`` (float64) for host rows ``B`` ``(n, d)`` and ``w`` ``(d,)``: one chunked read of both, no
    allocation of length d. Error: see the module docstring."""
    if B.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return lanczos_pass(w, row_groups([B]), dots=True, width=width)[0]


def host_sub(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor, *, width: int | None = None) -> torch.Tensor:
    """``w -= c @ B`` in place for host rows ``B`` ``(n, d)``: one chunked read of ``B``, one read and write of
    ``w``, accumulated in float32 (float64 for float64) and rounded once to ``w``'s type. Returns ``w``."""
    if B.shape[0] > 0:
        lanczos_pass(w, row_groups([B]), sub=c.reshape(-1).to("cpu"), width=width)
    return w


def host_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round the entries of the host vector ``x`` to the nearest values of ``dtype`` (round to nearest even), in
    place, ``x`` keeping its own type: a float32 row holding exactly what a half-precision product will read.
    In chunks through scratch (no allocation of length d); one read and one write of ``x``. Returns ``x``."""
    if x.dtype == dtype:
        return x
    flat = x.reshape(-1)
    step = HOST_CHUNK_ELEMENTS
    for a in range(0, flat.numel(), step):
        part = flat[a : a + step]
        buf = _SCRATCH.get("round", dtype, tuple(part.shape))
        buf.copy_(part)
        part.copy_(buf)
    return x


def host_norm_sq(w: torch.Tensor, *, width: int | None = None) -> torch.Tensor:
    """``||w||^2`` (float64, 0-d) of a host vector: one chunked read, no allocation of length d."""
    return lanczos_pass(w, [], norm=True, width=width)[1]


def host_rotate(blocks: Sequence[torch.Tensor], Y: torch.Tensor, targets: Sequence[torch.Tensor],
                width: int | None = None, norms: bool = False) -> torch.Tensor | None:
    """Write ``Y^T V`` into ``targets`` for the ``n`` rows ``V`` of ``blocks`` and ``Y`` ``(n, l)``, in chunks of
    columns through scratch, so ``targets`` may be the same memory as ``blocks`` (a thick restart's rotation
    in place) and no second basis is allocated. ``targets``: 2-D tensors holding the ``l`` output rows in
    order. Cost: one read of the ``n`` rows and one write of ``l``, ``2 n l d`` flops; the products in
    float32 (float64 for float64 bases), one rounding to the rows' type. Error: per entry a float32 sum of
    ``n`` products. ``norms``: also return the squared norms (float64, ``(l,)``) of the output rows as
    computed, before their rounding."""
    first = blocks[0]
    acc = _acc(first.dtype)
    n = sum(B.shape[0] for B in blocks)
    l = Y.shape[1]
    if Y.shape[0] != n or sum(T.shape[0] for T in targets) != l:
        raise ValueError(f"Y must be ({n}, {l}) for {n} rows into {sum(T.shape[0] for T in targets)}")
    Yt = Y.T.to(dtype=acc).contiguous()
    d = first.shape[1]
    # rows already in the accumulation type go to BLAS where they lie, block by block (a product per block
    # summed into the chunk's result): copying them into scratch first cost more than the products (0.5 of a
    # 0.7 s pass over 87 rows of 10M float32 entries, 0.27-0.30 s without); half-precision rows are converted
    # into scratch
    direct = all(B.dtype == acc and B.stride(1) == 1 and B.stride(0) <= LD_LIMIT for B in blocks)
    cols = columns(n + l - 1, width)
    parts = []
    for a in range(0, d, cols):
        b = min(d, a + cols)
        Z = _SCRATCH.get("rotate_out", acc, (l, b - a))
        if direct:
            s = 0
            for B in blocks:
                Ys = Yt[:, s : s + B.shape[0]]
                if s == 0:
                    torch.mm(Ys, B[:, a:b], out=Z)
                else:
                    Z.addmm_(Ys, B[:, a:b])
                s += B.shape[0]
        else:
            X = _SCRATCH.get("rotate_in", acc, (n, b - a))
            s = 0
            for B in blocks:
                X[s : s + B.shape[0]].copy_(B[:, a:b])
                s += B.shape[0]
            torch.mm(Yt, X, out=Z)
        if norms:
            parts.append(chunk_dot(Z, Z).to(torch.float64))
        s = 0
        for T in targets:
            T[:, a:b].copy_(Z[s : s + T.shape[0]])
            s += T.shape[0]
    return torch.stack(parts).sum(0) if norms else None
