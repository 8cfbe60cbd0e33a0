"""The optimizers geomprobe compares, by name, with stated defaults.

===============  ===========================================  ============================================
name             class                                        defaults
===============  ===========================================  ============================================
``sgd``          ``torch.optim.SGD``                          lr 0.01
``sgdm``         ``torch.optim.SGD``                          lr 0.01, momentum 0.9
``adam``         ``torch.optim.Adam``                         lr 1e-3, betas (0.9, 0.999), eps 1e-8
``adamw``        ``torch.optim.AdamW``                        lr 1e-3, betas (0.9, 0.999), eps 1e-8,
                                                              weight_decay 0.01
``rmsprop``      ``torch.optim.RMSprop``                      lr 1e-3, alpha 0.99, eps 1e-8
``adagrad``      ``torch.optim.Adagrad``                      lr 0.01, eps 1e-10
``tr-sphere``    :class:`~geomprobe.optim.EllipsoidalTR`      ellipsoid "sphere", Δ0 0.05, γ2 1.5
``tr-adagrad``   :class:`~geomprobe.optim.EllipsoidalTR`      ellipsoid "adagrad", Δ0 0.05, γ2 1.5
``tr-rmsprop``   :class:`~geomprobe.optim.EllipsoidalTR`      ellipsoid "rmsprop", Δ0 1e-4, γ2 1.75
===============  ===========================================  ============================================

The trust regions share Δ_max 10, η1 0.01, η2 0.95, γ1 1.1, β 0.8, ε 1e-10 (docs/metrics.md#trust_region).

Every optimizer here is driven the same way, ``opt.step(make_closure(opt, loss_fn))``: ``loss_fn()``
returns the minibatch loss and :func:`make_closure` adds ``zero_grad``/``backward`` for the first-order
classes, whose ``step(closure)`` expects them, and leaves it alone for the trust region, which
differentiates the loss itself.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
>>> opt = make("sgdm", [w], lr=0.1)
>>> loss = opt.step(make_closure(opt, lambda: (w ** 2).sum()))
>>> loss.item(), type(opt).__name__, opt.param_groups[0]["momentum"]
(2.0, 'SGD', 0.9)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..errors import ConfigurationError
from .trust_region import TR_DEFAULTS, EllipsoidalTR

__all__ = ["OptimizerSpec", "REGISTRY", "available", "get", "make", "make_closure"]


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: its class, the defaults geomprobe states, and keywords it fixes."""

    name: str
    cls: type
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def hyperparameters(self, **overrides: Any) -> dict[str, Any]:
        """The keywords the class receives: stated defaults, then ``overrides``, then the fixed ones."""
        clash = sorted(set(overrides) & set(self.fixed))
        if clash:
            raise ConfigurationError(
                f"optimizer {self.name!r} fixes {', '.join(f'{k}={self.fixed[k]!r}' for k in clash)}; "
                f"choose another registered name instead of overriding it"
            )
        return {**self.defaults, **overrides, **self.fixed}


def _specs() -> dict[str, OptimizerSpec]:
    adam = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    specs = [
        OptimizerSpec("sgd", torch.optim.SGD, {"lr": 0.01}, description="SGD"),
        OptimizerSpec("sgdm", torch.optim.SGD, {"lr": 0.01, "momentum": 0.9},
                      description="SGD with heavy-ball momentum"),
        OptimizerSpec("adam", torch.optim.Adam, dict(adam), description="Adam"),
        OptimizerSpec("adamw", torch.optim.AdamW, {**adam, "weight_decay": 0.01},
                      description="Adam with decoupled weight decay"),
        OptimizerSpec("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8},
                      description="RMSprop"),
        OptimizerSpec("adagrad", torch.optim.Adagrad, {"lr": 0.01, "eps": 1e-10}, description="Adagrad"),
    ]
    shared = {"radius_max": 10.0, "eta1": 0.01, "eta2": 0.95, "gamma1": 1.1, "beta": 0.8, "eps": 1e-10,
              "kappa": 0.1, "max_cg_iters": 50}
    for kind, own in TR_DEFAULTS.items():
        specs.append(OptimizerSpec(f"tr-{kind}", EllipsoidalTR, {**own, **shared}, fixed={"ellipsoid": kind},
                                   description=f"ellipsoidal trust region, {kind} ellipsoid"))
    return {spec.name: spec for spec in specs}


REGISTRY: dict[str, OptimizerSpec] = _specs()


def available() -> list[str]:
    """Names of all registered optimizers, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> OptimizerSpec:
    """The optimizer registered as ``name``; else a :class:`ConfigurationError` listing the known names."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(available())}"
        ) from None


def make(name: str, params: Iterable[Any], **overrides: Any) -> torch.optim.Optimizer:
    """Construct the optimizer registered as ``name`` on ``params`` with its defaults and ``overrides``.

    A keyword the class does not take, or a value it rejects, becomes a :class:`ConfigurationError`
    naming the optimizer.
    """
    spec = get(name)
    kwargs = spec.hyperparameters(**overrides)
    try:
        return spec.cls(params, **kwargs)
    except ConfigurationError:
        raise
    except TypeError as err:
        raise ConfigurationError(
            f"optimizer {name!r} ({spec.cls.__name__}) rejected its options: {err}"
        ) from err
    except ValueError as err:
        raise ConfigurationError(f"optimizer {name!r} ({spec.cls.__name__}): {err}") from err


def make_closure(optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The closure ``optimizer.step`` expects, from ``loss_fn`` that only computes the loss.

    First-order optimizers get ``zero_grad(); loss = loss_fn(); loss.backward(); return loss``; an
    optimizer whose class sets ``closure_calls_backward = False`` (the trust region) gets ``loss_fn``.
    """
    if not callable(loss_fn):
        raise ConfigurationError(
            f"make_closure expects a callable returning the loss, got {type(loss_fn).__name__}"
        )
    if not getattr(optimizer, "closure_calls_backward", True):
        return loss_fn

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure
