"""What every kernel shares: the matvec type, seeded random vectors (Rademacher, Gaussian) drawn on the target
device without touching the global RNG, applying a matvec to the rows of a block, a matvec's product written
into the caller's buffer (:func:`matvec_into`), and inner products that accumulate in float32 for
half-precision vectors.

A *matvec* maps a flat vector ``(d,)`` to ``H v`` and a block ``(k, d)`` to ``(H V^T)^T`` (row-wise
products). Randomness comes from an explicit CPU ``torch.Generator``: each draw takes one 63-bit seed from it
and seeds a generator on the target device, so the vectors are drawn where they are used (no host copy of a
d-vector), the same seed gives the same vectors on every rank of one device kind, and the CPU generator's
stream advances by exactly one number per draw."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigurationError
from .blockdiag import block_count, blockdiag_layout, blockdiag_sub
from .host_arith import chunk_dot, host_dots, host_norm_sq, host_sub, is_host
from .segmented import segment_count, segmented_dots, segmented_sub

__all__ = [
    "Matvec", "accumulation_dtype", "all_finite", "apply_rows", "check_dim", "default_generator", "device_generator",
    "forced_kernels", "gaussian", "matvec_into", "rademacher", "row_dots", "scratch_columns", "sub_rows",
    "sub_rows_kernel", "takes_out", "vector_norm",
]


Matvec = Callable[[torch.Tensor], torch.Tensor]

HALF_TYPES = (torch.float16, torch.bfloat16)

# Half-precision products are accumulated in float32 a slice of columns at a time: this many float32 elements
# of scratch at most (64 MB), so no full-length float32 copy of a vector or a basis is ever made.
HALF_CHUNK_ELEMENTS = 1 << 24


def _probe_out_dtype(op, *shape: tuple[int, ...]) -> bool:
    try:  # torch.mm / torch.bmm (..., out_dtype=) exist from torch 2.8 on (CUDA kernels only)
        a, b = (torch.zeros(sh, device="meta", dtype=torch.bfloat16) for sh in shape)
        return op(a, b, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


_HAS_OUT_DTYPE = _probe_out_dtype(torch.mm, (1, 1), (1, 1))
_HAS_BMM_OUT_DTYPE = _probe_out_dtype(torch.bmm, (1, 1, 1), (1, 1, 1))


def default_generator(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator: randomness local to the call, never the global RNG."""
    return torch.Generator().manual_seed(seed)


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def device_generator(generator: torch.Generator, device=None) -> torch.Generator:
    """A generator on ``device`` seeded by one 63-bit integer drawn from ``generator``.

    The draw advances ``generator`` by one number whatever the size of the vectors drawn afterwards, so a
    sequence of calls stays reproducible per seed; two devices of one kind (every rank of a job) given the
    same seed produce the same stream.
    """
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
    dev = _device(device)
    return torch.Generator(device=dev).manual_seed(seed)


