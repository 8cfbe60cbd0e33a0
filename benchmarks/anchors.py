"""Other libraries' Hessian eigenvalue solvers at their defaults, as anchors for accuracy per HVP.

Anchors (``ANCHORS``), each called as ``fn(model, loss_fn, x, y, device, seed)`` on one batch ``(x, y)``:

  curvlinops_eigsh          curvlinops' ``HessianLinearOperator(...).to_scipy()`` into ``scipy.sparse.linalg.eigsh``
                            (ARPACK's implicitly restarted Lanczos) at its defaults but for ``k=1``: ``which="LA"``
                            for lambda_max, ``which="SA"`` for lambda_min, ``tol=0`` (machine precision of the
                            float64 operator ``to_scipy()`` gives by default), ``ncv`` 20.
  curvlinops_eigsh_tol1e-3  the same with ``tol=1e-3``.
  eigenthings_power         hessian-eigenthings' ``power_iteration_one`` at its defaults (``max_iter`` 100, ``tol``
                            1e-4 on both the relative change and the relative residual): the eigenvalue of largest
                            magnitude, reported as lambda_max; no lambda_min.
  eigenthings_lanczos       hessian-eigenthings' ``lanczos`` at its defaults (``k`` 10, so ``max_iter`` 20 steps,
                            full reorthogonalization, no early stop: ``tol`` only sets the ``converged`` flags),
                            once with ``which="LM"`` (the default; lambda_max is the largest returned Ritz value)
                            and once with ``which="SA"`` for lambda_min.
  eigenthings_lanczos_k1    the same with ``k=1``, the call for one eigenvalue: ``max_iter`` becomes 2.

Each returns ``{"lmax": float, "lmin": float | None, "hvps": int, "seconds": float}`` and the parts:
``lmax_hvps``, ``lmin_hvps``, ``setup_hvps`` (products made while building the operator), the matching
``*_seconds`` (device-synchronized wall time), and ``lmax_converged`` / ``lmin_converged`` where the library
reports them. ``hvps`` and ``seconds`` are the totals. The library is imported on the call, so a missing one
raises ImportError there; any failure of the library propagates.

HVPs are counted inside the library's own operator, through a subclass that only adds a counter to the method
every product passes through, and calls the library's method:

  curvlinops   ``HessianLinearOperator._matmat_batch(X, y, M)``: one call per mini-batch per product, ``M`` in
               tensor-list format with K columns; counted K per call, one batch here, so one per HVP. This also
               sees the two products of the constructor's determinism check (``check_deterministic=True`` is
               the default), reported as ``setup_hvps``; the check's two gradient passes are not HVPs.
  eigenthings  ``HessianOperator.matvec(v)``: one batch here, so one HVP per call.

A run that passes ``budget`` HVPs raises ``HVPBudgetExceeded``: ARPACK's default ``maxiter`` is 10 n restarts,
so at ``tol=0`` nothing else bounds it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import sync  # noqa: E402

DEFAULT_BUDGET = 2000


class HVPBudgetExceeded(RuntimeError):
    """An anchor asked for more HVPs than the benchmark allows one call."""


class _Counter:
    def __init__(self, budget: int):
        self.n, self.budget = 0, budget

    def add(self, k: int = 1) -> None:
        self.n += k
        if self.n > self.budget:
            raise HVPBudgetExceeded(f"more than {self.budget} HVPs without converging")


def _timed(device, fn: Callable[[], object]) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def _loss_module(loss_fn) -> torch.nn.Module:
    """curvlinops needs the loss as an ``nn.Module`` with a ``reduction``; a plain function (the transformer's
    token-mean cross-entropy) is wrapped as ``"mean"``. With a single batch the normalization factor curvlinops
    derives from ``reduction`` is 1 either way (batch size over data size), so the Hessian is the batch loss's."""
    if isinstance(loss_fn, torch.nn.Module):
        return loss_fn

    class _Loss(torch.nn.Module):
        reduction = "mean"

        def forward(self, out, target):
            return loss_fn(out, target)

    return _Loss()


def _totals(r: dict) -> dict:
    r["hvps"] = r.get("setup_hvps", 0) + r["lmax_hvps"] + r.get("lmin_hvps", 0)
    r["seconds"] = r.get("setup_seconds", 0.0) + r["lmax_seconds"] + r.get("lmin_seconds", 0.0)
    return r


