"""The Krylov basis of a Lanczos run: its vectors stored in fixed blocks (on the compute device or offloaded),
one expansion step against it, and the memory a run of a given basis size needs (the start vector and a run's
first basis: :mod:`.krylov_start`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import ConfigurationError
from .host_arith import host_rotate, host_round, lanczos_pass, row_groups
from .host_blocks import RowPrefetcher, advise_huge_pages, host_block, populate, populate_wanted, prefetch_wanted
from .lean_pass import lean_whole_step
from .lean_vectors import LeanVectors, lean_mode
from .pinned_blocks import PinnedAhead
from .pinned_memory import pinned_empty, warm
from .sketched_gram import warm_store
from .space import VectorSpace
from .vectors import (
    HALF_CHUNK_ELEMENTS,
    Matvec,
    accumulation_dtype,
    check_dim,
    forced_kernels,
    matvec_into,
    row_dots,
    scratch_columns,
    sub_rows,
    takes_out,
)

__all__ = [
    "LanczosBasis", "LanczosMemory", "host_vector", "krylov_step", "lanczos_memory_bytes", "orthogonalize_step",
]


def host_vector(dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized ``(dim,)`` host vector, page-locked where an accelerator is present (a matvec streaming
    through it copies into or out of it asynchronously), else pageable."""
    if torch.cuda.is_available():
        exact = pinned_empty((dim,), dtype)  # not rounded up to a power of two (pinned_memory.py)
        if exact is not None:
            return exact
        try:
            return torch.empty(dim, dtype=dtype, pin_memory=True)
        except RuntimeError:  # the driver refused page-locked memory: pageable memory holds the same
            pass
    return torch.empty(dim, dtype=dtype)


# DGKS criterion: a second Gram-Schmidt pass only when the first removed more than this share of the norm
# (the new vector was nearly in the span of the basis); after the three-term step that is rare.
REPASS = 1 / math.sqrt(2)


