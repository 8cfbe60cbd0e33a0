"""Ritz values and their bounds: the result of a Lanczos run, the residual and gap bounds, the stopping rule
and the checks of the options every Lanczos variant shares."""

from __future__ import annotations

import importlib
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigurationError
from .host_arith import host_rotate, is_host
from .vectors import accumulation_dtype, check_dim

__all__ = ["LanczosResult", "certificate_limits", "form_ritz_vectors", "spent_rows", "check_lanczos_args",
           "eigh_tridiagonal", "extremes_certified", "extremes_converged", "gap_bounds", "prefetch_solver",
           "ritz_pairs", "tridiagonal"]


@dataclass
class LanczosResult:
    """Ritz values of ``T_m`` (ascending, float64) with residual bounds ``|lambda - theta_i| <= bounds[i]``.

    ``extreme_err``: ``(e_min, e_max)`` from :func:`geomprobe.linalg.certify.extreme_errors`: with
    probability ``>= 1 - risk`` each, ``lambda_min`` lies in ``[theta_min - e_min, theta_min]`` and ``lambda_max``
    in ``[theta_max, theta_max + e_max]``; ``inf`` (``risk`` None) when the start was not random, so nothing
    certifies that the extremes were found. The ``bounds`` only say that some eigenvalue lies near each value.
    ``restarts``: thick restarts of a bounded-memory run (0 for the plain run); ``basis_peak``: the most
    d-vectors the basis held at once. After a restart ``alpha`` is the diagonal of the final projected matrix
    and ``beta`` is empty (it is no longer tridiagonal), ``U`` its eigenvectors.
    """

    ritz_values: torch.Tensor
    bounds: torch.Tensor
    steps: int
    converged: bool
    matvecs: int
    alpha: torch.Tensor
    beta: torch.Tensor
    U: torch.Tensor
    # the basis as the run stored it, in row blocks: joined into one (m, d) tensor only when :attr:`basis` is
    # read (a copy of the whole basis, which Ritz vectors do not need)
    basis_blocks: list[torch.Tensor] | None = field(default=None, repr=False)
    asymmetry: float = 0.0
    restarts: int = 0
    basis_peak: int = 0
    matvec_error: float | None = None  # added to the bounds when the matvec is approximate (see metrics.spectrum)
    extreme_err: tuple[float, float] = (math.inf, math.inf)
    risk: float | None = None
    log_beta: float = math.nan  # sum of log beta_j over every step: the scale of the residual's polynomial
    discarded: tuple[float, ...] = field(default=(), repr=False)  # Ritz values thick restarts dropped
    resid: torch.Tensor | None = field(default=None, repr=False)  # residual norms beta |u_{p,i}| (any bound)
    # where the run computed, when its basis was offloaded to host memory (Ritz vectors are formed there)
    compute_device: torch.device | None = field(default=None, repr=False)
    # bytes the compute device may hold for the Ritz vectors once the run is over: a lean run's working vectors
    # between products, released at its end (lean_vectors.lean_step_bytes); 0: only slices of them
    work_room_bytes: int = field(default=0, repr=False)
    reorthogonalizations: int = 0  # steps orthogonalized against the whole basis (every step: full)
    reorth_regime: str = "full"  # "full", "estimated", or how and from which step partial orthogonalization went on

    @property
    def certified(self) -> tuple[bool, bool]:
        """Whether ``extreme_err`` certifies (``lambda_min``, ``lambda_max``): finite, from a random start."""
        return tuple(self.risk is not None and math.isfinite(e) for e in self.extreme_err)  # type: ignore[return-value]

    def top(self, k: int = 1) -> tuple[list[float], list[float]]:
        """The ``k`` largest Ritz values (descending) and their bounds."""
        idx = list(range(len(self.ritz_values) - 1, max(len(self.ritz_values) - k, 0) - 1, -1))
        return [float(self.ritz_values[i]) for i in idx], [float(self.bounds[i]) for i in idx]

    def bottom(self, k: int = 1) -> tuple[list[float], list[float]]:
        """The ``k`` smallest Ritz values (ascending) and their bounds."""
        idx = list(range(min(k, len(self.ritz_values))))
        return [float(self.ritz_values[i]) for i in idx], [float(self.bounds[i]) for i in idx]

    @property
    def basis(self) -> torch.Tensor | None:
        """The Lanczos vectors as one ``(m, d)`` tensor (``keep_basis=True``; else None). Reading it joins the
        stored blocks once (a copy when there are several); :meth:`ritz_vectors` reads the blocks in place."""
        if self.basis_blocks is None:
            return None
        if len(self.basis_blocks) != 1:
            self.basis_blocks = [torch.cat(self.basis_blocks)]
        return self.basis_blocks[0]

    @basis.setter
    def basis(self, value: torch.Tensor | None) -> None:
        self.basis_blocks = None if value is None else [value]

    def ritz_vector(self, i: int) -> torch.Tensor:
        """The unit Ritz vector ``V_m u_i`` of Ritz value ``i`` (negative ``i`` counts from the top).

        Needs ``keep_basis=True``.
        """
        return self.ritz_vectors([i])[0]

    def ritz_vectors(self, indices: Sequence[int]) -> torch.Tensor:
        """The unit Ritz vectors of Ritz values ``indices``, as rows of a ``(len(indices), d)`` tensor: the same
        vectors as :meth:`ritz_vector` one by one (to rounding), from one pass over the basis instead of one
        pass each (the basis is the largest thing a run holds). Needs ``keep_basis=True``. Cost: no matvec,
        ``2 m k d`` flops."""
        if self.basis_blocks is None:
            raise ConfigurationError("Ritz vectors need lanczos(..., keep_basis=True)")
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        X = form_ritz_vectors(self.basis_blocks, self.U[:, idx], self.compute_device)
        return X.cpu() if is_host(self.basis_blocks[0]) else X

    def take_ritz_vectors(self, groups: Sequence[Sequence[int]],
                          out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """The unit Ritz vectors of each group of indices, one ``(len(group), d)`` tensor per group, and the
        basis released (:attr:`basis_blocks` None afterwards): the last use of a basis kept for its Ritz
        vectors, as at the end of a spectrum run that keeps them for the next probe's warm start.

        A basis in host memory is spent once the pass over it is done, so the vectors are written into its own
        rows wherever a group fits in a block that holds nothing else worth freeing (page-locked blocks, which
        torch's pinned-memory cache keeps in any case, or a block of exactly the group's rows) instead of into
        fresh host memory: on GPT-2 355M in float32 (H200, the 1.5x plan) the copy of the two vectors into fresh
        pageable memory took 2.0 s, and the spectrum's time outside its products fell from 3.9 to 2.1 s with the
        copy into page-locked rows (benchmarks/RESULTS.md §6, sixteenth round). ``out``: host tensors offered per
        group for the groups no block takes (:func:`.host_blocks.populated_ahead`'s, faulted in beside the run),
        used where one is ``(len(group), d)`` in the basis's type; else fresh memory. Values as
        :meth:`ritz_vectors` (the same arithmetic). Cost: one pass over the basis, no matvec."""
        if self.basis_blocks is None:
            raise ConfigurationError("Ritz vectors need lanczos(..., keep_basis=True)")
        blocks = self.basis_blocks
        sizes = [len(g) for g in groups]
        Uk = self.U[:, torch.as_tensor([i for g in groups for i in g], dtype=torch.long)]
        if not is_host(blocks[0]):
            X = form_ritz_vectors(blocks, Uk, self.compute_device)
            self.basis_blocks = None
            return list(torch.split(X, sizes))
        rows = spent_rows(blocks, sizes)
        d, dtype = blocks[0].shape[1], blocks[0].dtype
        offered = list(out) if out is not None else [None] * len(sizes)
        if len(offered) != len(sizes):
            raise ConfigurationError(f"out must offer one tensor (or None) per group: {len(offered)} for {len(sizes)}")
        out = []
        for r, n, o in zip(rows, sizes, offered):
            fits = (o is not None and o.device.type == "cpu" and tuple(o.shape) == (n, d) and o.dtype == dtype
                    and o.is_contiguous())
            out.append(r if r is not None else o if fits else torch.empty(n, d, dtype=dtype))
        compute = self.compute_device
        if compute is not None and torch.device(compute).type != "cpu":
            if Uk.shape[1]:
                whole = whole_room(Uk.shape[1], d, dtype, self.work_room_bytes)
                _streamed_ritz_into(blocks, Uk, torch.device(compute), [t for t in out if t.shape[0]], whole=whole)
        elif Uk.shape[1]:
            _host_ritz_vectors(blocks, Uk, [t for t in out if t.shape[0]])
        self.basis_blocks = None
        return out


def form_ritz_vectors(blocks: list[torch.Tensor], Uk: torch.Tensor, compute_device: torch.device | None = None,
                      ) -> torch.Tensor:
    """The unit vectors ``V Uk`` (rows) of a basis stored in ``blocks``, in the basis's type, where the run
    computes: on the blocks' device, or on ``compute_device`` for a basis offloaded to host memory (the rows
    streamed over the bus). Cost: one pass over the basis, no matvec."""
    first = blocks[0]
    if is_host(first) and compute_device is not None and torch.device(compute_device).type != "cpu":
        return _streamed_ritz_vectors(blocks, Uk, torch.device(compute_device))
    if is_host(first):
        return _host_ritz_vectors(blocks, Uk)
    Uk = Uk.T.to(device=first.device, dtype=first.dtype)  # U lives on the host
    if len(blocks) == 1:
        X = Uk @ first
    else:  # block by block, summed in float32 at least: the blocks are never joined into a second basis
        X = torch.zeros(Uk.shape[0], first.shape[1], dtype=accumulation_dtype(first.dtype), device=first.device)
        s = 0
        for B in blocks:
            X += Uk[:, s : s + B.shape[0]] @ B
            s += B.shape[0]
    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True)
    return X.to(first.dtype)


