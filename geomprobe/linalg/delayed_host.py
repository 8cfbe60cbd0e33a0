"""The delayed Lanczos loop of :mod:`.delayed_lanczos` for a basis and vectors in host memory, its projection on
a CPU thread beside a matvec that runs on an accelerator.

In the host-vector mode (a model whose vectors do not fit beside its graphs on the device, the 1B Llama under
the 1.5x plan) the HVP streams host vectors through the GPU, and every Lanczos step's arithmetic runs on the
host: with a half-precision product, a whole-basis Gram-Schmidt pass at every step (its asymmetry,
:mod:`.orthogonality`), over rows of 1.1e9 entries. Between the products those passes were 71 % of a spectrum
(benchmarks/RESULTS.md section 6, tenth round) while the host's cores waited during each product. Here the
projection of the candidate runs on a worker thread while the main thread runs the product, and the product is
corrected through the Lanczos relation exactly as :mod:`.delayed_lanczos` derives it; what stays between two
products is two fused passes over five d-vectors (:func:`.host_fused.host_combine`), whatever the basis's size.

Step, with ``X = r x`` the unnormalized candidate (``r = ||X||``; the matvec is linear, so it takes ``X`` as it
is and no pass normalizes it):

- worker: store the previous step's vector ``q_m = Z / ||Z||`` as the basis's next row, then ``c = Q^T X / r``
  (one read of the rows, :func:`.host_arith.lanczos_pass`), then ``Z = X - Q (r c)`` and ``U = -Q (T_m c)`` with
  ``||Z||^2`` (one more read, :func:`.host_fused.host_project`);
- main thread, meanwhile: ``Y = H X``;
- then ``n = ||Z|| / r``, ``beta_m = ||Z||``, ``s = beta_m c_m / n`` and
  ``W' = Y / (r n) + U / n - s Z / ||Z|| - beta_m q_m`` with ``Z . Y`` from the same read (pass one),
  ``alpha = Z . Y / ||Z||^2 - s`` and ``X <- W' - alpha Z / ||Z||`` with its norm (pass two).

Memory: four host d-vectors besides the basis (``X``, the product ``Y``, ``Z``, ``U``). Cost per step: one
matvec; two reads of the basis on the worker; the two passes (nine d-vector reads and writes) and two
waits on the main thread. A run takes one matvec more than the ordinary loop (the last step's), and hands a
step back to the ordinary loop where one projection is not enough (``n < 1/sqrt(2)``), as the device loop does.
``tests/test_delayed_host.py`` checks it against the ordinary loop and known spectra.

Measured (benchmarks/RESULTS.md section 6, twelfth round: the 1B Llama in bf16 on an H200's 16-core host), the
share of the spectrum outside the products fell from 69 to 54 %, but each product took 2.1x as long beside the
worker's bf16 passes (the streamed HVP's own host work shares the cores and the memory bandwidth), and the
probe 124 s against 98 s. The loop is therefore opt-in (``lanczos(delayed="host")``): the metrics keep the
passes between the products. It pays where the host arithmetic is cheap next to the product (float32 rows run
at copy speed) and the product leaves the host idle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .delayed_lanczos import DelayedState, _row
from .host_arith import lanczos_pass, row_groups
from .host_fused import host_combine, host_project
from .krylov_basis import REPASS, LanczosBasis, host_vector, orthogonalize_step
from .vectors import Matvec, matvec_into

__all__ = ["DELAYED_HOST_FROM_STEP", "delayed_host_due", "run_delayed_host"]

# The host loop starts earlier than the device loop (step 12): a host pass over a few rows of a 1e9-entry model
# already costs about a product (bf16 rows at ~10 GB/s on 16 cores), so the one extra matvec a delayed run takes
# is repaid within a step or two.
DELAYED_HOST_FROM_STEP = 4
# share of the caller's threads the projection beside the matvec takes
SIDE_SHARE = 0.5


def delayed_host_due(basis: LanczosBasis, every_step: bool, steps: int) -> bool:
    """Whether a run whose matvec runs elsewhere (an accelerator streaming host vectors) continues in the host
    loop: its basis and vectors are in host memory, its remaining steps all take a whole-basis pass, it is not
    sharded, and it has :data:`DELAYED_HOST_FROM_STEP` vectors."""
    return every_step and basis.on_host and not basis.space.sharded and steps >= DELAYED_HOST_FROM_STEP


def _tridiagonal_times(alphas: list[float], betas: list[float], c: torch.Tensor) -> torch.Tensor:
    """``T c`` for the tridiagonal with diagonal ``alphas`` (``n`` values) and off-diagonal ``betas[:n-1]``."""
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
    t = a * c
    t[:-1] += b * c[1:]
    t[1:] += b * c[:-1]
    return t


def _finite(values: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")


def run_delayed_host(matvec: Matvec, basis: LanczosBasis, cur: torch.Tensor, w: torch.Tensor, beta: float,
                     alphas: list[float], betas: list[float], test: Callable[[float], bool]) -> DelayedState:
    """Continue a Lanczos run on host vectors whose next steps each take a whole-basis pass, the pass on a
    worker thread beside the matvec (module docstring). The contract of
    :func:`.delayed_lanczos.run_delayed`: on entry ``basis`` holds ``q_0 .. q_m`` (``cur = q_m``, a stored
    row), ``alphas`` ``m + 1`` values, ``betas`` ``m + 1`` (the last, ``beta``, the norm of ``w``, the next
    vector orthogonalized and not stored); ``test(beta_m)`` says whether the run stops at the final ``T_m``.
    Cost: one matvec per step, one more per run; two reads of the basis per step on the worker; two fused
    passes over five d-vectors between products. Host memory: four d-vectors besides the basis."""
    X = host_vector(w.shape[0], w.dtype)  # page-locked: the product's pieces copy asynchronously
    X.copy_(w)
    Y = basis.work_buffer()  # w may be it: X holds the copy
    Z, U = torch.empty_like(X), torch.empty_like(X)
    r = beta
    step = len(alphas)
    # the projection's column workers take part of the caller's cores: the streamed matvec does host work of its
    # own (its input's page-locked copy, the partial sums added on the host), and with every core busy beside
    # it a 1B model's products took 5.2 s instead of 2.4 (benchmarks/RESULTS.md section 6, twelfth round)
    side_threads = max(1, int(torch.get_num_threads() * SIDE_SHARE))
    pending: tuple[torch.Tensor, float] | None = None  # q_m as Z and ||Z||, to be stored by the next worker call

    # seconds by part, for benchmarks: the products, the worker's projections, the main thread's wait for them
    # after each product, and its two passes
    timing = {"steps": 0, "matvec": 0.0, "worker": 0.0, "wait": 0.0, "passes": 0.0}

    def project(pending, r):
        t0 = time.perf_counter()
        row = None
        if pending is not None:
            row = basis._next_row()
            torch.div(pending[0], pending[1], out=row)
        groups = row_groups(list(basis._filled()))
        c = lanczos_pass(X, groups, dots=True)[0] / r
        t = _tridiagonal_times(alphas, betas, c)
        nsq = host_project(X, groups, c * r, t, Z, U)
        timing["worker"] += time.perf_counter() - t0
        return row, c, nsq

    # torch's thread count is per thread: the worker's setting leaves the caller's as it was
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lanczos-projection",
                            initializer=torch.set_num_threads, initargs=(side_threads,)) as worker:
        while True:
            job = worker.submit(project, pending, r)
            t0 = time.perf_counter()
            try:
                matvec_into(matvec, X, Y)
            finally:
                t1 = time.perf_counter()
                row, c, nsq = job.result()  # the worker is never left writing into buffers a failure drops
            t2 = time.perf_counter()
            timing["steps"] += 1
            timing["matvec"] += t1 - t0
            timing["wait"] += t2 - t1
            if row is not None:
                cur = row
            step += 1
            _finite(torch.cat([c, torch.tensor([nsq])]), step)
            c_m = float(c[-1])
            nz = math.sqrt(max(nsq, 0.0))
            n = nz / r
            beta_m = nz
            betas[-1] = beta_m
            if test(beta_m):
                # Z = beta_m q_{m+1}: the residual, for a thick restart to continue from
                return DelayedState(stop=True, beta=beta_m, w=Z, extra_matvecs=1, timing=timing)
            if n < REPASS:
                # one projection removed most of X: the ordinary loop takes the step from Z projected once more
                # (this product is not used)
                Z, b = orthogonalize_step(basis, Z, nz, step)
                betas[-1] = b
                return DelayedState(stop=False, beta=b, cur=cur, prev=_row(basis, basis.n - 2), w=Z, extra_matvecs=1,
                                    timing=timing)
            s = beta_m * c_m / n
            t0 = time.perf_counter()
            # W' into Y's place, with Z . Y read before it is overwritten
            zy = float(host_combine(Y, [(Y, 1 / (r * n)), (U, 1 / n), (Z, -s / nz), (cur, -beta_m)],
                                    before=[(2, 0)])[0])
            alpha = zy / nsq - s  # q . H x / n - s with Z = r n q and Y = H X = r H x
            alphas.append(alpha)
            r_sq = float(host_combine(X, [(Y, 1.0), (Z, -alpha / nz)], after=[-1])[0])
            _finite(torch.tensor([zy, r_sq]), step)
            r = math.sqrt(max(r_sq, 0.0))
            timing["passes"] += time.perf_counter() - t0
            betas.append(r)  # provisional: beta_{m+1} = ||Z'|| once the next projection is known
            pending = (Z, nz)
            scale = max(abs(alpha), max(betas[:-1], default=0.0), 1e-300)
            if r <= 1e-12 * scale * math.sqrt(basis.space.dim):
                # an invariant subspace: T_{m+1} is complete, nothing beyond it
                torch.div(Z, nz, out=basis._next_row())
                betas[-1] = 0.0
                test(0.0)
                return DelayedState(stop=True, beta=0.0, exhausted=True, timing=timing)
