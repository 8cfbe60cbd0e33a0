"""The limits a memory plan works within, and where its Lanczos basis goes: the budget from the training peak, free
memory and a cap (:func:`budget_bytes`), the basis's placement (:func:`place_basis`), the room for selective
orthogonalization's vectors (:func:`selective_room`), and the pieces probe batches split into. Pure arithmetic,
shared by the single-device plan (:mod:`.memory_plan`) and the sharded one (:mod:`.sharded_plan`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigurationError

__all__ = ["DEFAULT_PEAK_RATIO", "HEADROOM", "HOST_SHARE", "MIN_BOUNDED_BASIS", "budget_bytes", "place_basis",
           "selective_room"]

DEFAULT_PEAK_RATIO = 1.5      # probe peak <= 1.5 x the training step's peak (issue 16)
HEADROOM = 0.9                # of the budget planned for: the allocator's fragmentation and small tensors
HOST_SHARE = 0.5              # of the host's available RAM a host-resident basis may take
MIN_BOUNDED_BASIS = 20        # fewer stored vectors than this and a restarted Lanczos barely converges


def budget_bytes(
    *,
    available_bytes: int | None,
    allocated_bytes: int | None = 0,
    train_peak_bytes: int | None = None,
    peak_ratio: float = DEFAULT_PEAK_RATIO,
    cap_bytes: int | None = None,
    target_headroom: float = HEADROOM,
) -> tuple[int | None, str]:
    """The bytes a probe may add to what is allocated, and which limit set it (:mod:`.memory_plan`'s docstring);
    ``(None, "no limit")`` when nothing is known. Negative when a limit is already exceeded. Each limit is taken
    times :data:`HEADROOM`, the training peak's times ``target_headroom`` (a lean plan takes it whole)."""
    if not peak_ratio > 0:
        raise ConfigurationError(f"peak_ratio must be > 0, got {peak_ratio}")
    allocated = int(allocated_bytes or 0)
    limits: list[tuple[float, str]] = []
    if train_peak_bytes is not None:
        value = peak_ratio * train_peak_bytes - allocated
        limits.append((value * target_headroom if value > 0 else value, "training peak"))
    if available_bytes is not None:
        limits.append((available_bytes * HEADROOM if available_bytes > 0 else available_bytes, "free memory"))
    if cap_bytes is not None:
        value = cap_bytes - allocated
        limits.append((value * HEADROOM if value > 0 else value, "memory cap"))
    if not limits:
        return None, "no limit"
    value, source = min(limits, key=lambda t: t[0])
    return int(value), source


def _pieces(batch_sizes: Sequence[int], m: int) -> list[int]:
    return [min(m, n - a) for n in batch_sizes for a in range(0, n, m)]


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(max(1, math.ceil(out[-1] / 2)))
    return out


def place_basis(m_req: int, vector_bytes: int, room: float | None, host_bytes: int | None, *,
                bounded_basis: bool, host_is_device: bool) -> tuple[str | None, int | None, bool]:
    """Where a Lanczos basis of ``m_req`` vectors of ``vector_bytes`` each lives, in order of preference: on the
    device in full, bounded on the device (at least :data:`MIN_BOUNDED_BASIS` vectors), in host memory
    (``HOST_SHARE`` of ``host_bytes``), bounded there. Returns ``(basis_device, max_basis, placed)``;
    ``placed`` is False when none fits (then the least setting, for the caller to warn about)."""
    bv = max(int(vector_bytes), 1)
    host_room = -1 if host_is_device else (None if host_bytes is None else int(host_bytes * HOST_SHARE))
    if room is None or m_req * bv <= room:
        return None, None, True
    if bounded_basis and room // bv >= MIN_BOUNDED_BASIS:
        return None, int(room // bv), True
    if host_room is None or 0 <= host_room and m_req * bv <= host_room:
        return "cpu", None, True
    if bounded_basis and host_room // bv >= MIN_BOUNDED_BASIS:
        return "cpu", int(host_room // bv), True
    return (None if host_is_device else "cpu"), (MIN_BOUNDED_BASIS if bounded_basis else None), False


def selective_room(need: int, itemsize: int, on_device: bool, room: int | None) -> int:
    """The bytes a plan counts for selective orthogonalization's kept Ritz vectors (``need``, on the compute
    device): all of them where ``room`` (what the budget leaves beside the Lanczos phase; None: no budget) holds
    them and the vectors are float32 or float64; else 0, and the run goes without (``selective=False``). A
    half-precision product's own asymmetry keeps its runs out of that regime (:mod:`~geomprobe.linalg
    .orthogonality`), so nothing is held for them; vectors in host memory take none of the device's."""
    if not on_device or itemsize < 4:
        return 0
    return need if room is None or need <= room else 0