def _streamed_ritz_vectors(blocks: list[torch.Tensor], Uk: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``V Uk`` normalized for a basis offloaded to host memory by a run on ``device``, the result there in the
    basis's type (:meth:`LanczosResult.ritz_vectors` brings it to the host): :func:`_streamed_ritz_into` with
    the result as its target. Measured on GPT-2 124M in bf16 (30 rows, the 1.5x plan): the host's pass took
    6.8 s; this one reads 7.5 GB over the bus. Device memory: the result and ``k + 1`` slices."""
    first = blocks[0]
    X = torch.empty(Uk.shape[1], first.shape[1], dtype=first.dtype, device=device)
    _streamed_ritz_into(blocks, Uk, device, [X])
    return X


# columns of the Ritz vectors formed on the device at a time: the accumulators and a row's slice stay far below
# one d-vector (0.75 GB of float32 for two vectors at most)
RITZ_COLUMNS = 1 << 26


def whole_room(k: int, d: int, dtype: torch.dtype, room: int) -> torch.dtype | None:
    """The type in which ``k`` Ritz vectors of length ``d`` are held whole on the device within ``room`` bytes
    (:func:`_streamed_ritz_into`): the accumulation type, else (half types) their own type beside accumulators of
    :data:`RITZ_COLUMNS` columns, else None (slices only)."""
    acc = accumulation_dtype(dtype)
    if k * d * acc.itemsize <= room:
        return acc
    if acc != dtype and k * (d * dtype.itemsize + min(d, RITZ_COLUMNS) * acc.itemsize) <= room:
        return dtype
    return None


def _streamed_ritz_into(blocks: list[torch.Tensor], Uk: torch.Tensor, device: torch.device,
                        targets: list[torch.Tensor], whole: torch.dtype | bool | None = None) -> None:
    """``V Uk`` normalized into ``targets`` (2-D tensors holding the rows in order, on the host or on ``device``)
    for a basis offloaded to host memory by a run on ``device``: :data:`RITZ_COLUMNS` columns at a time, each
    row's slice brought over and added into float32 (float64 for float64) accumulators there. Every row crosses
    the bus once. Half types are rounded twice (the slice, then the quotient), as on the host's pass.

    With ``whole`` (the type of ``k`` whole vectors the device holds: a lean run's released working vectors,
    :func:`whole_room`) the vectors are divided by their norms there and copied out once, asynchronously into
    page-locked targets: no pass over them on the host (the 1.1B Llama's two fp32 Ritz vectors took 1.76 s the
    other way, with a blocking copy per slice and the division on the host). Whole in a half type (its float32
    accumulators one slice of columns at a time; two float32 vectors of the 1.1B Llama in bf16 were its run's
    peak, 8.8 GB) the slices are rounded into them and divided in float32 slice by slice. Else the device holds
    ``k + 1`` slices (whole float32 accumulators and a row took 11 GB for its two bf16 Ritz vectors, more than
    its products), each slice of the result copied to its targets with its squared norms, then each target row
    divided where it lives. The pass runs at the bus's speed (rows in, results out: 51.5 GB/s on an H200,
    benchmarks/ritz_pass.py), whole rows or slices alike. Cost: one pass over the basis, a pass over the targets,
    no matvec."""
    first = blocks[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    if whole is True:
        whole = acc
    # the coefficients as Python numbers: each row is added into each accumulator by one elementwise kernel that
    # reads the row in its own type. A rank-one addmm_ per row (k x 1 times 1 x d) ran at ~160 GB/s and held the
    # host until it finished: 1.36 s of the 1.1B Llama's fp32 pass of 10 rows, 23.7 GB/s in all against the
    # bus's 54 GB/s (benchmarks/ritz_pass.py, RESULTS.md section 6)
    coef = Uk.to(torch.float64).tolist()
    k, d = Uk.shape[1], first.shape[1]
    sq = torch.zeros(k, dtype=torch.float64, device=device)
    X = torch.zeros(k, d, dtype=acc, device=device) if whole == acc else None
    if whole and whole != acc:
        X = torch.empty(k, d, dtype=whole, device=device)
    async_out = all(T.device == device or _pinned(T) for T in targets)
    pinned = [_pinned(B) for B in blocks]
    # one device slice reused for every copy (in order on this stream: a copy waits for the adds reading it)
    buf = torch.empty(min(d, RITZ_COLUMNS), dtype=first.dtype, device=device)
    for c in range(0, d, RITZ_COLUMNS):
        e = min(d, c + RITZ_COLUMNS)
        Xs = X[:, c:e] if whole == acc else torch.zeros(k, e - c, dtype=acc, device=device)
        i = 0
        for B, pin in zip(blocks, pinned):
            for r in range(B.shape[0]):
                _add_row(Xs, coef[i], buf[: e - c].copy_(B[r, c:e], non_blocking=pin))
                i += 1
        sq += torch.linalg.vector_norm(Xs, dim=1).double().square()
        if whole and whole != acc:
            X[:, c:e].copy_(Xs)
        elif not whole:
            _copy_rows(Xs.to(first.dtype), targets, c, e, async_out)
    if whole:
        norms = sq.sqrt().to(acc)[:, None]
        if whole == acc:
            X.div_(norms)
        for c in range(0, d, RITZ_COLUMNS):
            e = min(d, c + RITZ_COLUMNS)
            part = X[:, c:e].to(first.dtype) if whole == acc else X[:, c:e].to(acc).div_(norms).to(first.dtype)
            _copy_rows(part, targets, c, e, async_out)
        if async_out and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return
    norms = sq.sqrt().cpu()  # waits for the copies on this stream too
    i = 0
    for T in targets:
        for row in T:
            row.div_(float(norms[i]))  # a Python scalar: no float32 copy of the row (mixed types on the CPU)
            i += 1


def _add_row(X: torch.Tensor, coef: list[float], row: torch.Tensor) -> None:
    """``X[j] += coef[j] row`` for each accumulator row ``j``, in ``X``'s type (the row converted as it is read)."""
    for j, c in enumerate(coef):
        X[j].add_(row, alpha=c)


