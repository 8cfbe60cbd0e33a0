"""The copies between the device and host memory of the streamed passes, and the partial sums of a double
backward whose vectors live in host memory.

**Host copies** (:class:`HostIO`, one per Landscape, kept across passes). A copy from the device into freshly
allocated pageable host memory is the slowest way to move data: the driver stages it through a bounce
buffer and the fresh pages fault in one by one (a fresh host allocation alone costs several times a copy
into an existing buffer). Every host-bound copy of the passes therefore lands in a page-locked buffer that is
allocated once and reused: an output piece is copied there and then added into its host vector; an input
slice that is not page-locked is copied once into a page-locked buffer, from which each parameter's piece goes
to the device asynchronously; a partial sum that waits for its next contribution (below) has a page-locked
buffer per parameter. Where page-locking fails (no CUDA, a host out of locked memory), plain buffers are kept
and reused all the same.

**Partial sums** (:class:`PartialSums`). A weight reaches the double backward from two producers (the
forward's product and the first-order backward's, which used it to pass the gradient on), and autograd runs
the second long after the first: summed in autograd's buffers, about 0.84 of a gradient waits at once. The
passes take each contribution where it is produced (``StreamPass._intercept``, which also counts the producers
of each parameter); a sum is complete when that many contributions came, and is handed on at once (to the
reduce-scatter schedule, or added into the host output). A first contribution that must wait stays on the
device while the waiting sums fit ``device_bytes``, and otherwise goes to its page-locked host buffer
asynchronously and comes back (asynchronously, ordered after it on the same stream) when the next one
arrives, where the two are added on the device. So each weight crosses the bus at most twice per pass and is
added on the host at most once, where before every contribution was copied into fresh pageable memory and
added there. A parameter whose producers cannot be counted (its gradient path starts at a root) waits until
the end of the pass (:meth:`PartialSums.drain`); so does a sum whose count was not reached (a producer that
sent nothing).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator

import torch

__all__ = ["HostIO", "PartialSums"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HostIO:
    """Reusable host buffers for the copies of the streamed passes (module docstring). ``pin``: try page-locked
    memory (only useful, and only tried, with a CUDA model). Figures of what it holds: :meth:`stats`."""

    def __init__(self, pin: bool):
        self.pin = bool(pin)
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._inputs: dict[torch.dtype, torch.Tensor] = {}
        self._spill: dict[tuple[int, int], torch.Tensor] = {}
        self.pinned_failures = 0

    def _empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(n, dtype=dtype, pin_memory=True)
            except RuntimeError:  # no locked memory left (or no driver): plain memory, still reused
                self.pin = False
                self.pinned_failures += 1
        return torch.empty(n, dtype=dtype)

    def _flat(self, store: dict, key, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = store.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = store[key] = self._empty(n, dtype)
        return buf[:n]

    def add_to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst += src`` for a host tensor ``dst`` and a device tensor ``src`` of its shape: one copy into the
        reused staging buffer (waits for the device) and one addition on the host. Same device: one addition.
        A wider ``dst`` (float32 sums of a half-precision model's products) is staged in its own type, converted
        on the device on the way: a CPU addition of mixed types converts its whole input into a fresh buffer."""
        if src.device == dst.device:
            dst.add_(src.to(dst.dtype))
            return
        buf = self._flat(self._staging, dst.dtype, src.numel(), dst.dtype).view(src.shape)
        buf.copy_(src)
        dst.add_(buf)

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst[:] = src`` (host ``dst``, device ``src``); straight into ``dst`` when it is page-locked, else
        through the staging buffer."""
        if src.device == dst.device or dst.is_pinned() or not self.pin:
            dst.copy_(src)
            return
        buf = self._flat(self._staging, src.dtype, src.numel(), src.dtype).view(src.shape)
        buf.copy_(src)
        dst.copy_(buf)

    def input(self, v: torch.Tensor, slot: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``v`` (host memory, flat) in a page-locked buffer, so that its pieces go to the device asynchronously:
        ``v`` itself when it is page-locked already (or page-locking is off), else a copy in the reused buffer
        ``slot``. ``dtype``: the copy in that type (rounded to it; a pinned ``v`` of another type is copied too).
        The caller must not reuse the slot before the device has read it (a pass synchronizes at its end)."""
        dtype = v.dtype if dtype is None else dtype
        if self.input_is(v, dtype):
            return v
        buf = self._flat(self._inputs, (slot, dtype), v.numel(), dtype)
        buf.copy_(v.reshape(-1))
        return buf.view(v.shape)

    def input_is(self, v: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        """Whether :meth:`input` returns ``v`` itself (no copy on the host)."""
        dtype = v.dtype if dtype is None else dtype
        return v.device.type != "cpu" or v.dtype == dtype and (not self.pin or v.is_pinned())

    def spill_buffer(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s host buffer for a waiting partial sum (``like``'s shape and dtype), kept across
        passes."""
        return self._flat(self._spill, (i, 0), like.numel(), like.dtype).view(like.shape)

    def nbytes(self) -> int:
        """Host bytes held in reusable buffers."""
        stores = (self._staging.values(), self._inputs.values(), self._spill.values())
        return sum(_nbytes(b) for store in stores for b in store)

    def clear(self) -> None:
        """Release every buffer (a closed Landscape)."""
        self._staging, self._inputs, self._spill = {}, {}, {}


class PartialSums:
    """The contributions of one double backward to each parameter's output, summed (module docstring).

    ``expected``: how many contributions complete parameter ``i``'s sum (its producers; absent: unknown, the
    sum waits for :meth:`drain`). ``done(i, total)``: called once a sum is complete, with the sum on the
    contributions' device (it may be called again for a parameter if a contribution comes after its count was
    reached: the caller adds it). ``device_bytes``: how many bytes of waiting sums may stay on the device; the
    rest wait in ``io``'s host buffers when ``spill`` (default: a CUDA ``device``; without ``io`` everything
    stays where it is). ``device``: where the contributions come from (and where a sum comes back to)."""

    def __init__(self, expected: dict[int, int], done: Callable[[int, torch.Tensor], None], device: torch.device,
                 device_bytes: float = 0, io: HostIO | None = None, spill: bool | None = None):
        self.expected = dict(expected)
        self.device = torch.device(device)
        self.spill = (self.device.type == "cuda") if spill is None else bool(spill)
        # a bound method is held weakly: its owner (a pass) holds this object, and a strong reference back would
        # be a cycle keeping the pass (and the vectors it views) alive until Python's garbage collector runs
        self._done = weakref.WeakMethod(done) if inspect.ismethod(done) else (lambda: done)
        self.device_bytes = device_bytes
        self.io = io
        self._count: dict[int, int] = {}
        self._device: dict[int, torch.Tensor] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._device_held = 0
        self.peak_device_bytes = 0
        self.spilled = 0  # sums that waited in host memory
        self.completed = 0  # sums handed on as soon as their count was reached

    def add(self, i: int, x: torch.Tensor) -> None:
        """Contribution ``x`` (parameter ``i``'s shape, on the device) to parameter ``i``'s output. ``x`` is
        not kept: a sum that waits is a copy (autograd may reuse the tensor's buffer)."""
        n = self._count[i] = self._count.get(i, 0) + 1
        total = self._take(i, x)
        if n == self.expected.get(i, -1):
            self.completed += 1
            self._done()(i, x if total is None else total)
            return
        self._hold(i, x.clone() if total is None else total)

    def _take(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """The waiting sum of ``i`` plus ``x``, on ``x``'s device (None: nothing was waiting)."""
        total = self._device.pop(i, None)
        if total is not None:
            self._device_held -= _nbytes(total)
            return total.add_(x)
        host = self._host.pop(i, None)
        if host is None:
            return None
        # ordered after the copy that filled the buffer (same stream), so no wait on the host
        return host.to(x.device, non_blocking=host.is_pinned(), copy=True).add_(x)

    def _hold(self, i: int, total: torch.Tensor) -> None:
        nb = _nbytes(total)
        if self.io is None or not self.spill or self._device_held + nb <= self.device_bytes:
            self._device[i] = total
            self._device_held += nb
            self.peak_device_bytes = max(self.peak_device_bytes, self._device_held)
            return
        buf = self.io.spill_buffer(i, total)
        buf.copy_(total, non_blocking=buf.is_pinned())  # the device's allocator frees `total` in stream order
        self._host[i] = buf
        self.spilled += 1

    def drain(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The sums still waiting (unknown counts, producers that sent nothing), each on the device, in
        parameter order; nothing waits afterwards."""
        for i in sorted(set(self._device) | set(self._host)):
            total = self._device.pop(i, None)
            if total is None:
                host = self._host.pop(i)
                total = host.to(self.device, non_blocking=host.is_pinned())
            yield i, total
        self._device_held = 0

    def clear(self) -> None:
        """Drop every waiting sum (a failed pass)."""
        self._device, self._host, self._device_held = {}, {}, 0
