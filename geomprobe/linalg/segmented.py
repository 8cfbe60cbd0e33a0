"""The two Gram-Schmidt products of a few long rows, ``c = B w`` and ``w -= c B``, as one strided-batched matrix
product over segments of the columns.

``B`` ``(n, m)`` with ``n`` from 1 to a few hundred and ``m`` up to 2^28: a plain ``(n x m) @ (m x 1)`` leaves a
GPU BLAS one reduction of length ``m`` per row, so it splits the reduction (split-K) and reads at a quarter of
the memory bandwidth or less while ``n`` is small (on an H200 at 124M columns: 556 GB/s for one row, 942 GB/s
for 22, against 3974 GB/s for a copy). Cut the columns into ``s`` segments of ``L = m // s`` and the same
numbers are ``s`` independent products ``(n x L) @ (L x 1)``, all in one strided-batched call on views of the
same memory (batch stride ``L``, leading dimension the rows' stride: no copy), each one short enough for a
single pass; the ``s`` partial results (``s x n`` floats) are summed afterwards. The ``m - s L`` columns left
over go through one more (single-batch) product. ``w -= c B`` is the same product with ``c`` broadcast over
the segments and ``w``'s segments as the accumulated output (``beta = 1``, ``alpha = -1``), so ``w`` is read
and written once.

The kernels here are pure functions of the views and of the batched product they are given (``bmm`` for the
dots, ``sub_bmm`` for the update), so the same segmentation runs on every device: CUDA passes products that
accumulate half types in float32 inside cuBLAS, the CPU passes float32 products of float32 copies (only where
a caller forces segmentation: unsegmented BLAS is faster there). Nothing here knows of the 32-bit BLAS limits:
the caller cuts the columns into slices of at most 2^28 and never passes rows farther apart than 2^31 - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SEGMENT_MAX", "SEGMENT_MIN_COLUMNS", "segment_count", "segmented_dots", "segmented_sub"]

# Segments per product: enough independent pieces to fill a GPU (132 SMs on an H200, each wanting several
# resident blocks: 2048 segments of 60,761 columns at 124M), never shorter than 4096 columns, below which a
# segment's launch and partial sum cost more than the parallelism gains (a 1M-vector gets 244 segments, and
# fewer than 8192 columns stay one product).
SEGMENT_MAX = 2048
SEGMENT_MIN_COLUMNS = 1 << 12

BatchedProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchedUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def segment_count(columns: int) -> int:
    """The number of segments for a product over ``columns`` columns (1: no segmentation)."""
    return max(1, min(SEGMENT_MAX, columns // SEGMENT_MIN_COLUMNS))


def _rows_view(B: torch.Tensor, start: int, batches: int, length: int) -> torch.Tensor:
    """``(batches, n, length)`` view of ``B[:, start:]``: batch ``j`` holds columns ``start + j length`` on.

    One row's stride is never read, so it is given as ``length``: a single row of a basis whose rows lie more
    than 2^31 apart (taken one at a time by the caller) then passes BLAS a leading dimension that fits."""
    n = B.shape[0]
    ld = B.stride(0) if n > 1 else length
    return B.as_strided((batches, n, length), (length, ld, 1), B.storage_offset() + start)


def _vector_view(w: torch.Tensor, start: int, batches: int, length: int, column: bool) -> torch.Tensor:
    """``(batches, length, 1)`` (``column``) or ``(batches, 1, length)`` view of ``w[start:]``, batch ``j`` holding
    entries ``start + j length`` on. The stride of the size-1 dimension is ``length``, the leading dimension
    BLAS checks against."""
    if column:
        return w.as_strided((batches, length, 1), (length, 1, length), w.storage_offset() + start)
    return w.as_strided((batches, 1, length), (length, length, 1), w.storage_offset() + start)


def _check(B: torch.Tensor, w: torch.Tensor, segments: int) -> int:
    if B.dim() != 2 or w.dim() != 1 or B.shape[1] != w.shape[0]:
        raise ValueError(f"segmented products take B (n, m) and w (m,), got {tuple(B.shape)} and {tuple(w.shape)}")
    if B.stride(1) != 1 or w.stride(0) != 1:
        raise ValueError("segmented products need unit column strides (contiguous rows and vector)")
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be a positive integer, got {segments!r}")
    return min(segments, max(1, w.shape[0]))


def segmented_dots(B: torch.Tensor, w: torch.Tensor, segments: int, bmm: BatchedProduct) -> torch.Tensor:
    """``B @ w`` ``(n,)`` for ``B`` ``(n, m)`` and ``w`` ``(m,)`` (unit column strides), as ``segments`` partial
    products of ``m // segments`` columns in one ``bmm`` call, summed, plus one product over the columns left.

    ``bmm(X, Y)`` multiplies ``(s, n, L)`` by ``(s, L, 1)`` in the accumulation dtype (views of ``B`` and ``w``:
    nothing is copied here). Cost: one read of ``B`` and ``w``, two product launches at most and one sum of
    ``segments x n`` partial results; no matvec. Error: that of a float sum of ``m`` products in the
    accumulation dtype, ``|err| <= m u sum_j |B_ij w_j|`` (``u`` its unit roundoff); a segmented sum is a
    blocked sum, whose actual error is nearer ``(L + segments) u`` times that sum.
    """
    s = _check(B, w, segments)
    m = w.shape[0]
    length = m // s
    parts = bmm(_rows_view(B, 0, s, length), _vector_view(w, 0, s, length, column=True))  # (s, n, 1)
    out = parts.sum(0)[:, 0] if s > 1 else parts[0, :, 0]
    tail = m - s * length
    if tail:
        out = out + bmm(_rows_view(B, s * length, 1, tail), _vector_view(w, s * length, 1, tail, column=True))[0, :, 0]
    return out


def segmented_sub(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor, segments: int, sub_bmm: BatchedUpdate) -> None:
    """``w -= c @ B`` in place for ``B`` ``(n, m)``, ``w`` ``(m,)`` (unit column strides) and ``c`` ``(n,)`` already in
    the product's input dtype, as ``segments`` batched updates of ``m // segments`` entries in one
    ``sub_bmm`` call plus one for the entries left.

    ``sub_bmm(out, X, Y)`` computes ``out -= X @ Y`` in place for ``out`` ``(s, 1, L)`` (a view of ``w``), ``X``
    ``(s, 1, n)`` (``c`` repeated, ``s n`` entries) and ``Y`` ``(s, n, L)`` (a view of ``B``). Cost: one read of
    ``B``, one read and one write of ``w``; no matvec. Error: per entry, the accumulation dtype's sum of
    ``n + 1`` terms (``|err| <= (n + 1) u (|w_j| + sum_i |c_i B_ij|)``), then one rounding to ``w``'s dtype.
    """
    s = _check(B, w, segments)
    n, m = B.shape
    if c.shape != (n,):
        raise ValueError(f"c must have shape ({n},), got {tuple(c.shape)}")
    length = m // s
    # the coefficients repeated per segment: a few kilobytes, where a zero batch stride is a case BLAS
    # implementations need not accept
    X = c.reshape(1, 1, n).expand(s, 1, n).contiguous()
    sub_bmm(_vector_view(w, 0, s, length, column=False), X, _rows_view(B, 0, s, length))
    tail = m - s * length
    if tail:
        sub_bmm(_vector_view(w, s * length, 1, tail, column=False), X[:1], _rows_view(B, s * length, 1, tail))