def _copy_rows(Xs: torch.Tensor, targets: list[torch.Tensor], c: int, e: int, non_blocking: bool) -> None:
    """Rows of ``Xs`` (columns ``c:e`` of the stacked result) into the targets' columns ``c:e``, in order;
    ``non_blocking`` where every target is page-locked or on the device (the caller synchronizes before
    reading them on the host; the slice's memory is reused only by later work on this stream)."""
    s = 0
    for T in targets:
        T[:, c:e].copy_(Xs[s : s + T.shape[0]], non_blocking=non_blocking)
        s += T.shape[0]


def _host_ritz_vectors(blocks: list[torch.Tensor], Uk: torch.Tensor,
                       targets: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """``V Uk`` normalized, for a basis in host memory: one chunked pass over the basis through reusable float32
    scratch (:func:`.host_arith.host_rotate`), written once into the result (or into ``targets``, 2-D tensors
    holding the rows in order, which may be the basis's own rows), then each row divided by its norm in
    place. Half types are rounded twice (the product, then the quotient): at most ``2u`` relative per entry
    besides the float32 sums, where the single-block product before rounded ``Uk`` to the basis's type too."""
    first = blocks[0]
    out = torch.empty(Uk.shape[1], first.shape[1], dtype=first.dtype) if targets is None else None
    targets = [out] if targets is None else targets
    sq = host_rotate(blocks, Uk, targets, norms=True)
    i = 0
    for T in targets:
        for row in T:
            row.div_(float(sq[i].sqrt()))  # a Python scalar: no float32 copy of the row (mixed types on the CPU)
            i += 1
    return out


def _pinned(t: torch.Tensor) -> bool:
    """Whether host tensor ``t`` is page-locked; False without asking where CUDA was never initialized (no
    page-locked memory can exist then, and the query must not create a CUDA context for a CPU run)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and t.is_pinned()


def spent_rows(blocks: list[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor | None]:
    """For each group of ``sizes[i]`` rows, a ``(sizes[i], d)`` view of rows of a spent basis's ``blocks`` to
    write results into, or None where none fits: the first page-locked block with that many rows unclaimed
    (page-locked memory stays in torch's cache once freed, so holding a whole block for a few rows costs
    nothing), or a pageable block of exactly that many rows (a larger one, held by a view of a few of its
    rows, would keep memory that is otherwise freed)."""
    used = [0] * len(blocks)
    out: list[torch.Tensor | None] = []
    for n in sizes:
        found = None
        for j, B in enumerate(blocks):
            if _pinned(B):
                fits = B.shape[0] - used[j] >= n
            else:  # the whole storage, not the filled rows of a larger block
                fits = used[j] == 0 and B.shape[0] == n and B.untyped_storage().nbytes() == B.numel() * B.element_size()
            if fits and n:
                found = B[used[j] : used[j] + n]
                used[j] += n
                break
        out.append(found)
    return out


def check_lanczos_args(dim: int, k: int, tol: float, which: str, bound: str, max_iter: int | None) -> int:
    """Validate the options shared by the plain and the restarted run; return the step budget ``m_max``."""
    check_dim(dim)
    if which not in ("both", "largest", "smallest"):
        raise ConfigurationError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    if k < 1 or not (math.isfinite(tol) and tol >= 0):
        # a NaN tol compares false everywhere and an infinite one accepts any bound: both would "converge"
        raise ConfigurationError(f"need k >= 1 and a finite tol >= 0, got k={k}, tol={tol}")
    if bound not in ("residual", "gap"):
        raise ConfigurationError(f"bound must be 'residual' or 'gap', got {bound!r}")
    m_max = min(dim, max_iter if max_iter is not None else 300)
    if m_max < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}")
    return m_max


def tridiagonal(alphas: list[float], off: list[float]) -> torch.Tensor:
    """The float64 tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``off``."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if off:
        o = torch.tensor(off, dtype=torch.float64)
        T += torch.diag(o, 1) + torch.diag(o, -1)
    return T


def gap_bounds(theta: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Quadratic error bounds ``min(r_i, r_i^2 / g_i)`` of Ritz values ``theta`` (ascending) with residual
    bounds ``r_i``, where ``g_i`` is the gap to the nearest other Ritz value less that value's own bound
    (the residual bound where that gap does not exceed ``r_i``).

    >>> gap_bounds(torch.tensor([1.0, 5.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64))
    tensor([0.0641, 0.0029], dtype=torch.float64)
    """
    n = len(theta)
    if n < 2:
        return bounds
    dist = (theta[:, None] - theta[None, :]).abs() - bounds[None, :]
    dist.fill_diagonal_(float("inf"))
    gap = dist.min(1).values
    refined = torch.where(gap > bounds, bounds**2 / gap.clamp_min(1e-300), bounds)
    return torch.minimum(bounds, refined)


def extremes_converged(theta: torch.Tensor, bounds: torch.Tensor, k: int, tol: float, which: str) -> bool:
    """Whether the ``k`` Ritz values at the ``which`` end(s) have bounds below ``tol * max(|theta_i|, spread)``."""
    n = len(theta)
    need = 2 * k if which == "both" else k
    if n < need or n < 2:
        return False
    spread = float(theta[-1] - theta[0])
    idx: list[int] = []
    if which in ("both", "smallest"):
        idx += list(range(k))
    if which in ("both", "largest"):
        idx += list(range(n - k, n))
    return all(float(bounds[i]) <= tol * max(abs(float(theta[i])), spread) for i in idx)


def prefetch_solver(wait: bool = False) -> None:
    """Import the tridiagonal solver's module (scipy.linalg, ~0.2 s) if no one has yet: on a daemon thread, or
    here with ``wait``. A Lanczos run calls this before its first product, so the import runs beside it instead
    of after it (0.2 s of the 3.2 s a 10M-parameter MLP's spectrum spent outside its products on the CPU); a
    GeometryProbe imports it when built (``wait``), so that its first probe is timed as the later ones are. An
    import the run reaches first waits for this one (the import lock), so nothing is imported twice."""
    if "scipy.linalg" in sys.modules:
        return
    if wait:
        importlib.import_module("scipy.linalg")
        return
    threading.Thread(target=importlib.import_module, args=("scipy.linalg",), name="geomprobe-import-scipy",
                     daemon=True).start()


def eigh_tridiagonal(alphas: list[float], off: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors, float64 on the CPU, of the tridiagonal matrix with diagonal
    ``alphas`` and off-diagonal ``off``.

    LAPACK's tridiagonal solver (``stemr``) on one thread: a Lanczos run solves this problem at every step,
    and the dense multithreaded ``eigh`` took 37 ms per call for 126 steps on a GPU host whose cores another
    process also used (0.5 ms here), most of a GPT-2 spectrum's time outside its HVPs."""
    from scipy.linalg import eigh_tridiagonal as _stemr

    theta, U = _stemr(np.asarray(alphas, dtype=np.float64), np.asarray(off, dtype=np.float64))
    return torch.from_numpy(theta), torch.from_numpy(np.ascontiguousarray(U))


def ritz_pairs(S: torch.Tensor | tuple[list[float], list[float]], beta: float, bound: str,
               dim: int, widen: Callable[[torch.Tensor], torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Ritz values (ascending) and vectors of the projected matrix ``S`` with their bounds, and whether the
    Krylov space is exhausted (``beta`` at rounding level against ``max |theta|``: the bounds are then 0).
    ``S`` may be given as ``(alphas, off)``, a tridiagonal's diagonal and off-diagonal
    (:func:`eigh_tridiagonal`).

    The bound of ``theta_i`` is ``beta |u_{m,i}|`` (the residual ``||H y_i - theta_i y_i||``), or with
    ``bound="gap"`` the quadratic :func:`gap_bounds`. ``widen(U)``: factors (one per Ritz value) multiplying
    the residuals first (a basis that is orthogonal only to a tolerance, :mod:`.orthogonality`).
    """
    theta, U = eigh_tridiagonal(*S) if isinstance(S, tuple) else torch.linalg.eigh(S)
    bounds = beta * U[-1, :].abs()
    if widen is not None:
        bounds = bounds * widen(U)
    if bound == "gap":
        bounds = gap_bounds(theta, bounds)
    scale = max(float(theta.abs().max()), 1e-300)
    exhausted = beta <= 1e-12 * scale * math.sqrt(dim)
    if exhausted:
        bounds = torch.zeros_like(bounds)
    return theta, U, bounds, exhausted


def extremes_certified(theta: torch.Tensor, errors: tuple[float, float], tol: float, which: str) -> bool:
    """Whether the certified extreme errors ``(e_min, e_max)`` at the ``which`` end(s) are below
    ``tol * max(|theta|, spread)``, the scale :func:`extremes_converged` uses."""
    spread = float(theta[-1] - theta[0])
    ends = []
    if which in ("both", "smallest"):
        ends.append((errors[0], float(theta[0])))
    if which in ("both", "largest"):
        ends.append((errors[1], float(theta[-1])))
    return all(e <= tol * max(abs(t), spread) for e, t in ends)


def certificate_limits(theta: torch.Tensor, tol: float) -> tuple[float, float]:
    """The largest certified errors (``e_min``, ``e_max``) that :func:`extremes_certified` accepts."""
    spread = float(theta[-1] - theta[0])
    return tol * max(abs(float(theta[0])), spread), tol * max(abs(float(theta[-1])), spread)
