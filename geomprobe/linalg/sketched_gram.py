"""Inner products between Lanczos vectors measured from random sketches, each with a bound that covers the true
value, so that a run whose product is asymmetric takes a whole-basis pass only when its vectors have really lost
orthogonality.

Why: a half-precision HVP is off its symmetric part by about 1e-3 of ``||T||`` along the basis
(benchmarks/RESULTS.md section 6, "How far an HVP is from symmetric"), so Simon's estimate
(:mod:`.orthogonality`), which must take that error with its worst sign at every step, asks for a whole-basis
pass at every step from the fifth; with the basis in host memory each pass streams every stored row over the bus
(the 1.1B Llama in bf16: 2.2 GB a row, ~45 rows over ten steps, 2 s of the probe's 3.4 s outside its products).
Measured without passes, the same vectors' inner products stayed at 1.7e-3 after ten steps and 1.8e-2 after
twenty (GPT-2 124M, bf16): far below what the product's own error makes meaningful.

The sketch: every entry ``i`` of a ``d``-vector goes to bucket ``i mod m`` with a random sign ``r_i`` drawn from a
fixed seed (the same signs for every vector of a run), ``s_b(x) = sum_{i in b} r_i x_i``, and each vector gets two
such sketches with independent signs. For one sketch ``A_b = s_b(x) s_b(y)`` has mean ``x_b^T y_b`` and variance
``V_b = sum_{i != j in b} (x_i^2 y_j^2 + x_i y_i x_j y_j)``: signs square to one, so an entry that carries much of
both vectors' mass (an eigenvector concentrated on a few parameters) adds no noise, which Gaussian weights would.
The estimate is the mean of the two sketches' ``sum_b A_b``, and ``sum_b (A_b - A'_b)^2 / 4`` estimates its
variance without bias from the same buckets (the two differ only by their signs). Both are sums of ``m``
independent bucket terms, so the estimate's tail is close to Gaussian: the bound ``|X| + z sigma`` with
:data:`SKETCH_Z` = 4 misses the true ``|x^T y|`` with probability about 6e-5 per pair; ``tests/test_sketched_gram.py``
measures the coverage. For unit vectors whose mass is spread, ``sigma ~ 1 / sqrt(2 m)``.

Cost per vector: one read of it where it lives and ``2 d`` random signs (chunks of :data:`CHUNK` entries, a few
float32 chunks of device memory), the ``2 m``-entry sketches copied to the host, and their bucket products with
the ``k`` stored sketches there (``6 k m`` float32 operations). No matvec, no read of the stored basis.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import torch

from .pinned_memory import pinned_empty, warm
from .vectors import HALF_TYPES

__all__ = ["CHUNK", "SKETCH_MAX", "SKETCH_MIN", "SKETCH_Z", "SignHashSketch", "SketchedGram", "sketch_size",
           "warm_store"]

SKETCH_MAX = 1 << 19  # buckets at most: sigma ~ 1e-3 for spread unit vectors, 4 MB for a vector's two sketches
SKETCH_MIN = 1 << 10  # fewer buckets measure nothing a threshold could use (sigma ~ 0.02)
BUCKET_ENTRIES = 16   # entries per bucket at least (fewer: the sketch is as large as the vector)
SKETCH_Z = 4.0        # bounds are |estimate| + z sigma
CHUNK = 1 << 24       # entries sketched at once: a few float32 chunks (64 MB each) beside the vector
ROWS_AT_ONCE = 16     # stored sketches on the accelerator at once in a measurement (64 MB, twice that with products)
STORE_ROWS = 16       # stored sketches a run's first store holds (64 MB at 2^19 buckets); it doubles when full
# The store of an accelerator's run is page-locked. From torch's page-locked allocator its first 64 MB waited in a
# 1.1B model's first probe for the driver, which was registering the run's next 2.2 GB row on another thread; an
# exact-size block (pinned_memory.py) is mapped while the Landscape builds (warm_store) and pooled for the next
# probe. False: torch's allocator (benchmarks compare the two).
POOLED = True


def sketch_size(dim: int) -> int | None:
    """Buckets for a ``dim``-vector: the largest power of two within :data:`SKETCH_MAX` and ``dim /``
    :data:`BUCKET_ENTRIES`, or None when that is below :data:`SKETCH_MIN` (too few entries to gain anything over
    reading the vectors)."""
    m = min(SKETCH_MAX, dim // BUCKET_ENTRIES)
    if m < SKETCH_MIN:
        return None
    return 1 << (m.bit_length() - 1)


def _store_bytes(size: int, rows: int = STORE_ROWS) -> int:
    return rows * 2 * size * 4


_LOADED: set = set()  # (device, dtype) whose sketch kernels a warm-up thread has loaded in this process


def warm_store(dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Start mapping the page-locked block of the first sketch store of a run over ``dim``-vectors of ``dtype`` on a
    background thread (:func:`.pinned_memory.warm`), where such a run keeps sketches (a half-precision type, long
    enough vectors) and the block is large enough to pool; and, with a CUDA ``device``, sketch a small vector of
    ``dtype`` there on another thread (once a process for each device and type), so that the kernels a sketch and
    its measurement launch are loaded before the run's first one (the 1.1B Llama's first bf16 probe: ~0.8 s more
    in its first measurements than a later probe's). A Landscape whose Lanczos vectors live in host memory calls
    it before its build. False where nothing starts."""
    size = sketch_size(dim)
    if dtype not in HALF_TYPES or size is None:
        return False
    kernels = False
    if device is not None and torch.device(device).type == "cuda":
        key = (str(torch.device(device)), dtype)
        kernels = key not in _LOADED  # once a process: loaded kernels stay loaded
        if kernels:
            _LOADED.add(key)
            threading.Thread(target=_load_kernels, args=(torch.device(device), dtype), daemon=True,
                             name="geomprobe-sketch-warm").start()
    return (POOLED and warm(_store_bytes(size))) or kernels


