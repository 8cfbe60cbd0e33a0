"""Gaussian vectors in host memory whose entries are drawn on an accelerator.

In the host-vector mode (:mod:`geomprobe.engine.host_stream`) a Lanczos start vector of a 1B-parameter model is
1.1e9 entries in host memory. Drawn on the CPU it took 3.4 s on an H200's 16-core host (threads, each a piece
of :class:`~.space.ShardedSpace`'s stream: benchmarks/RESULTS.md section 6, sixteenth round), about a product's
time, before the first product could start; a normal draw on the GPU takes milliseconds. Here the entries are
drawn on the accelerator a piece at a time (:data:`DRAW_PIECE` entries, 64 MB of float32 device memory and
its square, nothing the memory plan needs to count beside an HVP's graphs), scaled there when a unit vector is asked
for (its norm from a first pass over the same stream, which costs one more draw and no copy), and copied into
the host vector through two reused page-locked buffers, so the device draws and copies the next piece while
the host copies the last one out: the host writes the vector once.

The values come from :func:`~.vectors.device_generator` of the caller's generator on the accelerator: the
same for one seed on devices of one kind, and not the values a CPU draw of the same seed gives (a CPU-only
machine draws that start instead). Half types are drawn in float32 and rounded, as :func:`~.vectors.gaussian`
does.
"""

from __future__ import annotations

import math

import torch

from .vectors import HALF_TYPES, device_generator

__all__ = ["DRAW_PIECE", "drawn_on_device", "draws_elsewhere"]

# entries per piece: 64 MB of float32 on the device and 2 x 32-64 MB of page-locked staging on the host, whose
# allocation (~0.6 s per GB, once: torch caches page-locked blocks) stays small; ~70 pieces for a 1.1B model
DRAW_PIECE = 1 << 24


def draws_elsewhere(device, draw_device) -> bool:
    """Whether a vector living on ``device`` is drawn on ``draw_device`` instead: a host vector (``device`` the
    CPU) whose draws go to an accelerator that is present."""
    if draw_device is None:
        return False
    here, there = torch.device("cpu" if device is None else device), torch.device(draw_device)
    return here.type == "cpu" and there.type == "cuda" and torch.cuda.is_available()


def drawn_on_device(dim: int, generator: torch.Generator, dtype: torch.dtype, draw_device,
                    *, out: torch.Tensor | None = None, unit: bool = False, piece: int | None = None) -> torch.Tensor:
    """A standard normal vector of ``dim`` entries in host memory (``out`` when given: a ``(dim,)`` host tensor of
    ``dtype``, written once), its entries drawn on ``draw_device`` from one seed drawn from ``generator``;
    ``unit=True``: divided by its norm (of the values as stored in ``dtype``; the quotient taken on the device
    in float32, float64 for float64 vectors, and rounded once).

    Cost: no matvec; one (two with ``unit``) draws of ``dim`` normals on the device, ``dim`` entries copied to
    the host; device memory one piece of ``piece`` (default :data:`DRAW_PIECE`) entries in float32 (and its
    rounding for half types), host memory two page-locked pieces besides ``out``. Error of the unit vector's norm: the float32 sum of a piece's squares
    (pairwise, ``log2(piece) u`` relative), the pieces added in float64, and one rounding per entry.
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if out is None:
        out = torch.empty(dim, dtype=dtype)
    elif out.shape != (dim,) or out.dtype != dtype or out.device.type != "cpu":
        raise ValueError(f"out must be a ({dim},) host tensor of {dtype}, got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}")
    dev = torch.device(draw_device)
    seed = int(device_generator(generator, dev).initial_seed())
    draw_type = torch.float32 if dtype in HALF_TYPES else dtype
    piece = max(1, min(int(DRAW_PIECE if piece is None else piece), dim))

    def pieces():
        g = torch.Generator(device=dev).manual_seed(seed)  # the same stream on every pass
        for s in range(0, dim, piece):
            n = min(piece, dim - s)
            x = torch.randn(n, generator=g, dtype=draw_type, device=dev)
            if draw_type != dtype:
                x = x.to(dtype)
            yield s, n, x
            del x  # the consumer has dropped its reference too: the next piece may take this one's memory

    scale = 1.0
    if unit:
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for _, _, x in pieces():
            # the norm read as the values are stored, accumulated in draw_type with no squared copy
            sq += torch.linalg.vector_norm(x, dtype=draw_type).to(torch.float64).square()
            del x  # before the next piece is drawn: one piece on the device at a time
        norm = math.sqrt(float(sq))
        if not math.isfinite(norm) or norm == 0:
            raise FloatingPointError("the drawn vector's norm is zero or not finite")
        scale = 1.0 / norm
    staging, pin = _staging(piece, dtype, dev.type == "cuda")
    pending = None  # (event, buffer, start, length): a piece on its way to the host
    for k, (s, n, x) in enumerate(pieces()):
        if unit:
            x = (x if x.dtype == draw_type else x.to(draw_type)).mul_(scale).to(dtype)
        buf = staging[k % 2]  # its last piece (k - 2) was copied out at step k - 1
        buf[:n].copy_(x, non_blocking=pin)
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record()
        del x  # the copy is queued on the stream that frees it: the next draw may reuse its memory
        if pending is not None:
            _land(out, *pending)
        pending = (event, buf, s, n)
    if pending is not None:
        _land(out, *pending)
    return out


def _staging(piece: int, dtype: torch.dtype, pin: bool) -> tuple[list[torch.Tensor], bool]:
    """Two host buffers of ``piece`` entries, page-locked when ``pin`` and the driver grants it (else pageable:
    the copies then wait, the values are the same); and whether they are page-locked."""
    if pin:
        try:
            return [torch.empty(piece, dtype=dtype, pin_memory=True) for _ in range(2)], True
        except RuntimeError:  # the driver refused page-locked memory
            pass
    return [torch.empty(piece, dtype=dtype) for _ in range(2)], False


def _land(out: torch.Tensor, event, buf: torch.Tensor, s: int, n: int) -> None:
    if event is not None:
        event.synchronize()
    out[s : s + n].copy_(buf[:n])
