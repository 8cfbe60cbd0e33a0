"""The vector space a Krylov kernel works in: how its vectors are held, how inner products and norms are
taken, and how random vectors are drawn.

:class:`VectorSpace` is the plain case: every vector is held whole by this process (what the kernels did
before there was a choice). :class:`ShardedSpace` holds a *slice* of each vector: the concatenation of a few
ranges ``[start, stop)`` of the global flat vector of length ``dim`` (the parameter shards of a model sharded
across ranks). Inner products and norms are local partial sums completed by a ``sum_`` callable the caller
supplies (an all-reduce over the ranks that hold the other slices), so the kernels stay free of any
communication library and every rank obtains the same scalars, bit for bit.

Random vectors are defined on the *global* vector, so that a sharded run draws the same vector whatever the
world size: the global vector is cut into consecutive pieces of ``RANDOM_CHUNK`` elements, piece ``c`` drawn
from its own generator seeded by ``(seed, c)``. A rank draws only the pieces that overlap its ranges and
keeps the overlap, so its memory and work are ``O(d_local + RANDOM_CHUNK * ranges)``, never ``O(d)``. Drawing
the whole global block and slicing it would be simpler but costs a full d-vector per rank, which is what a
sharded model cannot afford. The stream of a sharded space therefore differs from the plain space's single
draw; it is the same for every layout of one ``dim`` (a world-size-1 :class:`ShardedSpace` draws the global
vector itself).

>>> import torch
>>> g = lambda: torch.Generator().manual_seed(5)
>>> whole = ShardedSpace(10, [(0, 10)]).gaussian(g(), torch.float64)
>>> part = ShardedSpace(10, [(2, 4), (7, 10)]).gaussian(g(), torch.float64)
>>> torch.equal(part, torch.cat([whole[2:4], whole[7:10]]))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ConfigurationError
from .vectors import HALF_TYPES, gaussian, rademacher, row_dots, sub_rows, vector_norm

__all__ = ["PARALLEL_DRAW_FROM", "RANDOM_CHUNK", "ShardedSpace", "VectorSpace", "space_of"]

# Elements per independently seeded piece of a sharded random vector: large enough that the per-piece
# generator set-up is negligible, small enough that the pieces a rank draws beyond its own ranges are cheap.
RANDOM_CHUNK = 1 << 16

# elements per copy inside a drawing thread: below torch's parallel grain (32768), so the copy runs serially
_SERIAL_COPY = 1 << 14

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant spreading piece indices over the seed space

# From this many entries on, a whole vector in host memory is drawn as the world-size-1 sharded space draws it:
# in seeded pieces by a pool of threads. A CPU normal draw runs on one thread: ~5 s for the 1.1e9-entry start
# vector of a 1B model in host-vector mode, a seventh of its three-step probe (benchmarks/RESULTS.md §6).
# Below it the plain single draw stays (small vectors, and every test's values).
PARALLEL_DRAW_FROM = 1 << 25


class VectorSpace:
    """Flat vectors of length ``dim`` held whole by this process (no communication)."""

    sharded = False

    def __init__(self, dim: int):
        if not isinstance(dim, int) or dim < 1:
            raise ConfigurationError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.local_dim = dim

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Complete partial sums ``t`` (inner products of slices) over the holders of the other slices."""
        return t

    def dots(self, B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``B @ w`` over the whole vectors (rows ``B`` ``(n, d_local)``, ``w`` ``(d_local,)``); one reduction."""
        return self.reduce(row_dots(B, w))

    def sub_rows(self, w: torch.Tensor, c: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``w - c @ B`` in place: coordinate-wise, so a slice needs no communication."""
        return sub_rows(w, c, B)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        """``||w||`` of the whole vector as a 0-d tensor in the accumulation dtype."""
        return vector_norm(w)

    def gaussian(self, generator: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
        """This process's part of a standard normal vector of length ``dim`` (one seed drawn from ``generator``).

        In host memory from :data:`PARALLEL_DRAW_FROM` entries on, with more than one torch thread: the
        pieces of :class:`ShardedSpace` drawn by a pool of threads (a stream of its own, reproducible per seed,
        the same whatever the number of threads); else one draw (:func:`~.vectors.gaussian`)."""
        if self._threaded_draw(device):
            return ShardedSpace(self.dim, [(0, self.dim)]).gaussian(generator, dtype, device)
        return gaussian(self.dim, generator, dtype, device)

    def _threaded_draw(self, device) -> bool:
        on_host = device is None or torch.device(device).type == "cpu"
        return on_host and self.dim >= PARALLEL_DRAW_FROM and torch.get_num_threads() > 1  # (sharded: overridden)

    def rademacher(self, generator: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
        """This process's part of a +-1 vector of length ``dim`` (one seed drawn from ``generator``)."""
        return rademacher(self.dim, generator, dtype, device)


class ShardedSpace(VectorSpace):
    """Slices of global vectors of length ``dim``: this process holds ``ranges`` (ascending, disjoint
    ``(start, stop)`` pairs of the global flat index), concatenated in that order.

    ``sum_`` sums a small tensor over every holder in place and returns it (an all-reduce); the identity when
    this process holds everything. Cost per inner product or norm: one ``sum_`` of ``n`` scalars.
    """

    sharded = True

    def __init__(self, dim: int, ranges: Sequence[tuple[int, int]], sum_: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(dim)
        last = 0
        for a, b in ranges:
            if not (isinstance(a, int) and isinstance(b, int)) or a < last or b < a or b > dim:
                raise ConfigurationError(
                    f"ranges must be ascending, disjoint (start, stop) pairs within [0, {dim}], got {list(ranges)!r}")
            last = b
        self.ranges = [(a, b) for a, b in ranges if b > a]
        self.local_dim = sum(b - a for a, b in self.ranges)
        self._sum = sum_

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._sum is None:
            return t
        # the reduction runs in float64 whatever the vectors' type: the scalars are few, and partial sums of
        # half-precision slices lose nothing more on the way
        out = t.to(torch.float64).contiguous()
        self._sum(out)
        return out.to(t.dtype)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        local = row_dots(w[None], w)  # the squared norm of the slice, in the accumulation dtype
        return self.reduce(local)[0].clamp_min(0).sqrt()

    def _draw(self, generator: torch.Generator, dtype: torch.dtype, device, fill: Callable,
              parallel: bool = False) -> torch.Tensor:
        # one draw from the caller's generator per vector, as in the plain space
        base = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
        dev = torch.device("cpu") if device is None else torch.device(device)
        out = torch.empty(self.local_dim, dtype=dtype, device=dev)
        if parallel and dev.type == "cpu" and torch.get_num_threads() > 1:
            return self._draw_threads(base, out, fill)
        pos = 0
        cached: tuple[int, torch.Tensor] | None = None  # neighbouring ranges often share a piece
        for a, b in self.ranges:
            for c in range(a // RANDOM_CHUNK, (b - 1) // RANDOM_CHUNK + 1):
                if cached is None or cached[0] != c:
                    g = torch.Generator(device=dev).manual_seed((base + c * _GOLDEN) % (2**63 - 1))
                    n = min(RANDOM_CHUNK, self.dim - c * RANDOM_CHUNK)
                    cached = (c, fill(n, g, dev))
                lo, hi = max(a, c * RANDOM_CHUNK), min(b, (c + 1) * RANDOM_CHUNK)
                piece = cached[1][lo - c * RANDOM_CHUNK : hi - c * RANDOM_CHUNK]
                out[pos : pos + hi - lo] = piece.to(dtype)
                pos += hi - lo
        return out

    def _draw_threads(self, base: int, out: torch.Tensor, fill: Callable) -> torch.Tensor:
        """The CPU draw with its pieces drawn and copied into ``out`` by a pool of threads (a piece's generator
        and draw depend on its index only, and the pieces fill disjoint parts of ``out``, so the values are
        the serial draw's). A CPU normal draw is single-threaded: at 3e9 entries of a 7B model's shard the
        serial loop takes ~14 s (0.23 s at 5e7 here) before the first Lanczos step; torch releases the
        interpreter lock while drawing, so ``torch.get_num_threads()`` threads draw at once. Each thread
        copies in slices below torch's parallel grain, so no copy starts a thread team of its own inside a
        pool thread."""
        spans: dict[int, list[tuple[int, int, int]]] = {}
        pos = 0
        for a, b in self.ranges:
            for c in range(a // RANDOM_CHUNK, (b - 1) // RANDOM_CHUNK + 1):
                lo, hi = max(a, c * RANDOM_CHUNK), min(b, (c + 1) * RANDOM_CHUNK)
                spans.setdefault(c, []).append((lo, hi, pos))
                pos += hi - lo

        def piece(c: int) -> None:
            g = torch.Generator().manual_seed((base + c * _GOLDEN) % (2**63 - 1))
            values = fill(min(RANDOM_CHUNK, self.dim - c * RANDOM_CHUNK), g, out.device)
            for lo, hi, at in spans[c]:
                for s in range(lo, hi, _SERIAL_COPY):
                    e = min(hi, s + _SERIAL_COPY)
                    out[at + s - lo : at + e - lo] = values[s - c * RANDOM_CHUNK : e - c * RANDOM_CHUNK]

        with ThreadPoolExecutor(min(torch.get_num_threads(), len(spans))) as pool:
            for _ in pool.map(piece, spans):
                pass
        return out

    def gaussian(self, generator: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
        # half types: drawn in float32 and rounded, as the plain space does
        draw = torch.float32 if dtype in HALF_TYPES else dtype
        return self._draw(generator, dtype, device, lambda n, g, dev: torch.randn(n, generator=g, dtype=draw, device=dev),
                          parallel=True)

    def rademacher(self, generator: torch.Generator, dtype: torch.dtype, device=None) -> torch.Tensor:
        return self._draw(generator, dtype, device,
                          lambda n, g, dev: torch.empty(n, dtype=dtype, device=dev).random_(0, 2, generator=g).mul_(2).sub_(1))


def space_of(dim: int, space: VectorSpace | None) -> VectorSpace:
    """``space`` checked against ``dim``, or the plain space of ``dim``."""
    if space is None:
        return VectorSpace(dim)
    if space.dim != dim:
        raise ConfigurationError(f"the vector space has dimension {space.dim}, the kernel was asked for {dim}")
    return space