def small_measurement(device: torch.device, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A measurement of a small vector of ``dtype`` on ``device`` against itself (``2 m`` ones, ``m`` =
    :data:`SKETCH_MIN` buckets; the true inner product is ``2 m``): the kernels of a run's sketches and
    measurements, in a few milliseconds. Returns :meth:`SketchedGram.measure`'s estimates and bounds."""
    gram = SketchedGram(2 * SKETCH_MIN, SKETCH_MIN)
    v = torch.ones(2 * SKETCH_MIN, dtype=dtype, device=device)
    gram.push(v)
    return gram.measure(v)


def _load_kernels(device: torch.device, dtype: torch.dtype) -> None:
    with contextlib.suppress(Exception):  # a warm-up only: the run reports its own failures
        small_measurement(device, dtype)


class SignHashSketch:
    """Two sketches ``s(x)`` of the module docstring: ``m`` buckets, entry ``i`` in bucket ``i mod m`` with random
    signs drawn from ``seed`` on the vector's device (the same signs at every call for vectors of one device)."""

    def __init__(self, dim: int, size: int, seed: int = 0x5EED):
        if size < 1 or dim < size:
            raise ValueError(f"a sketch of {size} buckets needs at least that many entries, got {dim}")
        self.dim, self.size, self.seed = int(dim), int(size), int(seed)
        self._gens: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = self._gens[key] = torch.Generator(device=device)
        return g.manual_seed(self.seed)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """The two sketches of ``v`` (float32, ``(2, m)``) on ``v``'s device, without a host synchronization.
        Cost: one read of ``v`` and ``2 d`` random signs."""
        if v.dim() != 1 or v.numel() != self.dim:
            raise ValueError(f"expected a vector of {self.dim} entries, got shape {tuple(v.shape)}")
        m = self.size
        gen = self._generator(v.device)
        out = torch.zeros((2, m), dtype=torch.float32, device=v.device)
        step = max(m, CHUNK // m * m)
        # u x with u in {0, 1} is exact in v's own type: no float32 copy of the chunk; sums accumulate in float32
        kind = v.dtype if v.is_floating_point() else torch.float32
        for start in range(0, self.dim, step):
            x = v[start : start + step].to(kind)  # only read below
            n = x.numel()
            if n % m:  # the tail: buckets past its end get nothing
                x = torch.nn.functional.pad(x, (0, m - n % m))
            total = x.view(-1, m).sum(0, dtype=torch.float32)
            for k in range(2):
                # sum r_i x_i with r = 2u - 1, u in {0, 1}: 2 sum u_i x_i - sum x_i
                # (one draw per entry: on an H200, eight bits read from each random byte took 19.4 ms for 1.1e9
                # entries against 13.0, the shifts costing more than the draws they save)
                u = torch.randint(0, 2, (n,), generator=gen, device=v.device, dtype=kind)
                if n % m:
                    u = torch.nn.functional.pad(u, (0, m - n % m))
                out[k].add_(u.mul_(x).view(-1, m).sum(0, dtype=torch.float32), alpha=2.0).sub_(total)
        return out


class SketchedGram:
    """The sketches of a run's stored vectors (host, float32; page-locked where the vectors live on an
    accelerator) and the measured inner products of a new vector with every one of them.

    :meth:`measure` sketches a candidate ``w / scale`` and returns, for each stored vector ``k``, the estimate of
    ``(w / scale)^T v_k`` and a bound ``|estimate| + z sigma_k`` that covers the true ``|(w / scale)^T v_k|`` (module
    docstring); :meth:`push` stores the last candidate measured as the next vector. Sketches of the vectors are
    on the host: ``8 m`` bytes each (4 MB at most). For vectors on an accelerator the bucket products run there,
    :data:`ROWS_AT_ONCE` stored sketches copied in at a time (on the H200's host they took ~1 ms a stored vector
    on 16 cores; copied over they take ~0.1 ms)."""

    def __init__(self, dim: int, size: int | None = None, *, z: float = SKETCH_Z, seed: int = 0x5EED):
        size = sketch_size(dim) if size is None else int(size)
        if size is None:
            raise ValueError(f"a {dim}-entry vector is too short to sketch (sketch_size)")
        self.sketch = SignHashSketch(dim, size, seed)
        self.z = float(z)
        self._rows = torch.empty((0, 2, size), dtype=torch.float32)
        self._work = self._rows
        self.count = 0
        self._last: torch.Tensor | None = None
        self._accelerated = False

    @property
    def size(self) -> int:
        return self.sketch.size

    def _room(self, pin: bool) -> None:
        if self.count == self._rows.shape[0]:
            shape = (max(STORE_ROWS, 2 * self.count), 2, self.size)
            pin = pin and torch.cuda.is_available()
            grown = pinned_empty(shape, torch.float32) if pin and POOLED else None
            if grown is None:
                grown = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
            grown[: self.count] = self._rows[: self.count]
            self._rows = grown

    def measure(self, w: torch.Tensor, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Sketch ``w / scale`` and return ``(estimates, bounds)`` of its inner products with the stored vectors
        (``count`` each, float64). Cost: one read of ``w``, ``6 count m`` operations where ``w`` lives (the stored
        sketches copied there from the host); one host synchronization."""
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite norm, got {scale!r}")
        s = self.sketch.apply(w).div_(scale)
        self._accelerated = w.device.type != "cpu"  # the stored sketches are page-locked, to be copied over
        if not self._accelerated:
            self._last = s
            est, var = self._products_host(s)
        else:
            est, var = self._products_on(s)
            packed = torch.cat([s.reshape(-1), est.float(), var.float()]).cpu()  # one synchronization
            n = s.numel()
            self._last = packed[:n].view(2, -1)
            est, var = packed[n : n + self.count].double(), packed[n + self.count :].double()
        est_np = est.numpy()
        return est_np, np.abs(est_np) + self.z * np.sqrt(np.maximum(var.numpy(), 0.0))

    def _products_host(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._work.shape[0] < self.count:  # reused: a fresh (count, 2, m) product paid its page faults each step
            self._work = torch.empty_like(self._rows)
        a = torch.mul(self._rows[: self.count], s, out=self._work[: self.count])  # each bucket's product
        est = a.sum(2, dtype=torch.float64).mean(1)
        return est, a[:, 0].sub_(a[:, 1]).square_().sum(1, dtype=torch.float64) / 4.0

    def _products_on(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ests, vars_ = [], []
        for a in range(0, self.count, ROWS_AT_ONCE):
            rows = self._rows[a : min(a + ROWS_AT_ONCE, self.count)]
            p = rows.to(s.device, non_blocking=rows.is_pinned()).mul_(s)
            ests.append(p.sum(2, dtype=torch.float64).mean(1))
            vars_.append(p[:, 0].sub_(p[:, 1]).square_().sum(1, dtype=torch.float64) / 4.0)
        if not ests:
            return torch.zeros(0, dtype=torch.float64, device=s.device), torch.zeros(0, dtype=torch.float64,
                                                                                  device=s.device)
        return torch.cat(ests), torch.cat(vars_)

    def push(self, w: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """Store ``w / scale`` (or, without ``w``, the candidate :meth:`measure` saw last) as the next vector."""
        if w is not None:
            self.measure(w, scale)
        if self._last is None:
            raise RuntimeError("push() without a vector needs a measure() first")
        self._room(pin=self._accelerated)
        self._rows[self.count] = self._last
        self.count += 1
        self._last = None
