"""Hyperparameters for a larger (or smaller) batch: the linear and the square-root scaling rules.

When the batch grows ``B → κB`` (Malladi, Lyu, Panigrahi, Arora, "On the SDEs and Scaling Rules for
Adaptive Gradient Algorithms", 2022; docs/metrics.md#batch_scaling)::

    SGD (with momentum):   η → κ η                                   (linear rule)
    Adam, AdamW, RMSprop:  η → √κ η,  β → 1 − κ(1 − β),  ε → ε/√κ     (square-root rule)

with ``β`` each of Adam's ``betas`` and RMSprop's ``alpha``. The rule needs ``1 − κ(1 − β) > 0``; a larger κ
is rejected. Hyperparameters the rules do not mention (momentum, weight decay) are carried over unchanged;
docs/metrics.md#batch_scaling states no rule for weight decay, so that choice is unconfirmed. Missing
hyperparameters are taken
from the registry's stated defaults, because an unstated β still has to move.

>>> out = scale_for_batch("adam", {"lr": 1e-3}, 4)
>>> out["lr"], [round(b, 12) for b in out["betas"]], out["eps"]
(0.002, [0.6, 0.996], 5e-09)
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..errors import ConfigurationError
from .registry import get

__all__ = ["scale_for_batch"]

_LINEAR = ("sgd", "sgdm")
_SQUARE_ROOT = ("adam", "adamw", "rmsprop")
# 1 − κ(1 − β) is computed with rounding (1 − 0.9 is not 0.1), so κ = 10, β = 0.9 lands a few ulps above 0;
# anything that small is the rule's boundary, not a usable β.
_ZERO = 8 * sys.float_info.epsilon


def _beta(name: str, key: str, beta: Any, kappa: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ConfigurationError(f"{name} {key} must lie in [0, 1), got {beta!r}")
    scaled = 1.0 - kappa * (1.0 - beta)
    if scaled <= _ZERO:
        raise ConfigurationError(
            f"the square-root rule sends {name}'s {key}={beta} to 1 - kappa*(1 - {key}) = {scaled:.6g} <= 0 "
            f"at kappa={kappa}; it holds only for kappa < {1.0 / (1.0 - beta):.6g} (grow the batch less, "
            f"or start from a {key} closer to 1)"
        )
    return scaled


def scale_for_batch(name: str, hparams: dict[str, Any], kappa: float) -> dict[str, Any]:
    """Hyperparameters of optimizer ``name`` for a batch ``kappa`` times larger; ``hparams`` is not modified.

    Args:
        name: a registered optimizer with a rule: ``sgd``, ``sgdm`` (linear) or ``adam``, ``adamw``,
            ``rmsprop`` (square root).
        hparams: the hyperparameters at the current batch; missing ones take the registry defaults.
        kappa: the batch-size ratio ``B_new / B``, positive (``< 1`` shrinks the batch).

    Returns the full keyword dict for the new batch, ready for :func:`geomprobe.optim.make`.
    """
    spec = get(name)
    if name not in _LINEAR + _SQUARE_ROOT:
        raise ConfigurationError(
            f"no batch-size scaling rule for optimizer {name!r}; rules exist for "
            f"{', '.join(_LINEAR + _SQUARE_ROOT)}"
        )
    if not isinstance(hparams, dict):
        raise ConfigurationError(f"hparams must be a dict of keyword arguments, got {type(hparams).__name__}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not (
            math.isfinite(kappa) and kappa > 0):
        raise ConfigurationError(
            f"kappa (the batch-size ratio) must be a positive finite number, got {kappa!r}"
        )
    kappa = float(kappa)
    out = {**spec.defaults, **hparams}
    if name in _LINEAR:
        out["lr"] = kappa * out["lr"]
        return out

    root = math.sqrt(kappa)
    out["lr"] = root * out["lr"]
    out["eps"] = out["eps"] / root
    if name == "rmsprop":
        if out.get("momentum", 0.0) != 0.0:
            raise ConfigurationError(
                "the square-root rule is stated for RMSprop without momentum; got momentum="
                f"{out['momentum']!r} (set it to 0, or scale it yourself)"
            )
        out["alpha"] = _beta(name, "alpha", out["alpha"], kappa)
    else:
        betas = tuple(out["betas"])
        if len(betas) != 2:
            raise ConfigurationError(f"{name} betas must be a pair (beta1, beta2), got {out['betas']!r}")
        out["betas"] = (_beta(name, "beta1", betas[0], kappa), _beta(name, "beta2", betas[1], kappa))
    return out
