"""The geometry an optimizer sees: ``P^{1/2} H P^{1/2}`` with ``P`` read from its state (docs/metrics.md#precond).

Adaptive methods are preconditioned SGD, ``x <- x - eta P g``; in the coordinates ``u = P^{-1/2} x`` the step
is plain gradient descent on a loss with Hessian ``P^{1/2} H P^{1/2}``. This metric reports that matrix's
``lambda_max``, ``lambda_min`` (Lanczos on ``v -> P^{1/2} H (P^{1/2} v)``) and R_med (its diagonal is
``p_i H_ii``, so one set of exact diagonal entries serves raw and preconditioned alike), beside the raw ones.

``P = diag(p)`` from the optimizer, excluding the learning rate and any scalar schedule:

=====================  ===========================================================================
Adam, AdamW            ``p = 1 / (sqrt(v_hat) + eps)``, ``v_hat = exp_avg_sq / (1 - beta2^t)``
                       (``max_exp_avg_sq`` with ``amsgrad``); the first-moment correction
                       ``1/(1 - beta1^t)`` scales the momentum, not P, and is left out
RMSprop                ``p = 1 / (sqrt(square_avg) + eps)``; centered: ``sqrt(square_avg - grad_avg^2)``
Adagrad                ``p = 1 / (sqrt(sum) + eps)`` (the lr decay is a scalar, left out)
SGD (any momentum)     ``p = 1``: no state needed
``preconditioner()``   any optimizer with this method (the ellipsoidal trust region: ``P = A^{-1}``):
                       a list of per-parameter tensors in param-group order (parameters that
                       require grad), or a dict keyed by the parameter tensors
=====================  ===========================================================================

Parameters are matched to optimizer state by tensor identity, so the Landscape's selection and order
need not match the optimizer's. Reading the state changes nothing (no state entry is created).
Reference: Staib et al. 2019; Kohler, Adolphs, Lucchi (docs/metrics.md#precond).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from ..errors import ConfigurationError, OptimizerStateError
from ..linalg.lanczos import lanczos
from ._common import checked, plan_options, resolve_generator, select_blocks
from ._reads import read_scaled_candidates
from .registry import register
from .rmed import READ_OPTIONS, diagonal_statistics, shared_diagonal
from .rmed import _check_options as _check_rmed
from .rmed import rmed as _rmed_metric
from .shared import Reuse
from .spectrum import lanczos_summary, run_lanczos

__all__ = ["precond", "optimizer_preconditioner"]

_NO_STATE = (
    "{opt} has no {key} for parameter {name!r} yet: its state is created by the first optimizer.step(). "
    "Probe after at least one step (a GeometryProbe attached as a step hook already does)"
)


def _state(optimizer: Any, p: torch.Tensor, key: str, name: str) -> dict:
    # .get, not [...]: optimizer.state is a defaultdict and indexing would add an entry.
    st = optimizer.state.get(p)
    if not st or key not in st:
        raise OptimizerStateError(_NO_STATE.format(opt=type(optimizer).__name__, key=f"'{key}' state", name=name))
    step = st.get("step")
    if step is not None and float(step) < 1:
        raise OptimizerStateError(_NO_STATE.format(opt=type(optimizer).__name__, key="step taken", name=name))
    return st


def _adam(st: dict, group: dict) -> torch.Tensor:
    v = st["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in st else st["exp_avg_sq"]
    t = float(st["step"])
    v_hat = v.double() / (1.0 - group["betas"][1] ** t)
    return 1.0 / (v_hat.sqrt() + group["eps"])


def _rmsprop(st: dict, group: dict) -> torch.Tensor:
    avg = st["square_avg"].double()
    if group.get("centered") and "grad_avg" in st:
        avg = avg - st["grad_avg"].double() ** 2
    return 1.0 / (avg.clamp_min(0).sqrt() + group["eps"])


def _adagrad(st: dict, group: dict) -> torch.Tensor:
    return 1.0 / (st["sum"].double().sqrt() + group["eps"])


_KNOWN = (
    (torch.optim.Adam, "exp_avg_sq", _adam, "exp_avg_sq, bias-corrected"),
    (torch.optim.AdamW, "exp_avg_sq", _adam, "exp_avg_sq, bias-corrected"),
    (torch.optim.RMSprop, "square_avg", _rmsprop, "square_avg"),
    (torch.optim.Adagrad, "sum", _adagrad, "sum"),
)


def _custom(optimizer: Any, params: Sequence[torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    got = optimizer.preconditioner()
    if isinstance(got, Mapping):
        out = []
        for p, n in zip(params, names):
            hit = next((v for q, v in got.items() if q is p), None)
            if hit is None:
                raise OptimizerStateError(
                    f"{type(optimizer).__name__}.preconditioner() has no entry for parameter {n!r}; it must "
                    "map every optimized parameter tensor to its P"
                )
            out.append(hit)
        return out
    got = list(got)
    for only_trainable in (True, False):
        order = [q for g in optimizer.param_groups for q in g["params"] if q.requires_grad or not only_trainable]
        if len(order) == len(got):
            where = {id(q): i for i, q in enumerate(order)}
            return [got[where[id(p)]] for p in params]
    raise OptimizerStateError(
        f"{type(optimizer).__name__}.preconditioner() returned {len(got)} tensors but the optimizer has "
        f"{sum(len(g['params']) for g in optimizer.param_groups)} parameters; return one tensor per parameter "
        "in param-group order, or a dict keyed by parameter"
    )


def optimizer_preconditioner(
    optimizer: Any, params: Sequence[torch.Tensor], names: Sequence[str] | None = None
) -> tuple[list[torch.Tensor], str]:
    """The diagonal preconditioner ``P`` of ``optimizer`` for each tensor in ``params`` (float64, detached).

    Returns the per-parameter ``p`` tensors (shaped like each parameter) and a description of the source.
    Raises OptimizerStateError when a parameter is not optimized by ``optimizer``, when the state is not
    there yet (before the first step), when ``P`` is not positive and finite, or for an optimizer whose
    ``P`` is unknown (the message lists the supported ones). See the module docstring for the formulas.

    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> opt = torch.optim.Adam([w], eps=0.0)
    >>> (w ** 2).sum().backward(); opt.step()
    >>> optimizer_preconditioner(opt, [w])[0][0]          # v_hat = g^2 after one step: P = 1/|g|
    tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    params = list(params)
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    owner = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    for p, n in zip(params, names):
        if id(p) not in owner:
            raise OptimizerStateError(
                f"parameter {n!r} is not in {type(optimizer).__name__}'s param_groups, so it has no "
                "preconditioner; measure only the optimized parameters (Landscape(params=...))"
            )
    cls = type(optimizer).__name__
    if callable(getattr(optimizer, "preconditioner", None)):
        raw, source = _custom(optimizer, params, names), f"{cls}.preconditioner()"
    elif isinstance(optimizer, torch.optim.SGD):
        raw, source = [torch.ones_like(p, dtype=torch.float64) for p in params], "SGD: identity"
    else:
        for kind, key, fn, what in _KNOWN:
            if isinstance(optimizer, kind):
                raw = [fn(_state(optimizer, p, key, n), owner[id(p)]) for p, n in zip(params, names)]
                source = f"{cls} {what}, eps={owner[id(params[0])]['eps']:g}"
                break
        else:
            raise OptimizerStateError(
                f"no preconditioner is known for {cls}; supported: Adam, AdamW, RMSprop, Adagrad, SGD, and any "
                "optimizer with a preconditioner() method returning P per parameter"
            )
    out = []
    for p, q, n in zip(params, raw, names):
        q = torch.as_tensor(q).detach().to(dtype=torch.float64, device=p.device)
        if q.numel() == 1:
            q = q.expand(p.shape)
        if q.numel() != p.numel():
            raise OptimizerStateError(f"{source} gives shape {tuple(q.shape)} for {n!r} of shape {tuple(p.shape)}")
        if not bool(torch.isfinite(q).all()) or not bool((q > 0).all()):
            raise OptimizerStateError(f"{source} has entries that are not positive and finite for {n!r}")
        out.append(q.reshape(p.shape))
    return out, source


