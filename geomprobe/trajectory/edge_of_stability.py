"""Edge of stability along a run: when ``η·sharpness`` first passes the threshold of the optimizer's update.

On a quadratic with curvature ``λ`` the update is a linear recursion; it diverges once ``h = η λ`` passes the
value where a root of its characteristic polynomial reaches −1::

    SGD, heavy-ball momentum β (torch's SGD):       h (1 − τ) < 2 (1 + β)              (τ = dampening)
    SGD, Nesterov momentum β:                       h (1 − τ) < 2 (1 + β) / (1 + 2β)
    Adam/AdamW/NAdam/RAdam (EMA momentum β1):       η λ_P < 2 (1 + β1) / (1 − β1)       (λ_P: P^{1/2} H P^{1/2})
    RMSprop (heavy-ball momentum μ), Adagrad (μ=0):  η λ_P < 2 (1 + μ)

The SGD and Adam rules are the ones issue 11 states (Cohen et al. 2021, 2022); the Nesterov, dampening and
RMSprop/Adagrad lines follow from the same characteristic polynomial. The sharpness for SGD is ``λ_max``
(not ``max(|λ_max|, |λ_min|)``: a negative eigenvalue grows under every η, so it sets no threshold), read
from ``spectrum`` (``saddle``, ``density`` as fallbacks); SGD's ``weight_decay`` is added to it because the
update sees ``H + wd·I``. For the adaptive methods the sharpness is ``precond.lambda_max``, the top
eigenvalue of the preconditioned Hessian from the optimizer's own state; their weight decay is ignored.

The rule is linear stability of a quadratic with the preconditioner frozen. A run far past the threshold
would see its loss explode within a few steps (at ``ratio`` 3, gradient descent's unstable component grows 5x
per step), so a probe more than :data:`CONTRADICTED_RATIO` times past the edge after which the loss still fell
contradicts the rule rather than showing a crossing: Adam's preconditioner adapts between steps, and the
probe's fixed batches are not the training batches. Such probes are counted in ``contradicted`` and not as
above; ``first_step`` and the episodes use the others. (The last probe, with no later loss, is judged by the
loss falling into it from a probe that was past the same ratio.)

Each record's learning rate is the one the probe recorded (``record["lr"]``, one per param group, so a
schedule is followed); momentum and betas come from the run's ``meta["optimizer_hparams"]``. With several
param groups the group with the largest learning rate is used (it is the first to become unstable).

>>> records = [{"step": t, "lr": [0.1 * (1 + t)], "spectrum": {"lambda_max": 5.0}} for t in range(8)]
>>> meta = {"optimizer": "SGD", "optimizer_hparams": [{"lr": 0.1, "momentum": 0.0}]}
>>> eos = edge_of_stability(records, meta)          # η_t λ = 0.5 (1 + t) > 2 from t = 4 on
>>> eos.first_step, eos.duration, eos.above_at_end
(4, 3, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EdgeOfStability", "edge_of_stability", "stability_threshold", "SGD_SOURCES", "CONTRADICTED_RATIO"]

# Past this multiple of the threshold a probe followed by a falling loss contradicts the quadratic rule.
CONTRADICTED_RATIO = 3.0

# Where λ_max is read for SGD, first found wins.
SGD_SOURCES = ("spectrum", "saddle", "density")
_ADAM_NAMES = ("adam", "adamw", "nadam", "radam", "adamax")
_HEAVY_BALL_PRECONDITIONED = ("rmsprop", "adagrad")


def stability_threshold(lr: float, *, beta: float = 0.0, update: str = "heavy-ball", dampening: float = 0.0) -> float:
    """The sharpness above which the update diverges on a quadratic, for learning rate ``lr`` (module docstring).

    ``update``: ``"heavy-ball"`` (SGD, RMSprop, Adagrad), ``"nesterov"`` or ``"adam"`` (EMA momentum ``beta``).

    >>> [round(stability_threshold(0.1, beta=b), 9) for b in (0.0, 0.9)]
    [20.0, 38.0]
    >>> round(stability_threshold(1e-3, beta=0.9, update="adam"), 6)
    38000.0
    """
    if not lr > 0:
        return math.inf
    if update == "heavy-ball":
        h = 2.0 * (1.0 + beta)
    elif update == "nesterov":
        h = 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta)
    elif update == "adam":
        h = 2.0 * (1.0 + beta) / (1.0 - beta)
    else:
        raise ValueError(f"stability_threshold: update must be 'heavy-ball', 'nesterov' or 'adam', got {update!r}")
    return h / (lr * (1.0 - dampening))


@dataclass(frozen=True)
class EdgeOfStability:
    """Sharpness against the stability threshold at each probe, and when the run crossed it.

    ``ratio = sharpness / threshold`` (above 1: past the edge). ``first_step`` is the first probe above the
    threshold (None: never); ``duration`` the steps from there to the last probe of that unbroken stretch
    above it (a lower bound: probes are samples); ``probes_above`` counts every probe above; ``episodes``
    the separate stretches; ``above_at_end`` whether the last probe is above. ``sharpness`` includes SGD's
    ``weight_decay`` (subtract it to compare with the raw λ_max). ``uncertain`` counts probes
    whose sharpness bound (``*_err``) straddles the threshold; ``contradicted`` those far past it while the
    loss kept falling (module docstring), which do not count as above. ``applicable`` is False, with ``reason``,
    when the run lacks what the rule needs.
    """

    applicable: bool
    reason: str | None = None
    optimizer: str | None = None
    rule: str | None = None
    beta: float | None = None
    quantity: str | None = None
    formula: str | None = None
    first_step: int | None = None
    duration: int | None = None
    probes_above: int = 0
    episodes: int = 0
    above_at_end: bool = False
    uncertain: int = 0
    contradicted: int = 0
    peak_ratio: float | None = None
    peak_step: int | None = None
    weight_decay: float = 0.0
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    sharpness: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    lr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    threshold: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def crossed(self) -> bool:
        return self.first_step is not None

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sharpness / self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-probe arrays left out)."""
        keys = ("applicable", "reason", "optimizer", "rule", "beta", "quantity", "formula", "first_step",
                "duration", "probes_above", "episodes", "above_at_end", "uncertain", "contradicted", "peak_ratio",
                "peak_step",
                "weight_decay")
        return {k: getattr(self, k) for k in keys} | {"crossed": self.crossed, "probes": int(len(self.steps))}


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _rule(name: str | None, hp: Mapping[str, Any]) -> tuple[str, str, float, float, str] | str:
    """``(rule, update, beta, dampening, quantity)`` for the optimizer, or the reason none applies."""
    lname = (name or "").lower()
    if isinstance(hp.get("betas"), (list, tuple)) or lname in _ADAM_NAMES:
        betas = hp.get("betas") or [0.9, 0.999]
        return "adam", "adam", float(betas[0]), 0.0, "precond.lambda_max"
    if lname in _HEAVY_BALL_PRECONDITIONED:
        return lname, "heavy-ball", float(hp.get("momentum", 0.0) or 0.0), 0.0, "precond.lambda_max"
    if lname == "sgd" or (not lname and "momentum" in hp):
        beta = float(hp.get("momentum", 0.0) or 0.0)
        update = "nesterov" if hp.get("nesterov") else "heavy-ball"
        return "sgd", update, beta, float(hp.get("dampening", 0.0) or 0.0), "lambda_max"
    if name is None:
        return "the run's meta names no optimizer, so no stability threshold applies (attach the optimizer)"
    return f"no edge-of-stability rule for optimizer {name!r} (rules exist for SGD, Adam-type, RMSprop, Adagrad)"