def krylov_step(matvec: Matvec, basis: LanczosBasis, cur: torch.Tensor, dim: int, dtype: torch.dtype,
                step: int, prev: torch.Tensor | None = None, beta_prev: float = 0.0, *, local: bool = False,
                extra: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One expansion of the Krylov basis: ``w = H v`` orthogonalized against every stored vector.

    ``local=True`` (with ``prev``; partial reorthogonalization, :mod:`.orthogonality`): the Gram-Schmidt pass
    runs against ``prev`` and ``v`` only, not the whole basis, and the coefficients returned are those two
    (``[prev^T H v, v^T H v]``); :func:`orthogonalize_step` adds the whole-basis pass when the estimate asks.
    Cost then: a few reads of three d-vectors whatever the basis's size (an offloaded basis is not touched).
    ``extra``: unit vectors on the compute device (converged Ritz vectors, selective orthogonalization) that
    the local pass also removes; their coefficients come first in those returned.

    With ``prev`` (the vector before ``v``, coupled to it by ``beta_prev``) the three-term step
    ``w - alpha v - beta_prev prev`` comes first and one Gram-Schmidt pass over the whole basis removes what
    rounding left (a second pass follows only when the first removed most of the norm, the DGKS criterion);
    without it (the first step, or the first after a restart, where ``v`` couples to every kept vector) two
    passes run (CGS2). Returns ``w`` (unnormalized, on the compute device), the coefficients ``V^T H v``
    (float64, host) and ``beta = ||w||``. One host synchronization: the coefficients and norms travel in one
    small tensor (a second only when the DGKS pass runs). A non-finite matvec shows in them (a NaN or inf
    entry of ``H v`` spreads to the coefficients or the norm), so it is caught without a pass of its own.
    ``dim`` is the global dimension; the vectors have the basis's length (a slice in a sharded space), and
    every inner product and norm goes through ``basis.space``.
    """
    space = basis.space
    lean = basis.lean_vectors
    owned = lean is not None and takes_out(matvec)
    if owned:
        # written into the lean basis's other device vector: the product's input and output are the only
        # d-vectors on the device while it runs (the output alone where the input is read from its row)
        out = lean.out_buffer(cur)
        row = basis.newest_row()
        w = matvec_into(matvec, lean.input_for(cur, row), out)
        basis.rows_readable()  # a streamed input's copy may have run beside the product: later reads wait for it
        if prev is not None and local:
            lean.refill(cur, row)  # for the three-term step (a whole-basis step's pass streams it, .lean_pass)
    elif basis.on_host and takes_out(matvec):
        # the product written into one buffer reused step after step: on the CPU a fresh 40 MB vector per
        # product paid its page faults every time (the step never keeps w: the basis gets w / beta)
        w = matvec_into(matvec, cur, basis.work_buffer())
    else:
        w = matvec(cur).reshape(basis.dim).to(basis.dtype)
    if not owned and (basis.offloaded or w.untyped_storage().data_ptr() in basis.storages(cur)):
        # w is updated in place below and, offloaded, becomes the next input: it must not be the matvec's
        # input, the basis, or a buffer the matvec writes again
        w = w.clone()
    whole_lean = lean is not None and prev is not None and not local  # one read of each row (.lean_pass)
    if prev is not None and prev.device != w.device and not whole_lean:
        basis.rows_readable()
        prev = prev.to(w.device, non_blocking=basis.pin)  # a lean basis's previous row, read after the product
    local = local and prev is not None
    if basis.on_host and not forced_kernels():
        return _host_step(w, basis, cur, prev, beta_prev, step, local, extra)
    if prev is None:
        if lean is not None:
            lean.give_back(cur)  # the passes stream its row with the others
        w, coeffs = basis.reorthogonalize(w, passes=2)
        before = None
    elif whole_lean:
        w, coeffs, before = lean_whole_step(basis, w, cur, beta_prev)
        prev = None
    else:
        alpha = space.dots(cur[None], w)
        w.sub_(prev, alpha=beta_prev)
        sub_rows(w, alpha, cur[None])
        before = space.norm(w)
        w, coeffs = _local_pass(w, space, prev, cur, extra) if local else basis.reorthogonalize(w, passes=1)
        coeffs[-1] += alpha[0]
        coeffs[-2] += beta_prev
    beta = space.norm(w)
    extra = [beta.reshape(1)] + ([before.reshape(1)] if before is not None else [])
    packed = torch.cat([coeffs] + [e.to(coeffs.dtype) for e in extra]).cpu().double()
    if not bool(torch.isfinite(packed).all()):
        raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")
    n = coeffs.shape[0]
    coeffs, beta_h = packed[:n], float(packed[n])
    if before is not None and beta_h < REPASS * float(packed[n + 1]):
        w, c2 = _local_pass(w, space, prev, cur, extra) if local else basis.reorthogonalize(w, passes=1)
        coeffs = coeffs + c2.cpu().double()
        beta_h = float(space.norm(w))
    if lean is not None:
        lean.give_back(cur)  # no caller reads it again: the next step's previous vector is its stored row
    return w, coeffs, beta_h


def _local_pass(w: torch.Tensor, space: VectorSpace, prev: torch.Tensor, cur: torch.Tensor,
                extra: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """One classical Gram-Schmidt pass of ``w`` against ``extra``, ``prev`` and ``cur`` only, in place; their
    coefficients in that order (``prev``'s and ``cur``'s last, as the whole-basis pass ends with them)."""
    rows = [*extra, prev, cur]
    c = torch.cat([space.dots(r[None], w) for r in rows])
    for i, r in enumerate(rows):
        sub_rows(w, c[i : i + 1], r[None])
    return w, c


def orthogonalize_step(basis: LanczosBasis, w: torch.Tensor, beta: float, step: int) -> tuple[torch.Tensor, float]:
    """The whole-basis Gram-Schmidt pass that partial reorthogonalization adds to a local step when its
    estimate asks (:class:`.orthogonality.OrthogonalityEstimate`): ``w`` (of norm ``beta``) against every
    stored vector, in place, a second pass when the first removed most of the norm (DGKS); returns ``w`` and
    its new norm. The coefficients are rounding-level corrections and are not added to ``T`` (which stays the
    three-term recurrence's). Cost: two reads of the basis (four with the second pass), no matvec."""
    space = basis.space
    if basis.on_host and not forced_kernels():
        groups = row_groups(list(basis._filled()))
        before = beta
        for _ in range(2):
            c = space.reduce(lanczos_pass(w, groups, dots=True)[0])
            nsq = space.reduce(lanczos_pass(w, groups, sub=c, norm=True)[1][None])
            _finite_or_raise(torch.cat([c, nsq]), step)
            beta = float(nsq[0].clamp_min(0).sqrt())
            if beta >= REPASS * before:
                break
            before = beta
        return w, beta
    before = beta
    for _ in range(2):
        w, _c = basis.reorthogonalize(w, passes=1)
        beta = float(space.norm(w))
        if not math.isfinite(beta):
            raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")
        if beta >= REPASS * before:
            break
        before = beta
    return w, beta


def _finite_or_raise(t: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")


def _host_step(w: torch.Tensor, basis: LanczosBasis, cur: torch.Tensor, prev: torch.Tensor | None,
               beta_prev: float, step: int, local: bool = False, extra: Sequence[torch.Tensor] = (),
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`krylov_step` after the matvec, for a basis and vectors in host memory: the same arithmetic in
    fused chunked passes (:func:`.host_arith.lanczos_pass`), so the basis is read as often as the
    algorithm needs and ``w`` is never copied.

    Three-term step (``prev`` given): ``alpha = v^T w`` (a read of ``v`` and ``w``), then one pass forming
    ``w - beta_prev prev - alpha v`` with the Gram-Schmidt coefficients ``c`` (one read of the basis, ``prev``
    and ``v`` among it), then one pass applying the coefficients with the norm after (a second read); the
    DGKS repass only when it is due, judged on the norm before the update taken as ``sqrt(beta^2 + ||c||^2)``
    (orthonormal rows) or, with ``extra`` rows, which are not orthogonal to ``prev`` and ``v``, swept in the
    first pass. Without ``prev`` (CGS2): the coefficients, then the first update with
    the second coefficients in the same pass (one group of rows; else two passes), then the second update
    with the norm: three reads of the basis instead of four. One reduction of the coefficients and norms per
    pass (a sharded space). The coefficients are float64 throughout. ``local``: the passes run over ``prev``
    and ``v`` alone (:func:`krylov_step`)."""
    space = basis.space
    groups = [*(y[None] for y in extra), prev[None], cur[None]] if local else row_groups(list(basis._filled()))
    before = None
    if prev is None:
        c1 = space.reduce(lanczos_pass(w, groups, dots=True)[0])
        if len(groups) == 1:
            c2 = space.reduce(lanczos_pass(w, groups, sub=c1, dots=True)[0])
        else:
            lanczos_pass(w, groups, sub=c1)
            c2 = space.reduce(lanczos_pass(w, groups, dots=True)[0])
        coeffs = c1 + c2
    else:
        alpha = float(space.reduce(lanczos_pass(w, [cur[None]], dots=True)[0])[0])  # a NaN shows at the end
        # kept Ritz vectors (``extra``) are not orthogonal to prev and v: there the norm before is swept
        c2, before_sq = lanczos_pass(w, groups, pre=[(prev, beta_prev), (cur, alpha)], dots=True, norm=bool(extra))
        if before_sq is None:
            c2 = space.reduce(c2)
        else:
            both = space.reduce(torch.cat([c2, before_sq[None]]))
            c2, before = both[:-1], float(both[-1].clamp_min(0).sqrt())
        coeffs = c2.clone()
        coeffs[-1] += alpha
        coeffs[-2] += beta_prev
    nsq = space.reduce(lanczos_pass(w, groups, sub=c2, norm=True)[1][None])
    _finite_or_raise(torch.cat([coeffs, nsq]), step)
    beta = float(nsq[0].clamp_min(0).sqrt())
    if prev is not None and before is None:
        # the norm before the update, for the DGKS test only: w - B^T c with c = B w and orthonormal rows B
        # has ||w||^2 = beta^2 + ||c||^2 (to the rows' orthogonality: eps for prev and v, which each step makes
        # orthogonal, ~sqrt(eps) for a semi-orthogonal whole basis, far inside the test's factor 1/sqrt(2));
        # a sweep of w for its own norm cost 1.5 ms of a 19 ms step at d = 1e7
        before = math.sqrt(max(float(nsq[0]), 0.0) + float(c2.square().sum()))
    if before is not None and beta < REPASS * before:
        c3 = space.reduce(lanczos_pass(w, groups, dots=True)[0])
        nsq = space.reduce(lanczos_pass(w, groups, sub=c3, norm=True)[1][None])
        coeffs = coeffs + c3
        beta = float(nsq[0].clamp_min(0).sqrt())
    return w, coeffs, beta


def warm_lean_rows(dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Start mapping, on a background thread, the page-locked block in which an offloaded or lean basis of
    ``dim``-vectors of ``dtype`` stores its first rows (:func:`.pinned_memory.warm`): a Landscape whose plan runs
    its Lanczos vectors lean calls it before building its graph, so the first probe's first row is ready when its
    run starts; and, where the run keeps sketches, its first sketch store's block and the sketch's kernels on the
    compute ``device`` (:func:`.sketched_gram.warm_store`). False where nothing starts (a small block, CUDA not in
    use, one pooled or warming already)."""
    store = warm_store(dim, dtype, device)
    row_bytes = dim * torch.empty(0, dtype=dtype).element_size()
    return warm(LanczosBasis.offloaded_block_rows(dim, dtype) * row_bytes) or store


class LanczosMemory(NamedTuple):
    """Bytes a Lanczos run holds: on the compute device and, with an offloaded basis, on the host."""

    device: int
    host: int


def lanczos_memory_bytes(dim: int, dtype: torch.dtype, max_basis: int, *, offloaded: bool = False) -> LanczosMemory:
    """The memory a Lanczos run of at most ``max_basis`` stored basis vectors needs beyond the matvec's own.

    The basis (``max_basis`` d-vectors in ``dtype``; without a cap the plain run stores one per step, in
    blocks of ``LanczosBasis.BLOCK``, so pass the step budget rounded up to a block), the new vector and its
    copy during a step (2 d-vectors; 2 more with an offloaded basis), and the float32 scratch of half-precision products or of a restart's
    rotation (``HALF_CHUNK_ELEMENTS`` float32 elements, twice). With ``offloaded=True`` the basis is on the
    host and the device holds ``LanczosBasis.STREAM`` of its vectors at a time.
    """
    check_dim(dim)
    if not isinstance(max_basis, int) or max_basis < 1:
        raise ConfigurationError(f"max_basis must be a positive integer, got {max_basis!r}")
    item = torch.empty(0, dtype=dtype).element_size()
    scratch = 2 * HALF_CHUNK_ELEMENTS * 4
    work = 2 * dim * item + min(scratch, 2 * 4 * dim * (max_basis + 1))
    if offloaded:  # the two newest vectors stay on the device for the three-term step
        work += 2 * dim * item
        return LanczosMemory(device=work + LanczosBasis.STREAM * dim * item, host=max_basis * dim * item)
    return LanczosMemory(device=work + max_basis * dim * item, host=0)


class LanczosBasis:
    """Lanczos vectors stored in fixed blocks: growing never copies (a doubling buffer would need the old and
    the new buffer at once, 3x the basis, which is what runs out first on a 1e8-parameter model).

    ``capacity`` caps the stored vectors (the last block is cut to fit); :meth:`rotate` replaces the basis by
    a few combinations of itself in place, which is how a thick restart stays within the cap.

    ``round_to``: the type of the matvec's vectors when the rows are kept in a wider one (a half-precision
    model's basis in host memory kept in float32, which the CPU reads without converting it: Lanczos'
    ``basis_dtype``). Every appended vector is rounded to ``round_to``'s values in place, so the row a product reads is
    exactly what the product's type holds: the Lanczos relation is the one a basis of ``round_to`` rows has,
    and the arithmetic between the products keeps float32 (no rounding of ``w`` to half precision per step).
    """

    BLOCK = 16
    PIN = True  # offloaded blocks page-locked where ``pin`` is not given (benchmarks: scale.py --pin)
    STREAM = 2  # basis vectors on the device at once when the basis is offloaded
    # Page-locked host blocks are allocated in one driver call each: 16 rows of a 1.1B-parameter model (35 GB in
    # bf16) failed with "CUDA error: out of memory" on an H200 host with 128 GB free, which killed the probe.
    # Offloaded blocks hold at most this many bytes (one row at least), and a refused pinned block falls back to
    # pageable memory (slower copies, same results).
    PIN_BLOCK_BYTES = 2**30

    def __init__(self, dim: int, dtype: torch.dtype, device, compute_device=None, capacity: int | None = None,
                 contiguous: bool = False, space: VectorSpace | None = None, pin: bool | None = None,
                 round_to: torch.dtype | None = None, lean: bool | str = False, rows_limit: int | None = None):
        # rows_limit: the most rows the run can store (its step limit), where no capacity caps them: no
        # page-locked block is allocated ahead beyond it
        # dim: the length of the stored vectors (this process's slice in a sharded space)
        self.dim, self.dtype, self.device = dim, dtype, device
        self.round_to = None if round_to is None or round_to == dtype else round_to
        self.space = space if space is not None else VectorSpace(dim)
        # one block of ``capacity`` rows, so that matrix() is a view: a basis handed back whole (fixed-length runs
        # of known length) must not be copied, which would hold it twice at the end of the run
        self.contiguous = contiguous and capacity is not None
        self.block = capacity if self.contiguous else self.BLOCK
        self.compute = compute_device if compute_device is not None else device
        # the compute device keeps the newest vector and the product's output only (or the output alone)
        self.lean_mode = lean_mode(lean)
        self.lean = self.lean_mode is not None
        self.offloaded = torch.device(self.compute) != torch.device(device) or self.lean
        # page-locked blocks cost time to allocate (exact-size ones 1.35 s for a 4.4 GB row, pooled for later
        # probes: pinned_memory.py) but stream twice as fast as pageable ones, whose first writes also stall the
        # step (GPT-2 124M/355M and the 1.1B Llama under the 1.5x plan, benchmarks/RESULTS.md section 6).
        pin = self.PIN if pin is None else pin
        self.pin = pin and self.offloaded and torch.device(device).type == "cpu" and torch.device(self.compute).type == "cuda"
        # basis and working vectors in host memory: the steps' arithmetic takes the chunked CPU passes
        self.on_host = not self.offloaded and torch.device(device).type == "cpu"
        if self.lean:
            self.STREAM = 1  # a whole-basis pass brings one row to the device at a time
        if self.offloaded and not self.contiguous:
            self.block = self.offloaded_block_rows(dim, dtype)
        self.pin_refused: str | None = None  # why pinned host memory was refused, if it was
        # page-locked blocks come one ahead, allocated on another thread while the products run (pinned_blocks.py)
        ahead_cap = capacity if capacity is not None else rows_limit
        self.pinned = PinnedAhead(dim, dtype, self.block, ahead_cap) if self.pin else None
        self.lean_vectors = (LeanVectors(dim, dtype, self.compute, side_stream=self.pin, mode=self.lean_mode)
                             if self.lean else None)
        self.capacity = capacity
        # a host basis faults its next row in on another core while the matvec runs (.host_blocks), where one
        # is free, else populates a fresh row just before writing it: the first write of a fresh 40 MB row cost
        # 18-50 ms of page faults on the step's own thread
        # (and so are the pageable rows of an offloaded basis, which the copy from the device would fault in)
        self._plan_touching()
        self.touched = 0  # rows below this one have been written or populated (a rotation keeps them)
        self.blocks: list[torch.Tensor] = []
        self.n = 0
        self.peak = 0

    @classmethod
    def offloaded_block_rows(cls, dim: int, dtype: torch.dtype) -> int:
        """Rows per block of an offloaded basis of ``dim``-vectors of ``dtype``: :attr:`BLOCK`, fewer where they
        would pass :attr:`PIN_BLOCK_BYTES`, one at least."""
        row_bytes = max(1, dim * torch.empty(0, dtype=dtype).element_size())
        return max(1, min(cls.BLOCK, cls.PIN_BLOCK_BYTES // row_bytes))

    def _plan_touching(self) -> None:
        """Whether fresh rows are populated before their first write, and ahead on another thread: host rows,
        the basis's own or an offloaded basis's pageable ones (again when the driver refuses page-locking)."""
        pageable = self.offloaded and not self.pin and torch.device(self.device).type == "cpu"
        self.populate_rows = (self.on_host or pageable) and populate_wanted()
        self.prefetcher = RowPrefetcher() if self.populate_rows and prefetch_wanted() else None

    def work_buffer(self) -> torch.Tensor:
        """A ``(dim,)`` vector in the basis's type and place, allocated once per basis, for the products of a
        basis in host memory (:func:`krylov_step`)."""
        if getattr(self, "_work", None) is None:
            self._work = host_vector(self.dim, self.dtype)
        return self._work

    def newest_row(self) -> torch.Tensor:
        """The stored row of the newest vector (for a lean basis in host memory; the product may read it)."""
        return self._row(self.n - 1)

    def predecessor(self, cur: torch.Tensor) -> torch.Tensor:
        """What the next step takes as its previous vector, given the newest one ``cur`` before the next is
        appended: ``cur`` itself, or for a lean basis its stored row (host memory; the step reads it onto the
        device after its product, so no third d-vector sits on the device during the product)."""
        return self._row(self.n - 1) if self.lean else cur

    def rows_readable(self) -> None:
        """Order the next reads of stored rows after their copies (a lean basis's side stream: .lean_vectors)."""
        if self.lean_vectors is not None:
            self.lean_vectors.readable()

    def release_work(self) -> None:
        """Drop a lean basis's device vectors and wait for its rows' copies (the run is over)."""
        if self.lean_vectors is not None:
            self.lean_vectors.release()

    def __del__(self) -> None:
        try:  # a run that failed midway: its rows' copies end before the rows are freed
            self.release_work()
        except Exception:  # noqa: BLE001 - interpreter shutdown, or a construction that failed early
            pass

    def append(self, v: torch.Tensor) -> torch.Tensor:
        """Store ``v`` as the next basis vector; return it as it lives on the compute device (a row of a
        block when the basis is there, ``v`` itself when offloaded). With :attr:`round_to`, ``v`` is rounded in
        place first."""
        if self.round_to is not None:
            self._round(v)  # before the copy: the vector the compute device keeps is the stored one
        row = self._next_row()
        if self.lean_vectors is not None:
            self.lean_vectors.store(row, v, self.pin)  # beside the next product, which reads v too
        else:
            row.copy_(v, non_blocking=self.pin)
        if self.pinned is not None:
            self.pinned.kick()  # after the copy: the allocation beside it would stall it (pinned_blocks.py)
        return v if self.offloaded else row

    def _next_row(self) -> torch.Tensor:
        """The next free row (allocating its block when needed), counted as stored."""
        if self.capacity is not None and self.n >= self.capacity:
            raise RuntimeError(f"the Lanczos basis is full ({self.capacity} vectors)")
        row = self._row(self.n)
        if self.populate_rows and self.n >= self.touched:
            populate(row)  # not touched ahead (the first row, or no free core): one call, not a fault per page
            self.touched = self.n + 1
        self.n += 1
        self.peak = max(self.peak, self.n)
        if self.prefetcher is not None and self.n >= self.touched and (self.capacity is None or self.n < self.capacity):
            # the row after this one, faulted in while the next matvec runs; its block is allocated now if it
            # starts one (address space only). At most one row beyond the stored ones is in memory: a run of
            # m steps stores m rows and the memory plan counts m + 1 (engine/memory_plan.py)
            self.prefetcher.start(self._row(self.n))
            self.touched = self.n + 1
        return row

    def _row(self, k: int) -> torch.Tensor:
        """Row ``k`` of the blocks, allocating its block when it is the first row past them."""
        b, i = divmod(k, self.block)
        if b == len(self.blocks):
            rows = self.block if self.capacity is None else min(self.block, self.capacity - b * self.block)
            self.blocks.append(self._new_block(rows))
        return self.blocks[b][i]

    def _new_block(self, rows: int) -> torch.Tensor:
        if self.pin:
            try:
                return self.pinned.take(rows)
            except RuntimeError as e:  # the driver refused page-locked memory: pageable memory holds the same
                self.pin, self.pin_refused = False, str(e).splitlines()[0][:200]
                self._plan_touching()
        if torch.device(self.device).type != "cpu":
            return torch.empty(rows, self.dim, dtype=self.dtype, device=self.device)
        block = host_block(rows, self.dim, self.dtype)  # released on a free core when the basis is dropped
        advise_huge_pages(block)  # 2 MiB pages where asked and granted: ~500x fewer faults on first touch
        return block

    def storages(self, *extra: torch.Tensor) -> set[int]:
        """Addresses of the storages holding the basis (and ``extra``), to tell a matvec's fresh output
        from one that aliases them."""
        return {b.untyped_storage().data_ptr() for b in self.blocks} | {
            t.untyped_storage().data_ptr() for t in extra}

    def append_normalized(self, w: torch.Tensor, beta: float) -> torch.Tensor:
        """Append ``w / beta`` (``w`` is scaled in place, no temporary; in host memory the quotient is written
        straight into the basis row, one pass instead of two, and ``w`` is left as it was)."""
        if self.on_host and beta != 1.0:
            row = self._next_row()
            torch.div(w, beta, out=row)  # the same operation as w.div_(beta), its result stored in the row
            return row if self.round_to is None else self._round(row)
        return self.append(w.div_(beta) if beta != 1.0 else w)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to :attr:`round_to`'s values in place (chunked on the host)."""
        if x.device.type == "cpu":
            return host_round(x, self.round_to)
        return x.copy_(x.to(self.round_to))

    def _filled(self):
        for b, block in enumerate(self.blocks):
            rows = min(block.shape[0], self.n - b * self.block)
            if rows <= 0:
                break
            yield block[:rows]

    def orthogonalize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w - V V^T w`` in place (classical Gram-Schmidt against every stored vector, one matrix product
        per block for the coefficients and one for the update) and the coefficients ``V^T w``."""
        blocks = list(self._filled())
        # every block's coefficients from the same w (classical Gram-Schmidt), so one reduction serves all
        coeffs = self.space.reduce(torch.cat([row_dots(B, w) for B in blocks]))
        s = 0
        for B in blocks:
            sub_rows(w, coeffs[s : s + B.shape[0]], B)
            s += B.shape[0]
        return w, coeffs

    def reorthogonalize(self, w: torch.Tensor, passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """``w`` made orthogonal to every stored vector in place, ``passes`` times over (2: CGS2), and the
        total coefficients of all passes (``V^T w`` to working precision).

        On the compute device: global passes. Offloaded, ``STREAM`` vectors at a time: with ``passes=1`` one read
        of the basis, each piece's coefficients taken from ``w`` as the earlier pieces left it (the step's
        three-term part has removed nearly all of ``w``'s projection, so this differs from the classical pass in
        the second order only); with ``passes >= 2`` (a first step, or the first after a restart, whose
        coefficients are of the order of ``||w||``) the classical first pass, all coefficients from the same
        ``w`` (one read for them, one to subtract them), then the remaining passes a piece at a time (one more
        read). Piece by piece from the start, the later pieces' coefficients would carry ``V_j^T V_i c_i``: at the
        semi-orthogonality a partial run keeps (``sqrt(eps)``) that read as the matvec's asymmetry and lost
        orthogonality (||V^T V - I|| up to 1e-3 in float64 after a few restarts).
        """
        if not self.offloaded:
            w, total = self.orthogonalize(w)
            for _ in range(passes - 1):
                w, c = self.orthogonalize(w)
                total = total + c
            return w, total
        self.rows_readable()
        first = None
        if passes >= 2:
            dots: list[torch.Tensor] = []
            self._each_streamed(w.device, lambda Bc, i: dots.append(self.space.dots(Bc, w)))
            first = torch.cat(dots)
            self._each_streamed(w.device, lambda Bc, i: sub_rows(w, first[i : i + Bc.shape[0]], Bc))
            passes -= 1
        parts: list[torch.Tensor] = []

        def piecewise(Bc: torch.Tensor, i: int) -> None:
            total = None
            for _ in range(passes):
                c = self.space.dots(Bc, w)
                sub_rows(w, c, Bc)
                total = c if total is None else total + c
            parts.append(total)

        self._each_streamed(w.device, piecewise)
        rest = torch.cat(parts)
        return w, rest if first is None else first + rest

    def _each_streamed(self, device, fn) -> None:
        """``fn(rows, i)`` on the stored rows brought to ``device`` ``STREAM`` at a time (``i``: the first row's index),
        each dropped before the next is copied (a loop over a generator of pieces holds the last while the next is
        made: the 1.1B Llama's lean first step held four d-vectors, 1.52x its training step, where three fit)."""
        i = 0
        for B in self._filled():
            for s in range(0, B.shape[0], self.STREAM):
                rows = B[s : s + self.STREAM]
                fn(self._on_compute(rows, device), i)
                i += rows.shape[0]

    def _on_compute(self, rows: torch.Tensor, device) -> torch.Tensor:
        return rows.to(device, non_blocking=self.pin)  # asynchronous from page-locked rows

    def rotate(self, Y: torch.Tensor) -> None:
        """Replace the basis ``V`` (``n`` rows) by the ``l`` rows of ``Y^T V`` for ``Y`` ``(n, l)``, in place.

        Column slices of the basis pass through the compute device (``HALF_CHUNK_ELEMENTS`` float32 elements
        of scratch at most, ``CPU_CHUNK_ELEMENTS`` on the CPU, where the 48-to-16 rotation of a 2^22-entry
        float32 basis took 3.2 s in 64 MB slices and 1.0 s in 4 MB ones), so no second basis is ever
        allocated. Cost: ``2 n l d`` flops, no matvec.
        """
        n, l = self.n, Y.shape[1]
        self.rows_readable()
        if self.on_host:
            # chunks through reusable scratch (:func:`.host_arith.host_rotate`): no fresh slices per chunk
            targets = [self.blocks[b // self.block][: min(self.block, l - b)] for b in range(0, l, self.block)]
            host_rotate(list(self._filled()), Y, targets)
            self.n = l
            return
        acc = accumulation_dtype(self.dtype)
        Yt = Y.T.to(device=self.compute, dtype=acc)
        blocks = list(self._filled())
        step = scratch_columns(n + l, torch.device(self.compute))  # the CPU's 2^20: see vectors.py
        for s in range(0, self.dim, step):
            X = torch.cat([B[:, s : s + step] for B in blocks]).to(device=self.compute, dtype=acc)
            Z = (Yt @ X).to(self.dtype)
            for b in range(0, l, self.block):
                rows = Z[b : b + self.block]
                self.blocks[b // self.block][: rows.shape[0], s : s + step].copy_(rows)
        self.n = l

    def matrix(self) -> torch.Tensor:
        """The stored vectors as one ``(n, d)`` tensor: a view when they live in one block, else a copy."""
        filled = list(self._filled())
        return filled[0] if len(filled) == 1 else torch.cat(filled)