_BLOCK_KEYS = ("rmed", "rmed_err", "rmed_ci", "rmed_q99", "rmed_q99_err", "rmed_q99_ci", "max_certified", "exact")
_STAT_OPTIONS = ("level", "bootstrap")
_RMED_DEFAULTS = {n: q.default for n, q in inspect.signature(_rmed_metric).parameters.items()}


def _rmed_fields(res: dict, prefix: str) -> dict:
    out = {f"{prefix}{k}": res[k] for k in _BLOCK_KEYS[:6]}
    out[f"{prefix}rmed_max_certified"] = res["max_certified"]
    out[f"{prefix}rmed_exact"] = res["exact"]
    return out


def _p_ranges(p: torch.Tensor, chosen: Sequence[Any]) -> dict[str, dict]:
    """Per block ``p_min``, ``p_max``, ``p_median`` of the preconditioner ``p``, one device->host copy in all.

    Min, max and median select entries, exact in p's own dtype: they are taken where p lives (a float64 host
    copy of a 124M-entry p and its medians on the CPU took seconds of a GPT-2 probe), stacked, and read at
    once (one read per figure and block waited for the device 3 x 148 times on GPT-2)."""
    if not chosen:
        return {}
    picks = torch.stack([torch.stack([pb.min(), pb.max(), pb.median()])
                         for pb in (p[b.start : b.stop] for b in chosen)]).tolist()
    return {b.name: {"p_min": lo, "p_max": hi, "p_median": med} for b, (lo, hi, med) in zip(chosen, picks)}