def _shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def rademacher(shape: Sequence[int] | int, generator: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Entries +-1 with equal probability, drawn on ``device`` directly in ``dtype`` (one allocation).

    The stream comes from :func:`device_generator` of ``generator``: reproducible per seed, identical on
    devices of one kind. Cost: no matvec; memory one tensor of ``shape`` in ``dtype``.
    """
    g = device_generator(generator, device)
    z = torch.empty(_shape(shape), dtype=dtype, device=_device(device))
    return z.random_(0, 2, generator=g).mul_(2).sub_(1)


def gaussian(shape: Sequence[int] | int, generator: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Standard normal entries drawn on ``device`` in ``dtype``; half types are drawn in float32 a slice at a
    time and rounded, so a bf16 and an fp16 vector of one seed are roundings of the same float32 vector.

    Reproducible per seed through :func:`device_generator`; memory one tensor of ``shape`` in ``dtype`` (plus
    at most ``HALF_CHUNK_ELEMENTS`` float32 of scratch for half types).
    """
    g = device_generator(generator, device)
    dev = _device(device)
    shape = _shape(shape)
    if dtype not in HALF_TYPES:
        return torch.randn(shape, generator=g, dtype=dtype, device=dev)
    out = torch.empty(shape, dtype=dtype, device=dev)
    flat = out.view(-1)
    # on the CPU one float32 buffer serves every slice: a fresh 64 MB draw per slice paid its page faults
    # each time (180 slices at 3e9 entries); the draws, and so the values, are the same
    buf = torch.empty(min(HALF_CHUNK_ELEMENTS, flat.numel()), dtype=torch.float32) if dev.type == "cpu" else None
    for s in range(0, flat.numel(), HALF_CHUNK_ELEMENTS):
        n = min(HALF_CHUNK_ELEMENTS, flat.numel() - s)
        if buf is None:
            flat[s : s + n] = torch.randn(n, generator=g, dtype=torch.float32, device=dev)
        else:
            flat[s : s + n] = torch.randn(n, generator=g, dtype=torch.float32, out=buf[:n])
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 vectors, float32 for everything else (half types accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The CPU's float32 slices of half-type products are smaller: a 64 MB temporary is a fresh mapping that the
# allocator hands back to the system when freed, so every slice paid its page faults again (a (64, 2^22) bf16
# basis: 994 ms per row_dots with 2^24-element slices, 167 ms with 2^20, benchmarks/RESULTS.md).
CPU_CHUNK_ELEMENTS = 1 << 20


def scratch_columns(rows: int, device: torch.device | None = None) -> int:
    """Columns per float32 slice of a ``rows``-row pass on ``device``: ``HALF_CHUNK_ELEMENTS`` float32 elements of
    scratch at most, ``CPU_CHUNK_ELEMENTS`` on the CPU."""
    elements = HALF_CHUNK_ELEMENTS
    if device is not None and device.type == "cpu":
        elements = min(elements, CPU_CHUNK_ELEMENTS)
    return max(1, elements // max(rows, 1))


# Columns per matrix product: BLAS takes 32-bit sizes (a 7B model's shard on 2 GPUs has 3e9 entries, past 2^31),
# and the fused half path's float32 scratch is one slice, not a whole float32 d-vector (12 GB there).
PRODUCT_COLUMNS = 1 << 28


def _column_slices(d: int, width: int | None = None):
    width = PRODUCT_COLUMNS if width is None else width
    return ((s, min(d, s + width)) for s in range(0, d, width))


# A matrix's rows farther apart than this cannot go to BLAS at all (its leading dimension is 32-bit too), so
# such rows are taken one at a time, each slice of a row being contiguous.
LD_LIMIT = 2**31 - 1


def _long_rows(B: torch.Tensor) -> bool:
    return B.dim() == 2 and B.shape[0] > 0 and B.stride(0) > LD_LIMIT


# Segments per column slice of every product (:mod:`.segmented`). None: chosen per device, on CUDA by
# ``segment_count`` (a plain product of a few long rows leaves cuBLAS too little parallelism), elsewhere none
# (unsegmented BLAS is the fastest on the CPU, benchmarks/RESULTS.md). An integer forces that count on every
# device: the tests run the CUDA path's segmentation on the CPU this way.
SEGMENTS: int | None = None
# Row counts for which the automatic (CUDA) choice segments ``row_dots``: measured on an H200 at d = 124M in
# bf16 (benchmarks/RESULTS.md §6, results/profile_rowdots_after_h200.json), segments read 2.6x faster than the
# plain fused product at 8-22 rows, slower at 1-2 rows and at 64 and more (where cuBLAS already splits the
# reduction). ``sub_rows`` segments only its one-row case (an elementwise pass, 7x faster); from two rows on
# the segmented update measured no faster than the plain one (and 2.9x slower at 64 rows).
SEGMENTED_DOT_ROWS = (4, 48)


def _tf32_matmul() -> bool:
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except (AttributeError, RuntimeError):
        return False


def _segments(B: torch.Tensor, w: torch.Tensor, segments: int | None) -> int | None:
    """Segments per column slice: None for the unsegmented products, 0 for :func:`segment_count` of each
    slice, else that count."""
    forced = SEGMENTS if segments is None else segments
    if forced is not None and (not isinstance(forced, int) or isinstance(forced, bool) or forced < 1):
        raise ConfigurationError(f"segments must be a positive integer or None, got {forced!r}")
    if B.dim() != 2 or (B.shape[1] > 1 and B.stride(1) != 1) or (w.shape[0] > 1 and w.stride(0) != 1):
        return None  # entries with gaps between them have no strided batch view; BLAS takes them as they are
    if forced is not None:
        return forced
    if w.device.type != "cuda" or (w.dtype == torch.float32 and _tf32_matmul()):
        # a batched product may round float32 inputs to TF32, where the matrix-vector products never do
        return None
    return 0


# Blocks per row of the block-diagonal update (:mod:`.blockdiag`). None: the automatic (CUDA) choice below; 0: never
# (the products before it); an integer forces that count on every device where the rows' layout allows it: the
# tests run the CUDA path's block-diagonal update on the CPU this way.
BLOCKS: int | None = None
# Row counts and types for which the automatic (CUDA) choice updates ``w -= c B`` as a block-diagonal GEMM:
# measured on an H200 at d = 124,439,808 in bf16 (benchmarks/RESULTS.md §6, results/profile_rowdots_after_h200.json,
# ms per update at K = 16 against the fused product before it): 0.44 / 1.56 at 2 rows, 0.77 / 1.95 at 8,
# 1.24 / 1.96 at 16, 1.76 / 4.43 at 22, 17.9 / 47.4 at 300; slower at 64 (4.19 / 3.92) and 128 (7.91 / 7.54).
# 23-63 and 129-299 rows were not measured and keep the fused product, as does one row (an elementwise pass,
# 0.49 ms, about the GEMM's 0.42). fp16 takes the same tensor-core path as bf16; float32 (a matrix-vector
# product before, a different kernel from the half types' one-row GEMM) is not measured yet and keeps it.
BLOCKDIAG_ROWS = (2, 22)  # inclusive
BLOCKDIAG_FROM_ROWS = 300
BLOCKDIAG_DTYPES = HALF_TYPES


def forced_kernels() -> bool:
    """Whether :data:`SEGMENTS` or :data:`BLOCKS` force the CUDA kernels on every device (the tests run them on
    the CPU so): the host-memory Lanczos step then goes through :func:`row_dots` / :func:`sub_rows` too."""
    return SEGMENTS is not None or bool(BLOCKS)


def sub_rows_kernel(rows: int, dtype: torch.dtype) -> str:
    """The update the automatic (CUDA) choice of :func:`sub_rows` makes for ``rows`` rows of ``dtype``:
    ``"block-diagonal"`` (:data:`BLOCKDIAG_ROWS`, :data:`BLOCKDIAG_FROM_ROWS`, :data:`BLOCKDIAG_DTYPES`; the plain
    product instead where no block count fits the rows' layout), ``"elementwise"`` (one row) or ``"product"``
    (the fused product), the fastest measured at each."""
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a non-negative integer, got {rows!r}")
    if dtype in BLOCKDIAG_DTYPES and (BLOCKDIAG_ROWS[0] <= rows <= BLOCKDIAG_ROWS[1] or rows >= BLOCKDIAG_FROM_ROWS):
        return "block-diagonal"
    return "elementwise" if rows == 1 else "product"


def auto_segmented(op: str, rows: int) -> bool:
    """Whether the automatic (CUDA) choice segments ``op`` (``"row_dots"`` or ``"sub_rows"``) on ``rows`` rows:
    the faster of the two forms as measured (:data:`SEGMENTED_DOT_ROWS`)."""
    if op == "row_dots":
        return SEGMENTED_DOT_ROWS[0] <= rows < SEGMENTED_DOT_ROWS[1]
    if op == "sub_rows":
        return rows == 1
    raise ValueError(f"op must be 'row_dots' or 'sub_rows', got {op!r}")


def _count(seg: int, columns: int) -> int:
    return seg or segment_count(columns)


def _fused_bmm(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.bmm(X, Y, out_dtype=torch.float32)


def _float32_bmm(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    # half types without a fused kernel: float32 copies of the views (the caller's slices bound their size);
    # products of half values are exact in float32, so this is the fused kernel's arithmetic
    return torch.bmm(X.float(), Y.float())


def _native_sub_bmm(out: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> None:
    # on CUDA, half types too: cuBLAS accumulates in float32 and forms ``out - X Y`` in float32 before its one
    # rounding to ``out``'s type (compute type 32F), so ``w`` is read and written once, no float32 scratch
    out.baddbmm_(X, Y, alpha=-1)


def _float32_sub_bmm(out: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> None:
    out.copy_(torch.baddbmm(out.float(), X.float(), Y.float(), alpha=-1))


def _row_dot(x: torch.Tensor, y: torch.Tensor, seg: int | None) -> torch.Tensor:
    """``x . y`` of two contiguous slices in :func:`accumulation_dtype` (0-d, on their device)."""
    if x.dtype not in HALF_TYPES:
        if seg is None:
            return x @ y
        return segmented_dots(x[None], y, _count(seg, y.shape[0]), torch.bmm)[0]
    if _fused_half(y):
        if seg is not None and _HAS_BMM_OUT_DTYPE:
            return segmented_dots(x[None], y, _count(seg, y.shape[0]), _fused_bmm)[0]
        return torch.mm(x[None], y[:, None], out_dtype=torch.float32)[0, 0]
    slices = _column_slices(y.shape[0], scratch_columns(1, y.device))  # float32 copies a slice at a time
    if seg is not None:
        return sum(segmented_dots(x[None, a:b], y[a:b], _count(seg, b - a), _float32_bmm)[0] for a, b in slices)
    return sum(x[a:b].float() @ y[a:b].float() for a, b in slices)


def _long_row_dots(B: torch.Tensor, w: torch.Tensor, seg: int | None) -> torch.Tensor:
    d = w.shape[0]
    return torch.stack([sum(_row_dot(B[i, a:b], w[a:b], seg) for a, b in _column_slices(d))
                        for i in range(B.shape[0])])


def _long_sub_rows(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    c = c.to(device=w.device, dtype=accumulation_dtype(w.dtype))
    for a, b in _column_slices(w.shape[0]):
        acc = torch.zeros(b - a, dtype=c.dtype, device=w.device)
        for i in range(B.shape[0]):
            acc.addcmul_(B[i, a:b], c[i])  # the 0-d coefficient stays on the device: no host synchronization
        w[a:b].sub_(acc)
    return w


def _fused_half(w: torch.Tensor) -> bool:
    # CUDA matrix products take half inputs and give float32 results directly (``out_dtype``): one kernel
    # reading the basis once, where float32 slices cost a conversion pass and a launch per slice (at 124M
    # parameters the sliced path spent a third of a bf16 Lanczos run outside its HVPs)
    return w.device.type == "cuda" and _HAS_OUT_DTYPE


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


# float32 host operands up to this many entries take one product and a pairwise sum (a 2 x 1000 product: 3 us
# against 38 us through the chunked pass, whose Python overhead is per call)
SMALL_HOST_PRODUCT = 1 << 18


def row_dots(B: torch.Tensor, w: torch.Tensor, *, segments: int | None = None) -> torch.Tensor:
    """``B @ w`` for rows ``B`` ``(n, d)`` and ``w`` ``(d,)`` in :func:`accumulation_dtype`.

    On CUDA one strided-batched product over segments of the columns (:mod:`.segmented`; half types fused with
    float32 accumulation), which reads at memory speed for any ``n`` where a plain ``(n x d) @ (d x 1)`` product
    does not while ``n`` is small; elsewhere one matrix-vector product (half and float32 types on the CPU: float32
    products over column chunks, half types converted into reusable scratch, each chunk summed pairwise and the
    chunks in float64, :func:`.host_arith.host_dots`; never a full float32 copy). ``segments`` forces that many
    segments per column slice on any device (default :data:`SEGMENTS`). Columns go in slices of at most
    ``PRODUCT_COLUMNS`` and rows farther apart than ``LD_LIMIT`` one at a time (BLAS sizes are 32-bit). Cost: one
    read of ``B`` and ``w``, no matvec. Error: a float sum of ``d`` products in the accumulation dtype (unit
    roundoff ``u``): at most ``d u sum_j |B_ij w_j|`` per entry where summed in order (float64 on the CPU; CUDA's
    reductions sum in a tree, ``log2(d) u`` in practice), ``log2(columns) u`` times it on the CPU's chunks."""
    seg = _segments(B, w, segments)
    if seg is None and w.dtype != torch.float64 and B.dim() == 2 and is_host(B, w):
        if B.dtype == w.dtype == torch.float32 and B.numel() <= SMALL_HOST_PRODUCT:
            return chunk_dot(B, w)  # pairwise, as below, without the chunk loop's overhead
        # float32 products over chunks (half types converted into reusable scratch: float32 copies of slices
        # were fresh allocations converted on one thread) summed pairwise (:func:`.host_arith.chunk_dot`: a
        # matrix-vector product sums in order, 1e-5-5e-4 off on vectors with a few large entries)
        return host_dots(B, w).to(torch.float32)
    if _long_rows(B):
        # one row at a time: a single row reads fastest unsegmented (0.46 against 0.64 ms on the H200)
        return _long_row_dots(B, w, None if seg == 0 else seg)
    if seg == 0 and not auto_segmented("row_dots", B.shape[0]):
        seg = None
    d = w.shape[0]
    if w.dtype not in HALF_TYPES:
        width, bmm, plain = PRODUCT_COLUMNS, torch.bmm, torch.mv
    elif _fused_half(w):
        width, bmm = PRODUCT_COLUMNS, _fused_bmm
        seg = seg if _HAS_BMM_OUT_DTYPE else None  # torch.mm has out_dtype, torch.bmm not: the plain product

        def plain(X, y):
            return torch.mm(X, y[:, None], out_dtype=torch.float32)[:, 0]
    else:
        width, bmm = scratch_columns(B.shape[0], w.device), _float32_bmm

        def plain(X, y):
            return X.float() @ y.float()
    if seg is None:
        return _sum([plain(B[:, a:b], w[a:b]) for a, b in _column_slices(d, width)])
    return _sum([segmented_dots(B[:, a:b], w[a:b], _count(seg, b - a), bmm) for a, b in _column_slices(d, width)])


def _blocks(B: torch.Tensor, w: torch.Tensor, seg: int | None, blocks: int | None) -> int | None:
    """Blocks per row of the block-diagonal update, or None for the other paths: a forced count where the rows'
    layout allows it, else on CUDA (``seg == 0``) the count of :func:`.blockdiag.block_count` where
    :func:`sub_rows_kernel` says so."""
    forced = BLOCKS if blocks is None else blocks
    if forced is not None and (not isinstance(forced, int) or isinstance(forced, bool) or forced < 0):
        raise ConfigurationError(f"blocks must be a non-negative integer or None, got {forced!r}")
    if forced == 0 or B.dim() != 2 or w.dim() != 1 or B.shape[1] != w.shape[0]:
        return None
    if w.device.type == "cuda" and w.dtype == torch.float32 and _tf32_matmul():
        return None  # the GEMM would round float32 inputs to TF32, where the matrix-vector product does not
    n, m = B.shape
    if forced is not None:
        k = forced
    elif seg == 0 and sub_rows_kernel(n, w.dtype) == "block-diagonal":
        k = block_count(m, LD_LIMIT)
        if k is None:
            return None  # no admissible count divides the row length: the fused product
    else:
        return None
    if not blockdiag_layout(B, w, k) or m // k > LD_LIMIT:
        return None
    return k


def _native_sub_mm(out: torch.Tensor, C: torch.Tensor, Y: torch.Tensor) -> None:
    # float32 and float64: the GEMM forms ``out - C Y`` in its own type, one rounding, no scratch
    out.addmm_(C, Y, alpha=-1)


def _half_sub_mm(out: torch.Tensor, C: torch.Tensor, Y: torch.Tensor) -> None:
    # half types: ``C Y`` accumulated and returned in float32, subtracted in float32, rounded once. An in-place
    # half ``addmm_`` rounds ``C Y`` to the half type before adding ``out`` (torch 2.11 on an H200: 44-671 times
    # the one-rounding bound, benchmarks/results/cuda_rounding_r34_h200.json)
    out.sub_(torch.mm(C, Y, out_dtype=torch.float32))


def _float32_sub_mm(out: torch.Tensor, C: torch.Tensor, Y: torch.Tensor) -> None:
    out.copy_(torch.addmm(out.float(), C, Y.float(), alpha=-1))


def _blockdiag_sub_rows(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor, blocks: int) -> torch.Tensor:
    # half types accumulate in float32 through scratch of at most HALF_CHUNK_ELEMENTS entries: the product's
    # float32 result on CUDA, float32 copies of column windows elsewhere (CPU half products need not accumulate
    # in float32), so the windows bound the scratch
    c = c.to(device=w.device, dtype=w.dtype)  # the coefficients rounded to w's type, as on the fused paths
    if w.dtype not in HALF_TYPES:
        blockdiag_sub(w, c, B, blocks, _native_sub_mm, PRODUCT_COLUMNS)
    elif _fused_half(w):
        blockdiag_sub(w, c, B, blocks, _half_sub_mm, max(1, HALF_CHUNK_ELEMENTS // blocks))
    else:
        width = scratch_columns(blocks * (B.shape[0] + 2), w.device)
        blockdiag_sub(w, c.float(), B, blocks, _float32_sub_mm, width)
    return w


def sub_rows(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor, *, segments: int | None = None,
             blocks: int | None = None) -> torch.Tensor:
    """``w - c @ B`` written into ``w`` (no temporary of length d; half types accumulate in float32).

    On CUDA, where :func:`sub_rows_kernel` says so (half types, 2-22 rows and 300 or more, as measured),
    block-diagonal GEMMs (:mod:`.blockdiag`) on views of ``w`` and ``B`` with float32 results in scratch of at
    most :data:`HALF_CHUNK_ELEMENTS` entries, for rows back to back whose length one of 16-64 blocks divides
    (blocks of at most ``LD_LIMIT`` entries); else one
    strided-batched update over segments of the columns (:mod:`.segmented`) for one row (a single fused
    elementwise pass), or the fused product (one float32 d-vector of scratch for half types); elsewhere a
    matrix-vector update (half types on the CPU: float32 over column chunks in reusable scratch,
    :func:`.host_arith.host_sub`). ``segments`` as in :func:`row_dots`;
    ``blocks`` (default :data:`BLOCKS`) forces the block-diagonal update with that many blocks per row on any
    device where the layout allows it (a single row, or rows back to back with ``blocks`` dividing their
    length; the other paths otherwise), 0 turns it off.
    Cost: one read of ``B``, no matvec. Error: per entry a float32 (float64 for float64) sum of the ``n``
    products and ``w_j``, then one rounding to ``w``'s type. On the fused half paths (CUDA, or forced
    segments or blocks) the coefficients go in rounded to ``w``'s type: after the three-term step they are
    rounding-sized, so their own rounding is second order; where they are not (a first pass), a second pass
    follows.
    """
    seg = _segments(B, w, segments)
    k = _blocks(B, w, seg, blocks)
    if k is not None:
        return _blockdiag_sub_rows(w, c, B, k)
    if seg == 0 and not auto_segmented("sub_rows", B.shape[0]):
        seg = None
    if seg is None and w.dtype in HALF_TYPES and B.dim() == 2 and is_host(B, w):
        return host_sub(w, c, B)  # chunked through reusable float32 scratch, as row_dots
    if _long_rows(B):
        return _long_sub_rows(w, c, B)
    half = w.dtype in HALF_TYPES
    if seg is not None:
        c = c.to(device=w.device, dtype=w.dtype)
        if B.shape[0] == 1:
            # one row: an elementwise w - c B, computed in float32 for half types and rounded once, as the
            # product would; at the speed of a copy, where a product with one row ran at 74 GB/s on an H200
            return w.addcmul_(B[0], c[0], value=-1)
        native = not half or w.device.type == "cuda"
        width = PRODUCT_COLUMNS if native else scratch_columns(B.shape[0], w.device)
        update = _native_sub_bmm if native else _float32_sub_bmm
        for a, b in _column_slices(w.shape[0], width):
            segmented_sub(w[a:b], c, B[:, a:b], _count(seg, b - a), update)
        return w
    if not half:
        c = c.to(w.dtype)
        for a, b in _column_slices(w.shape[0]):
            w[a:b].addmv_(B[:, a:b].T, c, alpha=-1)
        return w
    if _fused_half(w):
        # c @ B accumulated in float32 and subtracted in float32 (one float32 d-vector of scratch), one
        # rounding to w's type
        c = c.to(w.dtype)[None]
        for a, b in _column_slices(w.shape[0]):
            w[a:b].sub_(torch.mm(c, B[:, a:b], out_dtype=torch.float32)[0])
        return w
    step = scratch_columns(B.shape[0], w.device)
    for s in range(0, w.shape[0], step):
        w[s : s + step] = w[s : s + step].float() - c @ B[:, s : s + step].float()
    return w


def vector_norm(w: torch.Tensor) -> torch.Tensor:
    """``||w||`` as a 0-d tensor on ``w``'s device in :func:`accumulation_dtype` (no host synchronization)."""
    if is_host(w) and w.dtype == torch.float32 and w.numel() <= SMALL_HOST_PRODUCT:
        return chunk_dot(w, w).sqrt()  # pairwise, without the chunked pass's per-call overhead
    if is_host(w) and w.dtype != torch.float64:
        # the CPU's reduction with dtype=float32 converts a half vector whole first (a fresh float32 d-vector,
        # one thread), and its float32 norm sums the squares one after another: 3.6e-4 relative on a Gaussian of
        # 5e7 entries, which Lanczos read as its matvec's asymmetry. Chunks through reusable scratch instead,
        # each a pairwise sum, the chunks summed in float64 (host_arith.lanczos_pass)
        return host_norm_sq(w).sqrt().to(accumulation_dtype(w.dtype))
    if w.dtype not in HALF_TYPES:
        return torch.linalg.vector_norm(w)
    # float32 accumulation read straight from the half values (the reduction casts as it reads): no float32
    # copy and one kernel per slice of PRODUCT_COLUMNS, where float32 copies of 2^24-element slices cost eight
    # launches and a conversion pass per norm at 124M parameters
    parts = [torch.linalg.vector_norm(w[a:b], dtype=torch.float32) for a, b in _column_slices(w.shape[0])]
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: exactly ``torch.isfinite(t).all()``, at the cost of one sum.

    A NaN or an infinity makes the sum non-finite, so a finite sum proves every entry finite; only a
    non-finite sum (a bad entry, or finite entries whose sum overflows) pays for the entrywise test. The
    entrywise test writes a boolean copy of ``t`` and reduces it, 10-45x a sum on the CPU, and this check runs
    on every HVP's output. One host synchronization, as before. Cost: one read of ``t``, no HVP.
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ConfigurationError(f"dim must be a positive integer, got {dim!r}")


def apply_rows(matvec: Matvec, V: torch.Tensor, batch: int) -> torch.Tensor:
    """``matvec`` on the rows of ``V``, ``batch`` rows per call."""
    return torch.cat([matvec(V[s : s + batch]).reshape(-1, V.shape[1]) for s in range(0, V.shape[0], batch)])


# Whether a matvec takes ``out``, per function: a bound method is keyed by its function (``land.hvp`` is a new
# bound method at every attribute access, its signature the same), anything else by itself; weak keys, so a
# matvec's entry goes with it.
_TAKES_OUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def takes_out(matvec: Callable) -> bool:
    """Whether ``matvec`` has a parameter named ``out`` that can be passed by keyword (``**kwargs`` alone does
    not count: a wrapper that forwards them may reach a matvec without ``out``). Read once per callable with
    :func:`inspect.signature` and cached; a callable whose signature cannot be read counts as without."""
    key = getattr(matvec, "__func__", matvec)
    try:
        return _TAKES_OUT[key]
    except (KeyError, TypeError):
        pass
    try:
        param = inspect.signature(matvec).parameters.get("out")
    except (TypeError, ValueError):
        param = None
    found = param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)
    try:
        _TAKES_OUT[key] = found
    except TypeError:
        pass  # not weakly referable: read again at the next call
    return found


def matvec_into(matvec: Callable, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``matvec(v)`` written into ``out``; always returns ``out``.

    A matvec that takes ``out`` (:func:`takes_out`, e.g. ``Landscape.hvp``) is called as ``matvec(v, out=out)``
    and writes there itself: no product-sized allocation of its own. Any other (a plain ``lambda v: A @ v``)
    is called as ``matvec(v)`` and its fresh product copied into ``out`` (one pass over ``out``, converted to
    ``out``'s dtype): the same values either way, and the caller's buffer holds them in both cases. A product
    of another shape than ``out`` raises ConfigurationError. Cost: one matvec (``k`` for a ``(k, d)`` block).
    """
    if takes_out(matvec):
        res = matvec(v, out=out)
        if res is out:
            return out
    else:
        res = matvec(v)
    if not isinstance(res, torch.Tensor) or res.shape != out.shape:
        got = tuple(res.shape) if isinstance(res, torch.Tensor) else type(res).__name__
        raise ConfigurationError(f"the matvec returned {got} for a product written into a buffer of shape "
                                 f"{tuple(out.shape)}; it must return the product of v's shape")
    return out.copy_(res)
