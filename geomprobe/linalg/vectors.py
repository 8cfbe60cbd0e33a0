"""What every kernel shares: the matvec type, seeded random vectors (Rademacher, Gaussian) drawn on the target
device without touching the global RNG, applying a matvec to the rows of a block, and inner products that
accumulate in float32 for half-precision vectors.

A *matvec* maps a flat vector ``(d,)`` to ``H v`` and a block ``(k, d)`` to ``(H V^T)^T`` (row-wise
products). Randomness comes from an explicit CPU ``torch.Generator``: each draw takes one 63-bit seed from it
and seeds a generator on the target device, so the vectors are drawn where they are used (no host copy of a
d-vector), the same seed gives the same vectors on every rank of one device kind, and the CPU generator's
stream advances by exactly one number per draw."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigurationError

__all__ = [
    "Matvec", "accumulation_dtype", "all_finite", "apply_rows", "check_dim", "default_generator", "device_generator",
    "gaussian", "rademacher", "row_dots", "sub_rows", "vector_norm",
]


Matvec = Callable[[torch.Tensor], torch.Tensor]

HALF_TYPES = (torch.float16, torch.bfloat16)

# Half-precision products are accumulated in float32 a slice of columns at a time: this many float32 elements
# of scratch at most (64 MB), so no full-length float32 copy of a vector or a basis is ever made.
HALF_CHUNK_ELEMENTS = 1 << 24


def _probe_out_dtype() -> bool:
    try:  # torch.mm(..., out_dtype=) exists from torch 2.8 on (CUDA kernels only)
        torch.mm(torch.zeros(1, 1, device="meta", dtype=torch.bfloat16),
                 torch.zeros(1, 1, device="meta", dtype=torch.bfloat16), out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


_HAS_OUT_DTYPE = _probe_out_dtype()


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
    for s in range(0, flat.numel(), HALF_CHUNK_ELEMENTS):
        n = min(HALF_CHUNK_ELEMENTS, flat.numel() - s)
        flat[s : s + n] = torch.randn(n, generator=g, dtype=torch.float32, device=dev)
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 vectors, float32 for everything else (half types accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _column_chunk(rows: int) -> int:
    return max(1, HALF_CHUNK_ELEMENTS // max(rows, 1))


# Columns per matrix product: BLAS takes 32-bit sizes (a 7B model's shard on 2 GPUs has 3e9 entries, past 2^31),
# and the fused half path's float32 scratch is one slice, not a whole float32 d-vector (12 GB there).
PRODUCT_COLUMNS = 1 << 28


def _column_slices(d: int):
    return ((s, min(d, s + PRODUCT_COLUMNS)) for s in range(0, d, PRODUCT_COLUMNS))


# A matrix's rows farther apart than this cannot go to BLAS at all (its leading dimension is 32-bit too), so
# such rows are taken one at a time, each slice of a row being contiguous.
LD_LIMIT = 2**31 - 1


def _long_rows(B: torch.Tensor) -> bool:
    return B.dim() == 2 and B.shape[0] > 0 and B.stride(0) > LD_LIMIT


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x . y`` of two contiguous slices in :func:`accumulation_dtype` (0-d, on their device)."""
    if x.dtype not in HALF_TYPES:
        return x @ y
    if _fused_half(y):
        return torch.mm(x[None], y[:, None], out_dtype=torch.float32)[0, 0]
    return x.float() @ y.float()


def _long_row_dots(B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d = w.shape[0]
    return torch.stack([sum(_row_dot(B[i, a:b], w[a:b]) for a, b in _column_slices(d)) for i in range(B.shape[0])])


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


def row_dots(B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``B @ w`` for rows ``B`` ``(n, d)`` and ``w`` ``(d,)`` in :func:`accumulation_dtype` (one matrix-vector
    product; for half types, float32 accumulation: fused on CUDA, float32 products over column slices
    elsewhere, never a full float32 copy)."""
    if _long_rows(B):
        return _long_row_dots(B, w)
    if w.dtype not in HALF_TYPES:
        if w.shape[0] <= PRODUCT_COLUMNS:
            return B @ w
        return sum(B[:, a:b] @ w[a:b] for a, b in _column_slices(w.shape[0]))
    if _fused_half(w):
        return sum(torch.mm(B[:, a:b], w[a:b, None], out_dtype=torch.float32)[:, 0]
                   for a, b in _column_slices(w.shape[0]))
    acc = torch.zeros(B.shape[0], dtype=torch.float32, device=w.device)
    step = _column_chunk(B.shape[0])
    for s in range(0, w.shape[0], step):
        acc += B[:, s : s + step].float() @ w[s : s + step].float()
    return acc


def sub_rows(w: torch.Tensor, c: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``w - c @ B`` written into ``w`` (no temporary of length d; half types accumulate in float32)."""
    if _long_rows(B):
        return _long_sub_rows(w, c, B)
    if w.dtype not in HALF_TYPES:
        c = c.to(w.dtype)
        for a, b in _column_slices(w.shape[0]):
            w[a:b].addmv_(B[:, a:b].T, c, alpha=-1)
        return w
    if _fused_half(w):
        # c @ B accumulated in float32 and subtracted in float32 (one float32 d-vector of scratch), one
        # rounding to w's type. The coefficients go in rounded to w's type: after the three-term step they are
        # rounding-sized, so their own rounding is second order; where they are not (a first pass), a second
        # pass follows.
        c = c.to(w.dtype)[None]
        for a, b in _column_slices(w.shape[0]):
            w[a:b].sub_(torch.mm(c, B[:, a:b], out_dtype=torch.float32)[0])
        return w
    step = _column_chunk(B.shape[0])
    for s in range(0, w.shape[0], step):
        w[s : s + step] = w[s : s + step].float() - c @ B[:, s : s + step].float()
    return w


def vector_norm(w: torch.Tensor) -> torch.Tensor:
    """``||w||`` as a 0-d tensor on ``w``'s device in :func:`accumulation_dtype` (no host synchronization)."""
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