def _split_rmed_options(rmed_options: dict | None) -> tuple[dict, dict]:
    """``rmed_options`` as rmed's read options and its statistics' options (defaults filled in)."""
    known = {k: _RMED_DEFAULTS[k] for k in READ_OPTIONS + _STAT_OPTIONS}
    given = dict(rmed_options or {})
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigurationError(
            f"precond's rmed_options has unknown keys {unknown}; known: {', '.join(sorted(known))} (rmed's options)"
        )
    merged = {**known, **given}
    return {k: merged[k] for k in READ_OPTIONS}, {k: merged[k] for k in _STAT_OPTIONS}


def _preconditioned_rmed(land: Any, chosen: list, p: torch.Tensor, reuse: Reuse, *, seed: int,
                         generator: torch.Generator | None, rmed_options: dict | None) -> tuple[dict, dict, int]:
    """R_med of ``diag(P H)`` and of ``diag(H)`` from rmed's raw diagonal reads (shared with ``rmed``; the raw
    result is then rmed's own), completed by the candidates ``P`` points to for the preconditioned max.
    Returns the preconditioned and raw results and the HVPs this call spent."""
    read, stat = _split_rmed_options(rmed_options)
    _check_rmed(read["exact_threshold"], read["k"], read["top"], read["screen_samples"], read["z"], stat["level"],
                stat["bootstrap"], read["hvps"], read["signs"], read["min_k"], read["pilot"])
    reads, gen, spent = shared_diagonal(land, chosen, reuse, seed=seed, generator=generator, **read)
    # in rmed's order of draws: its statistics first, so the raw values equal rmed's with the same options
    (raw,) = diagonal_statistics(reads.parts, reads.plan, [None], z=read["z"], budget=read["hvps"], generator=gen,
                                 pilot=reads.pilot, **stat)
    parts, more = read_scaled_candidates(land.hvp, land.dim, reads, p, z=read["z"], generator=gen, dtype=land.dtype,
                                         device=land.device, batch=getattr(land, "chunk_size", 16))
    (pre,) = diagonal_statistics(parts, reads.plan, [p], z=read["z"], budget=read["hvps"], generator=gen,
                                 pilot=reads.pilot, **stat)
    return pre, raw, spent + more


