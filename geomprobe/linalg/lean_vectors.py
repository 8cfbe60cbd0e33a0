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
"""

from __future__ import annotations

import torch

__all__ = ["LEAN_WORK_VECTORS", "LeanVectors", "RowCopies", "lean_work_bytes"]

LEAN_WORK_VECTORS = 2  # a lean run's device vectors beside a product: the newest and the product's output


def lean_work_bytes(dim: int, itemsize: int) -> int:
    """Device bytes a lean run's working vectors take: its two vectors of ``itemsize`` bytes an entry, and a float32
    one for half types (the memory plan's ``lean_work``); free again once the run is over, for its Ritz vectors."""
    return LEAN_WORK_VECTORS * dim * itemsize + (4 * dim if itemsize < 4 else 0)


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

    def finish(self) -> None:
        """Wait on the host for every copy (the rows are read on the host, or the run is over)."""
        self.stream.synchronize()
        self._buffers.clear()


class LeanVectors:
    """The two device vectors of a lean basis (the newest vector and the next product's output, which alternate)
    and the copies of its rows: on a side stream (:class:`RowCopies`) where the rows are page-locked on a CUDA
    host, else plain copies."""

    def __init__(self, dim: int, dtype: torch.dtype, device, side_stream: bool) -> None:
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self.pair: list[torch.Tensor | None] = [None, None]
        self.copies = RowCopies(self.device) if side_stream else None

    def out_buffer(self, cur: torch.Tensor) -> torch.Tensor:
        """The device vector for the next product's output: of the two, the one not holding ``cur`` (allocated at
        first use), once its pending copy has read it. The output becomes the next ``cur``: the two alternate."""
        held = cur.untyped_storage().data_ptr()
        for i, t in enumerate(self.pair):
            if t is None:
                t = self.pair[i] = torch.empty(self.dim, dtype=self.dtype, device=self.device)
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
