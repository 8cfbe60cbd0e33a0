"""Lanczos steps whose whole-basis Gram-Schmidt pass runs beside the matvec, the product corrected afterwards.

A basis offloaded to host memory is read over the bus at every whole-basis pass (``m d`` bytes at step ``m``),
and where every step needs one (a half-precision HVP leaks ``~2e-3 beta`` per step along the basis, so
partial reorthogonalization runs whole-basis passes throughout, :mod:`.orthogonality`) that traffic was a third
of a GPT-2 124M bf16 spectrum under the 1.5x memory plan: 40 of 116 s, the device waiting for the bus
(benchmarks/RESULTS.md section 6, ninth round). The pass cannot simply start earlier, since the next matvec's
input is the vector it produces. It does not need to: the matvec is linear and the Lanczos relation says what
``H`` does to the stored vectors, so the matvec can take the candidate ``x`` (the three-term step's result,
normalized) before its projection is known and the product be corrected afterwards.

Step, with ``Q = [q_0 .. q_m]`` stored and orthonormal, ``T_m`` the tridiagonal so far and ``beta_m`` the
coupling to the next vector: the matvec computes ``y = H x`` while a second stream reads the basis once, a row
at a time, projecting a copy of ``x`` against it (modified Gram-Schmidt: ``z = x - Q c``, ``c = Q^T x``) and
accumulating ``Q T_m c`` (row ``k``'s coefficient ``beta_{k-1} c_{k-1} + alpha_k c_k + beta_k c_{k+1}``, so the
previous row stays on the device). Then, exactly in exact arithmetic, with ``n = ||z||``::

    q_{m+1} = z / n
    H Q c   = Q T_m c + beta_m c_m q_{m+1}                           (the Lanczos relation)
    H q_{m+1} = (y - Q T_m c - beta_m c_m q_{m+1}) / n
    alpha_{m+1} = q_{m+1}^T H q_{m+1} = z^T y / n^2 - beta_m c_m / n  (q_{m+1} orthogonal to Q)

and the next candidate ``w = H q_{m+1} - alpha_{m+1} q_{m+1} - beta_m q_m`` is formed on the device from ``y``,
the accumulated ``Q T_m c``, ``q_{m+1}`` and ``q_m``: its parts along the basis are the product's own leak, as
after the ordinary three-term step (leaving ``Q T_m c`` to the next projection instead grows them by
``||T|| / beta`` a step). ``beta_{m+1} = ||w|| n'`` once the next projection is known, and ``q_{m+1}`` is stored
during the next product. Each step reads the basis once, on its own stream, while the matvec runs: on a GPU the
copies take the copy engines and the products a few percent of the device, and the step's time outside the
matvec is its two host synchronizations.

What is dropped, and its size: the relation ``H Q = Q T + beta q e^T`` holds to the local error of the run (the
matvec's own error along the basis, and rounding), so the product's correction ``Q T_m c`` carries that error
times ``|c|``, the loss of orthogonality one step leaks (``|c| ~ 2e-3`` for bf16 products, rounding for float32
and float64): a second-order term, ``~4e-6 beta`` relative for bf16, against the first-order error of the
product itself. The projection is classical Gram-Schmidt once per step, as the full run's; when it removes
most of the candidate (``n < 1/sqrt(2)``, near an invariant subspace) one pass is not enough, and the run hands
the step back to the ordinary loop (a second pass, and the product again, counted).

The result: the full run's tridiagonal to the order above, one step later (the stopping test for ``T_m`` needs
``beta_m``, known after the matvec of step ``m + 1`` has run: a run that stops has taken one matvec more than
the full run would, counted in ``matvecs``). ``tests/test_delayed_lanczos.py`` checks it against the full run
and known spectra.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .krylov_basis import REPASS, LanczosBasis
from .vectors import Matvec, row_dots, sub_rows

__all__ = ["DELAYED_EXTRA_VECTORS", "DELAYED_FROM_STEP", "DelayedState", "delayed_due", "run_delayed"]

# A run hands its whole-basis passes to this loop once it has this many vectors: earlier, a pass reads little
# and the loop's one extra matvec at the end would cost more than the overlap saves (a warm start's 6 steps).
DELAYED_FROM_STEP = 12


# d-vectors the delayed loop holds on the device beside a product beyond the ordinary offloaded step's (the
# memory plan's four working vectors): the candidate's projection z and the correction u; the candidate x, the
# newest vector and the two rows in flight take the ordinary step's w, newest, previous and Ritz slots.
# Measured: GPT-2 124M bf16 under the 1.5x plan, probe peak 1.14x -> 1.41x of training with the previous
# vector also kept (no longer).
DELAYED_EXTRA_VECTORS = 2


def delayed_due(basis: LanczosBasis, every_step: bool, steps: int) -> bool:
    """Whether a run continues in the delayed loop: its basis is offloaded from a CUDA device to host memory,
    its remaining steps all take a whole-basis pass (``every_step``), and it has :data:`DELAYED_FROM_STEP`
    vectors; never for a lean basis (the loop holds more d-vectors on the device than it keeps)."""
    return (every_step and basis.offloaded and not basis.lean and torch.device(basis.compute).type == "cuda"
            and not basis.space.sharded and steps >= DELAYED_FROM_STEP)


@dataclass
class DelayedState:
    """Where the delayed loop ended: ``stop`` (the test asked for it; ``beta`` the residual coupling of the last
    tridiagonal, ``alphas``/``betas`` as the ordinary loop keeps them) or a hand-back (``stop`` False:
    ``cur``/``prev`` the last two stored vectors and ``w`` the next one, orthogonalized, of norm ``beta``, for the
    ordinary loop to continue from; on a stop ``w`` is that residual too). ``extra_matvecs``: products taken that the tridiagonal does not use."""

    stop: bool
    beta: float
    cur: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    w: torch.Tensor | None = None
    extra_matvecs: int = 0
    exhausted: bool = False
    timing: dict[str, float] | None = None  # seconds by part, where the loop keeps them (delayed_host.py)


def _row(basis: LanczosBasis, k: int) -> torch.Tensor:
    """Stored row ``k`` where it lives."""
    b, i = divmod(k, basis.block)
    return basis.blocks[b][i]


def _rows(basis: LanczosBasis, device: torch.device, tail: torch.Tensor | None):
    """The stored rows one at a time on ``device`` (copied over when offloaded), then ``tail`` (a row not
    stored yet, already there)."""
    for B in basis._filled():
        for r in range(B.shape[0]):
            yield B[r : r + 1].to(device, non_blocking=basis.pin)
    if tail is not None:
        yield tail[None]


def _project(basis: LanczosBasis, device: torch.device, z: torch.Tensor, u: torch.Tensor,
             ab: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
    """One read of the rows ``q_0 .. q_m`` (the stored ones, then ``tail``; a row at a time, the previous one
    kept): ``z`` projected against them in place (modified Gram-Schmidt), their coefficients ``c`` returned (on
    the device), and ``Q (T_m c)`` subtracted from ``u`` in place, ``T_m`` the tridiagonal of
    ``ab = [alphas | betas]`` (``(T c)_k = beta_{k-1} c_{k-1} + alpha_k c_k + beta_k c_{k+1}``: row ``k``'s term
    waits for ``c_{k+1}``, so the previous row stays on the device). No host synchronization."""
    m1 = basis.n + (tail is not None)
    alphas, betas = ab[:m1], ab[m1:]
    cs: list[torch.Tensor] = []
    last = None
    for row in _rows(basis, device, tail):
        ck = row_dots(row, z)
        sub_rows(z, ck, row)
        cs.append(ck)
        if last is not None:
            k = len(cs) - 2
            t = alphas[k] * cs[k] + betas[k] * cs[k + 1] + (betas[k - 1] * cs[k - 1] if k > 0 else 0.0)
            sub_rows(u, t, last)
        last = row
    k = len(cs) - 1
    t = alphas[k] * cs[k] + (betas[k - 1] * cs[k - 1] if k > 0 else 0.0)
    sub_rows(u, t, last)
    return torch.cat(cs)


def run_delayed(matvec: Matvec, basis: LanczosBasis, cur: torch.Tensor,
                w: torch.Tensor, beta: float, alphas: list[float], betas: list[float],
                test: Callable[[float], bool]) -> DelayedState:
    """Continue a Lanczos run whose next steps each take a whole-basis pass, the pass beside the matvec
    (module docstring).

    On entry ``basis`` holds ``q_0 .. q_m`` (``cur = q_m`` on the compute device),
    ``alphas`` ``m + 1`` values, ``betas`` ``m + 1`` (the last, ``beta``, the norm of ``w``: the next vector,
    orthogonalized, not stored). ``test(beta_m)`` is called once ``T_m`` (``alphas``, ``betas[:-1]``, updated in
    place) and its coupling ``beta_m`` are final and says whether the run stops there (it must stop the run at
    its step limit). Cost: one matvec per step; one read of the basis per step on a second stream beside it;
    two small host synchronizations per step; over a whole run one matvec more than the ordinary loop (the
    last step's, taken before its test: ``extra_matvecs``). Device memory: five d-vectors and two basis rows
    in flight."""
    space = basis.space
    device = torch.device(basis.compute)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    main = torch.cuda.current_stream(device) if side is not None else None
    on_side = (lambda: torch.cuda.stream(side)) if side is not None else contextlib.nullcontext
    acc = torch.float64 if basis.dtype == torch.float64 else torch.float32

    def settle() -> None:
        if side is not None:
            side.synchronize()  # rows written out must be in host memory before the host reads them

    x = w.div_(beta)  # the candidate for q_{m+1}: orthogonalized already, so its c is at rounding level
    raw_norm = beta
    step = len(alphas)
    while True:
        # z becomes x - Q c (n q_{m+1}) and u = -Q T_m c, both on the side stream while the product runs
        z = x.clone()
        u = torch.zeros_like(x)
        ab = torch.tensor(alphas + betas[:-1], dtype=acc, device=device)
        if side is not None:
            side.wait_stream(main)
        with on_side():
            tail = cur if basis.n < len(alphas) else None  # q_m, formed in the last step, not stored yet
            c_dev = _project(basis, device, z, u, ab, tail)
            zz = row_dots(z[None], z).to(acc)
            if tail is not None:
                # stored after the reads are queued: its copy out, and the allocation of the next page-locked
                # block it may start (pinned_blocks.py), then run beside the product
                basis.append(tail)
        y = matvec(x).reshape(basis.dim).to(basis.dtype)
        if side is not None:
            main.wait_stream(side)
        packed = torch.cat([c_dev.to(torch.float64), zz.double(), row_dots(z[None], y).double()]).cpu()
        step += 1
        if not bool(torch.isfinite(packed).all()):
            raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")
        c_m, nsq, zy = float(packed[-3]), float(packed[-2]), float(packed[-1])
        n = math.sqrt(max(nsq, 0.0))
        beta_m = raw_norm * n
        betas[-1] = beta_m
        if test(beta_m):
            settle()
            # z = n q_{m+1}: the residual beta_m q_{m+1}, for a thick restart to continue from
            return DelayedState(stop=True, beta=beta_m, w=z.mul_(raw_norm), extra_matvecs=1)
        if n < REPASS:
            # the projection removed most of x, where one pass is not enough: the ordinary loop takes the step
            # from z projected once more (this product is not used)
            settle()
            z, _c = basis.reorthogonalize(z, passes=1)
            nz = float(space.norm(z))
            betas[-1] = raw_norm * nz
            # q_{m-1} for the ordinary step, read back from the basis (the loop does not hold it on the device)
            prev = _row(basis, basis.n - 2)
            return DelayedState(stop=False, beta=raw_norm * nz, cur=cur, prev=prev.to(device), w=z.mul_(raw_norm),
                                extra_matvecs=1)
        q = z.div_(n)
        alpha = zy / nsq - beta_m * c_m / n
        alphas.append(alpha)
        # w = H q - alpha q - beta_m q_m with H q = (y - Q T_m c - beta_m c_m q) / n, in y's place
        w = y.add_(u).div_(n).sub_(q, alpha=alpha + beta_m * c_m / n).sub_(cur, alpha=beta_m)
        del u
        raw_norm = float(space.norm(w))
        if not math.isfinite(raw_norm):
            raise FloatingPointError(f"the matvec returned non-finite values at Lanczos step {step}")
        cur = q  # q_{m-1} is not kept on the device: only a hand-back needs it, and reads it back
        betas.append(raw_norm)  # provisional: beta_{m+1} = ||w|| n' once the next projection is known
        scale = max(abs(alpha), max(betas[:-1], default=0.0), 1e-300)
        if raw_norm <= 1e-12 * scale * math.sqrt(space.dim):
            # an invariant subspace: T_{m+1} is complete, nothing beyond it
            basis.append(cur)
            settle()
            betas[-1] = 0.0
            test(0.0)
            return DelayedState(stop=True, beta=0.0, exhausted=True)
        x = w.div_(raw_norm)