@register(
    "precond",
    cost="two Lanczos runs (~10-150 HVPs each; one without raw) plus rmed's diagonal reads (at most its hvps, "
    "1024) and the candidates P points to for the preconditioned max (up to top per sampled block, or signs * "
    "candidate rows); the raw Lanczos run and the diagonal reads are shared with spectrum and rmed in one probe",
    needs=("optimizer",),
    after=("spectrum", "rmed"),
)
def precond(
    land: Any,
    *,
    optimizer: Any = None,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    raw: bool = True,
    rmed: bool = True,
    blocks: str | Sequence[str] | None = None,
    rmed_options: dict | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
) -> dict:
    """lambda_max, lambda_min and R_med of ``P^{1/2} H P^{1/2}`` from the optimizer's state, beside the raw ones.

    Args:
        land: the Landscape.
        optimizer: the optimizer whose ``P`` to read (module docstring); required.
        k, tol, max_iter: Lanczos options as in ``spectrum`` (top/bottom ``k``, residual tolerance, cap).
        raw: also report the raw Hessian's values (``raw_*`` keys).
        rmed: also compute R_med (raw and preconditioned share the diagonal reads).
        blocks: glob patterns of the blocks R_med covers (default all).
        rmed_options: keyword options of :func:`geomprobe.metrics.rmed.rmed` (``k``, ``top``, ``hvps``, ``level``,
            ...) for the diagonal reads and their statistics.
        seed, generator: the randomness (Lanczos starts, R_med sampling).
        basis_device: where the Lanczos basis lives (``"cpu"``: host memory; see krylov.lanczos).

    The raw Lanczos run is ``spectrum``'s with the same ``k``, ``tol``, ``max_iter`` and seed, and the diagonal
    reads are ``rmed``'s with the same blocks, options and seed: on one Landscape (one probe) each is computed
    once and shared (:mod:`geomprobe.metrics.shared`), so ``raw_*`` then equal those metrics' values and
    ``shared`` / ``shared_hvps`` say what was received and what it cost; ``hvps`` counts only this metric's
    own HVPs. The values do not depend on whether anything was shared.

    Returns the preconditioned ``lambda_max``, ``lambda_min`` with residual bounds (``*_err``), ``top``,
    ``bottom``, ``rmed``, ``rmed_err``, ``rmed_ci``, ``rmed_q99`` (``_err``, ``_ci``), ``rmed_max_certified``,
    ``rmed_exact``; the same prefixed ``raw_``; ``p_min``, ``p_max``, ``p_median`` of the preconditioner,
    ``optimizer`` and ``source``; ``converged`` (every Lanczos run); ``hvps``; and ``blocks`` with R_med and
    P's range per block. Errors: residual bounds for eigenvalues, the interval half-widths of ``rmed``.

    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> model = nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> batch = (X, torch.zeros(2, 1, dtype=torch.float64))            # H = diag(1, 4)
    >>> opt = torch.optim.Adagrad(model.parameters(), eps=0.0)
    >>> with torch.no_grad(): _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    >>> nn.MSELoss()(model(X), batch[1]).backward(); opt.step()        # g = (1, 4): P = diag(1, 1/4)
    >>> out = precond(Landscape(model, nn.MSELoss(), batch), optimizer=opt, tol=1e-10)
    >>> round(out["lambda_max"], 9), round(out["raw_lambda_max"], 9), out["rmed"], out["raw_rmed"]
    (1.0, 4.0, 1.0, 1.6)
    """
    if optimizer is None:
        raise ConfigurationError(
            "precond needs the optimizer whose preconditioner to read: precond(land, optimizer=opt)"
        )
    chosen = select_blocks(land.space.blocks, blocks)
    if rmed:
        _split_rmed_options(rmed_options)  # a bad key before any HVP is spent
    p_list, source = optimizer_preconditioner(optimizer, land.params, land.param_names)
    p = land.space.flatten(p_list).to(dtype=land.dtype, device=land.device)
    s = p.sqrt()
    reuse = Reuse(land, "precond")
    # The product in preconditioned coordinates; works for a vector (d,) and a block (k, d) alike.
    mv = checked(lambda v: s * land.hvp(s * v), "preconditioned Hessian-vector product")
    r = lanczos(mv, land.dim, k=k, tol=tol, max_iter=max_iter, generator=resolve_generator(seed, generator),
                dtype=land.dtype, device=land.device, basis_device=basis_device, **plan_options(land))
    out = lanczos_summary(r, k)
    hvps = r.matvecs
    converged = bool(r.converged)
    if raw:
        # seeded like `spectrum` (its run when a probe measures both: shared, not run again)
        before = land.hvps
        rr = run_lanczos(land, k=k, tol=tol, max_iter=max_iter, seed=seed, generator=generator,
                         basis_device=basis_device, reuse=reuse)
        out.update({f"raw_{key}": v for key, v in lanczos_summary(rr, k).items() if key not in ("hvps",)})
        hvps += land.hvps - before
        converged = converged and bool(rr.converged)
    per_block = _p_ranges(p, chosen)
    if rmed:
        pre, raw_res, n = _preconditioned_rmed(land, chosen, p, reuse, seed=seed, generator=generator,
                                               rmed_options=rmed_options)
        hvps += n
        for res, prefix in ((pre, ""), (raw_res, "raw_")):
            if prefix and not raw:
                continue
            out.update(_rmed_fields(res, prefix))
            for name, bres in res["blocks"].items():
                per_block[name].update(_rmed_fields(bres, prefix))
    out.update({
        "converged": converged,
        "optimizer": type(optimizer).__name__,
        "source": source,
        "p_min": float(p.min()),
        "p_max": float(p.max()),
        "p_median": float(p.median()),
        "hvps": hvps,
        "blocks": per_block,
        **reuse.fields(),
    })
    return out
