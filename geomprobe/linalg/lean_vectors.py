"""A lean Lanczos basis's device side: its two alternating d-vectors, and its rows' copies to the host on a CUDA
stream of their own, beside the next product.

A lean run (:func:`~geomprobe.linalg.lanczos.lanczos` with ``lean=True``) stores each new vector into a
page-locked host row and hands the same device vector to the next product as its input. On the product's own
stream the copy (4.4 GB for a 1B-parameter model in float32, about 0.1-0.2 s over PCIe) would run before the
product starts; on a stream of its own it runs while the product computes, since both only read the vector.
Two orderings then have to be kept by hand: the vector's buffer is written again (the product after next
writes its output there) only after its copy has finished, and a stored row is read back (the previous vector
after a product, a whole-basis pass, a rotation, the Ritz vectors) only after it has been written. Copies run in
order on their stream, so waiting for the newest one covers every row.

A lean run with its inputs from the host (``lean="streamed"``) holds one d-vector on the device during each
product, its output: the product reads its input from the stored row, and the newest vector's device memory is
given back meanwhile (``storage.resize_(0)``, which leaves every reference to the tensor valid) and filled again
from that row after the product, for the three-term step. Either way the newest vector is given back after that
step (no caller reads it later), so a whole-basis pass holds ``w`` and one streamed row, and the step at most
``w``, the newest vector and the previous one (:data:`LEAN_STEP_VECTORS`). The 1.1B Llama in bf16 peaked at
four d-vectors in its whole-basis passes (the newest and previous vectors beside ``w`` and a streamed row),
1.63x its training step where 1.5x was asked (benchmarks/RESULTS.md section 6, twenty-first round).
"""

from __future__ import annotations

import torch

from ..errors import ConfigurationError

__all__ = ["LEAN_MODES", "LEAN_PRODUCT_VECTORS", "LEAN_STEP_VECTORS", "LeanVectors", "RowCopies",
           "lean_step_bytes", "lean_work_bytes", "take_pending"]

# page-locked rows handed to a product (streamed inputs) while their copy from the device may still run, by
# address: the event after which each holds its values. The product orders its reads after it
# (:func:`take_pending`) instead of the host waiting before the product starts.
_PENDING: dict[int, torch.cuda.Event] = {}


def take_pending(row: torch.Tensor) -> torch.cuda.Event | None:
    """The event after which the lean row at ``row``'s address holds its values, if its copy from the device may
    still run, and forget it: the caller now orders every read of the row after it (a device stream waits on it
    before copying from the row; a read on the host calls ``synchronize()`` first). None for any other tensor."""
    return _PENDING.pop(row.data_ptr(), None) if row.device.type == "cpu" else None

# a lean run's device d-vectors beside a product: the newest and the product's output, or the output alone where
# the product reads its input from the host ("streamed")
LEAN_PRODUCT_VECTORS = {"device": 2, "streamed": 1}
LEAN_MODES = tuple(LEAN_PRODUCT_VECTORS)
LEAN_STEP_VECTORS = 3  # between products: w, the newest vector and the previous row (a pass: w and one row)


def lean_mode(lean) -> str | None:
    """The lean mode a ``lean`` argument names: None (not lean), ``"device"`` (True) or ``"streamed"``."""
    if lean is False or lean is None:
        return None
    if lean is True or lean == "device":
        return "device"
    if lean == "streamed":
        return "streamed"
    raise ConfigurationError(f"lean must be False, True, 'device' or 'streamed' (each product's input read from its "
                             f"host row), got {lean!r}")


def lean_work_bytes(dim: int, itemsize: int, mode: str = "device") -> int:
    """Device bytes a lean run's working vectors take beside a product (:data:`LEAN_PRODUCT_VECTORS` of
    ``itemsize`` bytes an entry; the memory plan's ``lean_work``)."""
    return LEAN_PRODUCT_VECTORS[mode] * dim * itemsize


def lean_step_bytes(dim: int, itemsize: int) -> int:
    """Device bytes a lean run's step takes between products (:data:`LEAN_STEP_VECTORS`), free again once the run
    is over: the room its Ritz vectors are formed in (:meth:`.ritz.LanczosResult.take_ritz_vectors`)."""
    return LEAN_STEP_VECTORS * dim * itemsize


