"""The Gram-Schmidt update ``w -= c B`` of a few long rows as one matrix product of a well-tiled shape: a
block-diagonal GEMM.

``B`` ``(n, m)`` with ``n`` from 2 to a few hundred and ``m`` up to 1e10: the plain product ``(1 x n) @ (n x m)``
has one output row, a shape GPU BLAS tiles badly (on an H200 at 124M bf16 columns it read the basis at 1.0-1.6
TB/s for 2 to 22 rows, and at 1.6 TB/s for 300, against 3.7 TB/s for a copy). Cut every row into ``K`` blocks of
``L = m / K`` columns. With the rows back to back in memory, block ``k`` of row ``i`` starts at ``(i K + k) L``:
the basis *is* an ``(n K, L)`` matrix of leading dimension ``L``, and ``w`` an ``(K, L)`` one, both views. Then

    w.view(K, L) -= C @ B.view(n K, L),    C (K, n K),  C[k, i K + k'] = c_i if k' == k else 0,

one GEMM with ``K`` output rows: ``K`` times the flops of the product (``2 n K m``), still memory-bound on tensor
cores (``K`` flops per byte of bf16 basis at ``K = 16``), in a shape cuBLAS tiles well. The zeros of ``C`` add
exact zeros to each sum, so every entry is the same float sum of ``n + 1`` terms as the plain product's
(``w_j`` and ``c_i B_ij``), in another order.

The layout is the whole condition: the ``n K`` blocks must be equally spaced, so for ``n >= 2`` rows ``K`` must
divide ``m`` and the rows must lie ``m`` apart (a contiguous basis block). Rows with gaps between them (a column
window of a wider matrix) or a length no admissible ``K`` divides have no such view; the caller keeps the plain
product for them. One row needs neither: its ``K L`` leading columns form the GEMM and the ``m - K L`` left over
one more (single-row) product.

Pure functions of the views and of the in-place product they are given (``update(out, C, Y)``: ``out -= C @ Y``),
so the same kernel runs on every device. Nothing here knows of the 32-bit BLAS limits beyond the ``width`` it is
given: the caller picks ``K`` so that ``L`` fits a leading dimension, and ``width`` (the most columns of one
product) so that each product's sizes fit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BLOCKS_MAX", "BLOCKS_MIN", "BLOCK_ALIGN", "block_count", "blockdiag_layout", "blockdiag_sub", "coefficient_matrix"]

# Blocks per row: measured on an H200 (bf16, d = 124,439,808, benchmarks/RESULTS.md §6,
# results/profile_rowdots_after_h200.json) at K = 16 (the fastest) and K = 64 (1.3-1.7x slower than K = 16, and
# 1.0-2.7x faster than the plain product at 2-22 and 300 rows). The automatic choice (:func:`block_count`) takes
# the smallest K of this range that divides the row length: 16 where it can, a larger divisor up to 64 where 16
# does not divide it or leaves unaligned blocks.
BLOCKS_MIN = 16
BLOCKS_MAX = 64

Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


# Block lengths that are a multiple of this keep every block 16-byte aligned (bf16) when the rows are: the stride
# alignment tensor-core GEMM kernels want (Hopper's TMA loads require it). Not measured against unaligned
# blocks; the choice prefers it where a count of the range gives it.
BLOCK_ALIGN = 8


def block_count(columns: int, max_length: int) -> int | None:
    """The blocks ``K`` per row for the update of several rows of ``columns`` entries: the smallest ``K`` in
    ``[BLOCKS_MIN, BLOCKS_MAX]`` that divides ``columns`` into blocks of at most ``max_length`` entries (the
    largest leading dimension BLAS takes), among those whose block length is a multiple of ``BLOCK_ALIGN``
    where there are any; None where no count divides ``columns`` (the plain product then)."""
    fits = [k for k in range(BLOCKS_MIN, BLOCKS_MAX + 1) if columns % k == 0 and columns // k <= max_length]
    aligned = [k for k in fits if (columns // k) % BLOCK_ALIGN == 0]
    return (aligned or fits or [None])[0]


def blockdiag_layout(B: torch.Tensor, w: torch.Tensor, blocks: int) -> bool:
    """Whether ``w -= c B`` has the block-diagonal form with ``blocks`` blocks per row: unit column strides, and
    for two rows or more the rows back to back (row stride = row length) with ``blocks`` dividing the length."""
    if B.dim() != 2 or w.dim() != 1 or B.shape[1] != w.shape[0] or blocks < 1:
        return False
    n, m = B.shape
    if (m > 1 and B.stride(1) != 1) or (m > 1 and w.stride(0) != 1):
        return False
    return n <= 1 or (B.stride(0) == m and m % blocks == 0)


def coefficient_matrix(c: torch.Tensor, blocks: int) -> torch.Tensor:
    """``C`` ``(K, n K)`` with ``C[k, i K + k] = c_i`` and zeros elsewhere (``K = blocks``), in ``c``'s dtype and
    on its device: two kernels, no host synchronization, ``K^2 n`` entries."""
    n = c.shape[0]
    C = torch.zeros(blocks, n, blocks, dtype=c.dtype, device=c.device)
    C.diagonal(dim1=0, dim2=2).copy_(c[:, None].expand(n, blocks))  # the (n, K) view of entries [k, i, k]
    return C.view(blocks, n * blocks)


def blockdiag_sub(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor, blocks: int, update: Update,
                  width: int) -> None:
    """``w -= c @ B`` in place for ``B`` ``(n, m)``, ``w`` ``(m,)`` and ``c`` ``(n,)`` (already in the dtype ``C``
    is to have), as one block-diagonal GEMM of ``K = blocks`` output rows over column windows of at most
    ``width`` of the ``L = m // K`` block columns (one window unless ``L > width``), plus, for one row, one
    product over the ``m - K L`` entries left.

    ``update(out, C, Y)`` computes ``out -= C @ Y`` in place for ``out`` ``(K, N)`` (a view of ``w``, leading
    dimension ``L``), ``C`` ``(K, n K)`` and ``Y`` ``(n K, N)`` (a view of ``B``, leading dimension ``L``).
    Needs :func:`blockdiag_layout` (ValueError otherwise). Cost: one read of ``B``, one read and write of ``w``,
    ``2 n K m`` flops; no matvec. Scratch: ``C`` (``K^2 n`` entries), nothing of length ``m``. Error: per entry
    a sum of ``n + 1`` terms in the product's accumulation dtype (``|err| <= (n + 1) u (|w_j| + sum_i |c_i
    B_ij|)``), then one rounding to ``w``'s dtype, as the plain product; the ``n (K - 1)`` zero terms are exact.
    A non-finite entry of ``B`` also reaches ``K - 1`` other entries of ``w`` (``0 * inf`` is NaN).
    """
    n, m = B.shape if B.dim() == 2 else (0, 0)
    if not blockdiag_layout(B, w, blocks):
        raise ValueError(
            f"the block-diagonal update needs B (n, m) with rows back to back and {blocks} dividing m for two rows "
            f"or more, and w (m,), unit column strides; got B {tuple(B.shape)} strides {tuple(B.stride())}, "
            f"w {tuple(w.shape)}")
    if c.shape != (n,):
        raise ValueError(f"c must have shape ({n},), got {tuple(c.shape)}")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if n == 0 or m == 0:
        return
    length = m // blocks
    if length:
        C = coefficient_matrix(c, blocks)
        Y = B.as_strided((n * blocks, length), (length, 1), B.storage_offset())
        out = w.as_strided((blocks, length), (length, 1), w.storage_offset())
        for a in range(0, length, width):
            b = min(length, a + width)
            update(out[:, a:b], C, Y[:, a:b])
    tail = m - blocks * length  # nonzero for one row only
    if tail:
        start = blocks * length
        update(w[start:][None], c[None], B.as_strided((1, tail), (tail, 1), B.storage_offset() + start))