def _sharpness(record: Mapping[str, Any], quantity: str) -> tuple[float, float]:
    """(value, error) of the sharpness the rule reads from one record."""
    sources = SGD_SOURCES if quantity == "lambda_max" else (quantity.split(".")[0],)
    for name in sources:
        result = record.get(name)
        if isinstance(result, Mapping) and math.isfinite(_number(result.get("lambda_max"))):
            err = _number(result.get("lambda_max_err"))
            return float(result["lambda_max"]), err if math.isfinite(err) else 0.0
    return math.nan, math.nan


def _formula(rule: str, update: str, beta: float, dampening: float) -> str:
    eta = "η" if dampening == 0 else f"η(1−{dampening:g})"
    if rule == "sgd":
        bound = f"2(1+β)/(1+2β) = {2 * (1 + beta) / (1 + 2 * beta):.4g}" if update == "nesterov" else \
            f"2(1+β) = {2 * (1 + beta):.4g}"
        return f"{eta}·λ_max vs {bound} (β = {beta:g})"
    if rule == "adam":
        return f"η·λ_max(P½HP½) vs 2(1+β1)/(1−β1) = {2 * (1 + beta) / (1 - beta):.4g} (β1 = {beta:g})"
    return f"η·λ_max(P½HP½) vs 2(1+μ) = {2 * (1 + beta):.4g} (μ = {beta:g})"