def curvlinops_eigsh(model, loss_fn, x, y, device, seed: int, *, tol: float = 0.0,
                     budget: int = DEFAULT_BUDGET) -> dict:
    """lambda_max and lambda_min by ``eigsh(H, k=1, which="LA" / "SA", tol=tol)`` on curvlinops' Hessian exported
    with ``to_scipy()`` (float64 for ARPACK, float32 products). ``v0`` is drawn from ``seed`` (ARPACK would
    draw its own) so seeds give different starts; everything else is scipy's default."""
    import numpy as np
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    count = _Counter(budget)

    class Counted(HessianLinearOperator):
        def _matmat_batch(self, X, y, M):
            count.add(M[0].shape[-1])
            return super()._matmat_batch(X, y, M)

    params = [p for p in model.parameters() if p.requires_grad]
    H, t_setup = _timed(device, lambda: Counted(model, _loss_module(loss_fn), params, [(x, y)]).to_scipy())
    r = {"setup_hvps": count.n, "setup_seconds": t_setup}
    v0 = np.random.default_rng(seed).standard_normal(H.shape[0])
    for end, which in (("lmax", "LA"), ("lmin", "SA")):
        count.n = 0
        ev, t = _timed(device, lambda: eigsh(H, k=1, which=which, tol=tol, v0=v0, return_eigenvectors=False))
        r.update({end: float(ev[0]), f"{end}_hvps": count.n, f"{end}_seconds": t})
    return _totals(r)


def curvlinops_eigsh_tol1e3(model, loss_fn, x, y, device, seed: int) -> dict:
    """``curvlinops_eigsh`` with ARPACK's ``tol=1e-3`` (relative accuracy of the Ritz values)."""
    return curvlinops_eigsh(model, loss_fn, x, y, device, seed, tol=1e-3)


def _eigenthings_operator(model, loss_fn, x, y, budget: int):
    from hessian_eigenthings import HessianOperator, supervised_loss

    count = _Counter(budget)

    class Counted(HessianOperator):
        def matvec(self, v):
            count.add()
            return super().matvec(v)

    return Counted(model, [(x, y)], supervised_loss(loss_fn)), count


def eigenthings_power(model, loss_fn, x, y, device, seed: int, *, budget: int = DEFAULT_BUDGET) -> dict:
    """``power_iteration_one(H, seed=seed)``: the dominant eigenvalue (largest magnitude) as lambda_max; power
    iteration has no option for the other end, so lambda_min is None."""
    from hessian_eigenthings import power_iteration_one

    H, count = _eigenthings_operator(model, loss_fn, x, y, budget)
    (lam, _, _, _, converged), t = _timed(device, lambda: power_iteration_one(H, seed=seed))
    return _totals({"lmax": float(lam), "lmin": None, "lmax_hvps": count.n, "lmax_seconds": t,
                    "lmax_converged": bool(converged)})


def eigenthings_lanczos(model, loss_fn, x, y, device, seed: int, *, k: int | None = None,
                        budget: int = DEFAULT_BUDGET) -> dict:
    """``lanczos(H, seed=seed)`` at its defaults (``k`` as given, else the library's 10): lambda_max is the largest
    returned Ritz value (``which="LM"`` orders by magnitude); lambda_min from ``lanczos(H, which="SA")``."""
    from hessian_eigenthings import lanczos

    H, count = _eigenthings_operator(model, loss_fn, x, y, budget)
    kw = {} if k is None else {"k": k}
    r = {}
    for end, extra in (("lmax", {}), ("lmin", {"which": "SA"})):
        count.n = 0
        res, t = _timed(device, lambda: lanczos(H, seed=seed, **kw, **extra))
        i = int(res.eigenvalues.argmax()) if end == "lmax" else int(res.eigenvalues.argmin())
        r.update({end: float(res.eigenvalues[i]), f"{end}_hvps": count.n, f"{end}_seconds": t,
                  f"{end}_converged": bool(res.converged[i])})
    return _totals(r)


def eigenthings_lanczos_k1(model, loss_fn, x, y, device, seed: int) -> dict:
    """``eigenthings_lanczos`` with ``k=1``: what asking for the one top (or bottom) eigenvalue gets."""
    return eigenthings_lanczos(model, loss_fn, x, y, device, seed, k=1)


ANCHORS: dict[str, Callable[..., dict]] = {
    "curvlinops_eigsh": curvlinops_eigsh,
    "curvlinops_eigsh_tol1e-3": curvlinops_eigsh_tol1e3,
    "eigenthings_power": eigenthings_power,
    "eigenthings_lanczos": eigenthings_lanczos,
    "eigenthings_lanczos_k1": eigenthings_lanczos_k1,
}