class RowCopies:
    """Copies of device vectors into host rows on a side stream of ``device``, with the waits they need."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self._buffers: dict[int, torch.cuda.Event] = {}
        self._last: torch.cuda.Event | None = None

    def copy(self, row: torch.Tensor, v: torch.Tensor) -> None:
        """``row.copy_(v)`` on the side stream, after the work that wrote ``v`` on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            row.copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        v.record_stream(self.stream)  # a fresh vector's memory is not given out again before the copy ends
        self._buffers[v.untyped_storage().data_ptr()] = event
        self._last = event

    def writable(self, buffer: torch.Tensor) -> None:
        """The current stream waits until ``buffer``'s pending copy (if any) has read it."""
        event = self._buffers.pop(buffer.untyped_storage().data_ptr(), None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def readable(self) -> None:
        """The current stream waits until every row copied so far has been written."""
        if self._last is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last)

    def pending(self, row: torch.Tensor) -> None:
        """Hand ``row`` to a reader that orders its reads after the copies so far (:func:`take_pending`)."""
        if self._last is not None:
            _PENDING[row.data_ptr()] = self._last

    def finish(self) -> None:
        """Wait on the host for every copy (the rows are read on the host, or the run is over)."""
        self.stream.synchronize()
        self._buffers.clear()
        _PENDING.clear()  # every row is written: no reader needs to wait


class LeanVectors:
    """The two device vectors of a lean basis (the newest vector and the next product's output, which alternate)
    and the copies of its rows: on a side stream (:class:`RowCopies`) where the rows are page-locked on a CUDA
    host, else plain copies."""

    def __init__(self, dim: int, dtype: torch.dtype, device, side_stream: bool, mode: str = "device") -> None:
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self.mode = mode
        self.pair: list[torch.Tensor | None] = [None, None]
        self.copies = RowCopies(self.device) if side_stream else None

    def adopt(self, v: torch.Tensor) -> None:
        """Take the run's first vector (a fresh tensor: the start vector) as one of the two, so that it is given
        back like the others."""
        if v.shape == (self.dim,) and v.is_contiguous() and v.storage_offset() == 0:
            self.pair[0] = v

    def _own(self, v: torch.Tensor) -> bool:
        ptr = v.untyped_storage().data_ptr()
        return ptr != 0 and any(t is not None and t.untyped_storage().data_ptr() == ptr for t in self.pair)

    def give_back(self, v: torch.Tensor) -> None:
        """Free ``v``'s device memory where it is one of the two (its stored row keeps its values); references to it
        stay valid and :meth:`refill` or :meth:`out_buffer` allocate it again."""
        if self._own(v):
            v.untyped_storage().resize_(0)

    def refill(self, v: torch.Tensor, row: torch.Tensor) -> None:
        """Allocate a given-back ``v`` again and copy its stored ``row`` into it (in order on this stream)."""
        storage = v.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.dim * v.element_size())
            v.copy_(row, non_blocking=self.copies is not None)  # page-locked rows have a side stream

    def input_for(self, cur: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """The next product's input: ``cur`` itself, or in the streamed mode its stored ``row``, with ``cur``'s
        device memory given back until :meth:`refill`. A page-locked row may still be being written: the product
        takes the copy's event (:func:`take_pending`) and orders its reads after it, so that the copy runs beside
        the product's first graph rebuild (the 1.1B Llama in bf16: 44 ms a step the host waited); a pageable row
        is read by the host when copied, so the host waits for it here."""
        if self.mode != "streamed":
            return cur
        if self.copies is not None:
            if row.is_pinned():
                self.copies.pending(row)
            else:
                self.copies.finish()
        self.give_back(cur)
        return row

    def out_buffer(self, cur: torch.Tensor) -> torch.Tensor:
        """The device vector for the next product's output: of the two, the one not holding ``cur`` (allocated at
        first use), once its pending copy has read it. The output becomes the next ``cur``: the two alternate."""
        held = cur.untyped_storage().data_ptr()
        for i, t in enumerate(self.pair):
            if t is None:
                t = self.pair[i] = torch.empty(self.dim, dtype=self.dtype, device=self.device)
            if t.untyped_storage().nbytes() == 0:  # given back: a fresh block (the allocator orders its reuse)
                t.untyped_storage().resize_(self.dim * t.element_size())
                return t
            if t.untyped_storage().data_ptr() != held:
                if self.copies is not None:
                    self.copies.writable(t)
                return t
        raise RuntimeError("both of the lean basis's device vectors hold the current one")  # pragma: no cover

    def store(self, row: torch.Tensor, v: torch.Tensor, non_blocking: bool) -> None:
        """``v`` into the host ``row``: beside the next product where a side stream runs the copies."""
        if self.copies is not None:
            self.copies.copy(row, v)
        else:
            row.copy_(v, non_blocking=non_blocking)

    def readable(self) -> None:
        """Order the next reads of stored rows after their copies."""
        if self.copies is not None:
            self.copies.readable()

    def release(self) -> None:
        """Drop the two vectors (the run is over; its caller's references are the last) and wait for the copies,
        before the rows they write may be freed."""
        self.pair = [None, None]
        if self.copies is not None:
            self.copies.finish()