def _contradicted(ratio: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Probes past :data:`CONTRADICTED_RATIO` after which the loss fell (the last: into which it fell from a
    probe past the same ratio); False where the loss is not known.

    >>> _contradicted(np.array([2000.0, 2100.0, 1900.0]), np.array([1.0, 0.8, 0.6])).tolist()
    [True, True, True]
    >>> _contradicted(np.array([1.2, 5.0, 5.0]), np.array([1.0, 0.8, 3.0])).tolist()
    [False, False, False]
    """
    far = ratio > CONTRADICTED_RATIO
    out = np.zeros(len(ratio), dtype=bool)
    for i in range(len(ratio)):
        if not far[i]:
            continue
        if i + 1 < len(ratio):
            out[i] = bool(loss[i + 1] < loss[i])  # NaN compares False: an unknown loss contradicts nothing
        elif i > 0 and far[i - 1]:
            out[i] = bool(loss[i] < loss[i - 1])
    return out


def edge_of_stability(records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> EdgeOfStability:
    """Compare each probe's sharpness with the optimizer's stability threshold (module docstring).

    ``records`` and ``meta`` are a run's (``RunReader(run).records``, ``.meta``). Never raises for a run
    that lacks something: the result says ``applicable=False`` and why.
    """
    name = meta.get("optimizer")
    groups = meta.get("optimizer_hparams") or []
    lrs = [r.get("lr") for r in records if isinstance(r.get("lr"), list) and r.get("lr")]
    if not lrs:
        return EdgeOfStability(False, reason="no record holds a learning rate (probes without an optimizer)",
                               optimizer=name)
    first = [_number(v) for v in lrs[0]]
    group = int(np.nanargmax(first)) if any(math.isfinite(v) for v in first) else 0
    hp = groups[group] if group < len(groups) and isinstance(groups[group], Mapping) else {}
    rule = _rule(name, hp)
    if isinstance(rule, str):
        return EdgeOfStability(False, reason=rule, optimizer=name)
    kind, update, beta, dampening, quantity = rule
    wd = float(hp.get("weight_decay", 0.0) or 0.0) if kind == "sgd" else 0.0
    steps, sharp, errs, lr, loss = [], [], [], [], []
    for r in records:
        value, err = _sharpness(r, quantity)
        rec_lr = r.get("lr")
        eta = _number(rec_lr[group]) if isinstance(rec_lr, list) and group < len(rec_lr) else math.nan
        if "step" in r and math.isfinite(value) and math.isfinite(eta):
            steps.append(int(r["step"]))
            sharp.append(value + wd)
            errs.append(err)
            lr.append(eta)
            loss.append(_number(r.get("loss")))
    if not steps:
        where = "the precond metric (the preconditioned sharpness)" if quantity.startswith("precond") else \
            "a lambda_max (the spectrum metric)"
        return EdgeOfStability(False, reason=f"the {kind} rule needs {where} at probes that recorded a learning "
                               "rate; none did", optimizer=name, rule=kind, beta=beta)
    steps_a, sharp_a, err_a, lr_a = (np.asarray(steps, dtype=np.int64), np.asarray(sharp), np.asarray(errs),
                                     np.asarray(lr))
    thr = np.asarray([stability_threshold(e, beta=beta, update=update, dampening=dampening) for e in lr_a])
    ratio = sharp_a / thr
    contradicted = _contradicted(ratio, np.asarray(loss))
    above = (sharp_a > thr) & ~contradicted
    uncertain = int(np.sum(np.abs(sharp_a - thr) <= err_a))
    peak = int(np.nanargmax(ratio)) if np.isfinite(ratio).any() else 0
    first_step = duration = None
    episodes = int(above[0]) + int(np.sum(above[1:] & ~above[:-1]))
    if above.any():
        i = int(np.argmax(above))
        j = i
        while j + 1 < len(above) and above[j + 1]:
            j += 1
        first_step, duration = int(steps_a[i]), int(steps_a[j] - steps_a[i])
    return EdgeOfStability(
        True, optimizer=name, rule=kind, beta=beta, quantity=quantity if kind != "sgd" else "lambda_max",
        formula=_formula(kind, update, beta, dampening), first_step=first_step, duration=duration,
        probes_above=int(above.sum()), episodes=episodes, above_at_end=bool(above[-1]), uncertain=uncertain,
        contradicted=int(contradicted.sum()),
        peak_ratio=float(ratio[peak]) if math.isfinite(ratio[peak]) else None, peak_step=int(steps_a[peak]),
        weight_decay=wd, steps=steps_a, sharpness=sharp_a, lr=lr_a, threshold=thr,
    )
