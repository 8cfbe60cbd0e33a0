"""Device-to-host copies of a lean Lanczos basis's rows on a CUDA stream of their own, beside the next product.

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

__all__ = ["RowCopies"]


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
