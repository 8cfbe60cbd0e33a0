"""The ellipsoidal trust-region method of Kohler, Adolphs, Lucchi as a ``torch.optim.Optimizer``.

One step at ``w_t`` with radius ``Δ_t`` on the minibatch the closure evaluates (docs/metrics.md#trust_region)::

    g_t = ∇L_S(w_t)                              graph built once, create_graph=True
    A_t = diag(a_t)                              ellipsoid updated with g_t (also before a rejection)
    s_t ≈ argmin gᵀs + ½ sᵀH s,  ‖s‖_A ≤ Δ_t     preconditioned Steihaug–Toint CG, HVPs on that graph
    ρ_t = (L_S(w_t) − L_S(w_t + s_t)) / (m(0) − m(s_t))      ρ := 1 when both are below 1e-15
    ρ ≥ η2: accept, Δ ← min(γ1 Δ, Δ_max);   η1 ≤ ρ < η2: accept;   ρ < η1: reject, Δ ← Δ / γ2

A trial loss that is NaN or infinite counts as ``ρ = −∞`` (a rejection), not as an error: the radius
shrinks and the parameters stay where they were.

Cost per step, in backprops (gradient 1, HVP 1, function value ½): ``1 + cg_iterations + ½``.

Reference: Kohler, Adolphs, Lucchi, "Adaptive norms for deep learning with regularized Newton methods"
(defaults from their Table 1); Conn, Gould, Toint, "Trust Region Methods" (Alg. 7.5.1, §6.1).

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([3.0, -2.0], dtype=torch.float64))
>>> opt = EllipsoidalTR([w], ellipsoid="sphere", radius=1.0)
>>> for _ in range(20):
...     loss = opt.step(lambda: (w ** 2).sum())
>>> bool(w.detach().abs().max() < 1e-8), opt.accepted, opt.rho
(True, True, 1.0)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from ..errors import ConfigurationError, NonFiniteLossError, OptimizerStateError
from .counting import BackpropCounter
from .ellipsoid import ELLIPSOIDS, DiagonalEllipsoid
from .steihaug import steihaug_cg

__all__ = ["EllipsoidalTR", "TR_DEFAULTS"]

# Kohler et al., Table 1 and their code; Δ0 and γ2 depend on the ellipsoid.
TR_DEFAULTS: dict[str, dict[str, float]] = {
    "sphere": {"radius": 0.05, "gamma2": 1.5},
    "adagrad": {"radius": 0.05, "gamma2": 1.5},
    "rmsprop": {"radius": 1e-4, "gamma2": 1.75},
}

# Options a param group may set for itself: they shape A on that group's coordinates only. The others
# belong to the one subproblem all groups share and must agree across groups.
_GROUP_KEYS = ("ellipsoid", "beta", "eps")
_SHARED_KEYS = ("initial_radius", "radius_max", "eta1", "eta2", "gamma1", "gamma2", "kappa", "max_cg_iters")
_TINY = 1e-15
_STATE_KEY = "trust_region"


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ConfigurationError(f"EllipsoidalTR {name} must be a positive finite number, got {value!r}")
    return float(value)


class EllipsoidalTR(torch.optim.Optimizer):
    """Trust-region Newton–CG with a diagonal (sphere, Adagrad or RMSProp) ellipsoid; no learning rate.

    Args:
        params: parameters or param groups. A group may set ``ellipsoid``, ``beta`` and ``eps``; the radius
            rule and CG options are shared by all groups (one subproblem spans them).
        ellipsoid: ``"rmsprop"`` (default), ``"adagrad"`` or ``"sphere"``.
        radius: initial radius ``Δ0`` (default 1e-4 for RMSProp, 0.05 otherwise).
        radius_max: ``Δ_max`` (10).
        eta1, eta2: acceptance and expansion thresholds of ρ (0.01, 0.95).
        gamma1: expansion factor (1.1); gamma2: shrink divisor (1.75 for RMSProp, 1.5 otherwise).
        beta: RMSProp ellipsoid decay (0.8); eps: ``G0`` and floor of ``G`` (1e-10).
        kappa: CG forcing constant (0.1); max_cg_iters: at most this many HVPs per step (50).

    ``step(closure)``: ``closure()`` returns the minibatch loss as a scalar tensor and must **not** call
    ``backward()``; it is evaluated twice per step (at ``w`` with grad enabled, at ``w + s`` without), so it
    must use the same minibatch and be deterministic (dropout off) for ρ to mean anything. The step returns
    the loss at ``w`` (detached).

    Exposed state, from ``opt.state["trust_region"]`` and as properties: ``radius`` (for the next step),
    ``rho``, ``accepted``, ``cg_iterations`` and ``cg_exit`` (last step), ``hvps`` and ``backprops``
    (totals); ``last_step_work`` is the last step's :class:`BackpropCounter`. :meth:`preconditioner`
    gives ``P = A⁻¹`` per parameter for the preconditioned-geometry metric.
    """

    # The closure returns the loss; this optimizer differentiates it itself.
    closure_calls_backward = False

    def __init__(self, params: Iterable[Any], ellipsoid: str = "rmsprop", *, radius: float | None = None,
                 radius_max: float = 10.0, eta1: float = 0.01, eta2: float = 0.95, gamma1: float = 1.1,
                 gamma2: float | None = None, beta: float = 0.8, eps: float = 1e-10, kappa: float = 0.1,
                 max_cg_iters: int = 50) -> None:
        if ellipsoid not in ELLIPSOIDS:
            raise ConfigurationError(
                f"unknown ellipsoid {ellipsoid!r}; expected one of {', '.join(ELLIPSOIDS)}"
            )
        radius = TR_DEFAULTS[ellipsoid]["radius"] if radius is None else radius
        gamma2 = TR_DEFAULTS[ellipsoid]["gamma2"] if gamma2 is None else gamma2
        defaults = dict(ellipsoid=ellipsoid, beta=beta, eps=eps, initial_radius=radius, radius_max=radius_max,
                        eta1=eta1, eta2=eta2, gamma1=gamma1, gamma2=gamma2, kappa=kappa,
                        max_cg_iters=max_cg_iters)
        self._check_shared(defaults)
        DiagonalEllipsoid(ellipsoid, beta=beta, eps=eps)
        super().__init__(params, defaults)
        self.state[_STATE_KEY] = {
            "step": 0, "radius": float(radius), "rho": math.nan, "accepted": None,
            "accepted_steps": 0, "loss": math.nan, "trial_loss": math.nan,
            "predicted_decrease": math.nan, "actual_decrease": math.nan,
            "cg_iterations": 0, "cg_exit": "", "cauchy": False,
            "gradients": 0, "hvps": 0, "function_values": 0, "backprops": 0.0,
        }
        self.last_step_work = BackpropCounter()

    @staticmethod
    def _check_shared(options: dict[str, Any]) -> None:
        for key in ("initial_radius", "radius_max", "gamma1", "gamma2", "kappa"):
            _positive(key, options[key])
        if options["initial_radius"] > options["radius_max"]:
            raise ConfigurationError(
                f"EllipsoidalTR radius {options['initial_radius']} exceeds radius_max "
                f"{options['radius_max']}"
            )
        if not (0.0 <= options["eta1"] <= options["eta2"] < 1.0):
            raise ConfigurationError(
                f"EllipsoidalTR needs 0 <= eta1 <= eta2 < 1, got eta1={options['eta1']!r}, "
                f"eta2={options['eta2']!r}"
            )
        if options["gamma1"] < 1.0 or options["gamma2"] <= 1.0:
            raise ConfigurationError(
                f"EllipsoidalTR needs gamma1 >= 1 and gamma2 > 1, got gamma1={options['gamma1']!r}, "
                f"gamma2={options['gamma2']!r}"
            )
        if options["kappa"] > 1.0:
            raise ConfigurationError(f"EllipsoidalTR kappa must lie in (0, 1], got {options['kappa']!r}")
        cg = options["max_cg_iters"]
        if isinstance(cg, bool) or not isinstance(cg, int) or cg < 1:
            raise ConfigurationError(f"EllipsoidalTR max_cg_iters must be a positive integer, got {cg!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = set(param_group) - set(_GROUP_KEYS) - set(_SHARED_KEYS) - {"params", "param_names"}
        if unknown:
            raise ConfigurationError(
                f"unknown EllipsoidalTR param-group option(s) {sorted(unknown)}; a group may set "
                f"{', '.join(_GROUP_KEYS)}"
            )
        for key in _SHARED_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ConfigurationError(
                    f"param group sets {key}={param_group[key]!r} but EllipsoidalTR solves one subproblem "
                    f"over all groups, so {key} is shared ({self.defaults[key]!r}); pass it to the "
                    f"constructor instead"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        DiagonalEllipsoid(group["ellipsoid"], beta=group["beta"], eps=group["eps"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch keeps non-parameter state by reference; a private copy keeps two optimizers loaded from one
        # dict from advancing each other's radius and counts.
        if _STATE_KEY in self.state:
            self.state[_STATE_KEY] = dict(self.state[_STATE_KEY])

    # ----------------------------------------------------------------------------------------- state

    @property
    def trust_region_state(self) -> dict[str, Any]:
        """The optimizer-wide state (radius, ρ, counts); a live dict, saved with ``state_dict``."""
        return self.state[_STATE_KEY]

    @property
    def radius(self) -> float:
        """The radius the next step will use."""
        return self.trust_region_state["radius"]

    @property
    def rho(self) -> float:
        """ρ of the last step (NaN before the first)."""
        return self.trust_region_state["rho"]

    @property
    def accepted(self) -> bool | None:
        """Whether the last step was accepted (``None`` before the first)."""
        return self.trust_region_state["accepted"]

    @property
    def cg_iterations(self) -> int:
        """CG iterations (HVPs) of the last step."""
        return self.trust_region_state["cg_iterations"]

    @property
    def hvps(self) -> int:
        """HVPs over all steps."""
        return self.trust_region_state["hvps"]

    @property
    def backprops(self) -> float:
        """Backprops over all steps: gradients + HVPs + ½ function values."""
        return self.trust_region_state["backprops"]

    def _trainable(self) -> list[tuple[torch.Tensor, DiagonalEllipsoid]]:
        pairs = [(p, DiagonalEllipsoid(group["ellipsoid"], beta=group["beta"], eps=group["eps"]))
                 for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not pairs:
            raise ConfigurationError("EllipsoidalTR has no parameters that require grad")
        kinds = {(p.dtype, p.device) for p, _ in pairs}
        if len(kinds) > 1:
            found = ", ".join(sorted(f"{d} on {dev}" for d, dev in kinds))
            raise ConfigurationError(
                f"EllipsoidalTR solves one subproblem over all parameters, so they must share one dtype "
                f"and device; found {found}. Move the model with model.to(dtype, device) first"
            )
        return pairs

    def ellipsoid_diagonal(self) -> list[torch.Tensor]:
        """The ellipsoid diagonal ``a = sqrt(max(G, ε))`` per trainable parameter, shaped like it.

        Order: parameters that require grad, group by group. Raises :class:`OptimizerStateError` for an
        Adagrad or RMSProp ellipsoid before the first step (``G`` holds only ``ε`` then).
        """
        out = []
        for p, ell in self._trainable():
            G = self.state[p].get("G") if p in self.state else None
            if ell.kind != "sphere" and G is None:
                raise OptimizerStateError(
                    "EllipsoidalTR has taken no step yet, so its ellipsoid holds no gradient "
                    "information; call step(closure) at least once before reading it"
                )
            out.append(ell.diagonal(G, p.detach()))
        return out

    def preconditioner(self) -> list[torch.Tensor]:
        """``P = A⁻¹ = diag(1/a)`` per trainable parameter, as in ``x ← x − P g`` (docs/metrics.md#precond).

        The geometry this optimizer sees is ``P^{1/2} H P^{1/2}``; same order and errors as
        :meth:`ellipsoid_diagonal`.
        """
        return [a.reciprocal() for a in self.ellipsoid_diagonal()]

    # ------------------------------------------------------------------------------------------ step

    def _evaluate(self, closure: Callable[[], Any], where: str) -> torch.Tensor:
        loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigurationError(
                f"EllipsoidalTR's closure must return the loss as a scalar tensor, got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)} "
                f"at {where}"
            )
        return loss.reshape(())

    def step(  # type: ignore[override]
            self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One trust-region iteration; see the class docstring. Returns the loss at the old parameters."""
        if closure is None:
            raise ConfigurationError(
                "EllipsoidalTR.step needs a closure that returns the minibatch loss without calling "
                "backward(), e.g. opt.step(lambda: loss_fn(model(x), y))"
            )
        pairs = self._trainable()
        params = [p for p, _ in pairs]
        tr = self.trust_region_state
        shared = self.defaults

        with torch.enable_grad():
            loss = self._evaluate(closure, "the current parameters")
            if not loss.requires_grad:
                raise ConfigurationError(
                    "the closure's loss does not depend on the parameters (it has no grad_fn); "
                    "do not compute it under torch.no_grad() or detach it"
                )
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(
                    f"the closure's loss is {float(loss.detach())} at the current parameters; the parameters "
                    f"were left unchanged (lower the learning signal, check the data)"
                )
            try:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True,
                                            materialize_grads=True)
            except RuntimeError as err:
                if "second time" in str(err):
                    raise ConfigurationError(
                        "EllipsoidalTR's closure must return the loss without calling backward(): "
                        "the step builds the gradient graph itself"
                    ) from err
                raise
        g = torch.cat([gi.detach().reshape(-1) for gi in grads])
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteLossError(
                "the gradient of the closure's loss has NaN or infinite entries; the parameters were "
                "left unchanged"
            )

        # The updated accumulators are committed only once the solver has returned, so an error inside it
        # leaves the optimizer's state as it was, like the parameters.
        accumulators, diagonals = [], []
        for (p, ell), gi in zip(pairs, grads):
            G = self.state[p]["G"].clone() if "G" in self.state.get(p, {}) else ell.init(p.detach())
            accumulators.append(ell.update(G, gi.detach()))
            diagonals.append(ell.diagonal(G, p.detach()).reshape(-1))
        a = torch.cat(diagonals)

        # Only gradients the graph connects to the parameters contribute to H v; a gradient that is
        # constant in w (a linear block) has no grad_fn and a zero Hessian block.
        linked = [i for i, gi in enumerate(grads) if gi.requires_grad]
        sizes = [p.numel() for p in params]

        def hvp(v: torch.Tensor) -> torch.Tensor:
            if not linked:
                return torch.zeros_like(v)
            pieces = v.split(sizes)
            Hv = torch.autograd.grad([grads[i] for i in linked], params,
                                     grad_outputs=[pieces[i].view_as(params[i]) for i in linked],
                                     retain_graph=True, allow_unused=True, materialize_grads=True)
            return torch.cat([h.reshape(-1) for h in Hv])

        result = steihaug_cg(hvp, g, tr["radius"], a, kappa=shared["kappa"],
                             max_iter=shared["max_cg_iters"])
        loss_value = float(loss.detach())
        loss_out = loss.detach()
        # Free the double-backward graph before the trial forward pass so both never coexist in memory.
        del grads, hvp, gi, loss

        for p, G in zip(params, accumulators):
            if G is not None:
                self.state[p]["G"] = G

        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, si in zip(params, result.s.split(sizes)):
                p.add_(si.view_as(p))
            try:
                trial_value = float(self._evaluate(closure, "the trial point w + s").detach())
            except BaseException:
                for p, old in zip(params, saved):
                    p.copy_(old)
                raise
        actual = loss_value - trial_value
        predicted = -result.model_value
        if not math.isfinite(trial_value):
            rho = -math.inf
        elif abs(actual) < _TINY and abs(predicted) < _TINY:
            rho = 1.0
        elif predicted <= 0.0:
            rho = -math.inf
        else:
            rho = actual / predicted

        accepted = rho >= shared["eta1"]
        if accepted:
            if rho >= shared["eta2"]:
                tr["radius"] = min(shared["gamma1"] * tr["radius"], shared["radius_max"])
        else:
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
            tr["radius"] = tr["radius"] / shared["gamma2"]

        work = BackpropCounter(gradients=1, hvps=result.hvps, function_values=1)
        self.last_step_work = work
        tr.update(step=tr["step"] + 1, rho=rho, accepted=accepted,
                  accepted_steps=tr["accepted_steps"] + int(accepted), loss=loss_value,
                  trial_loss=trial_value, predicted_decrease=predicted, actual_decrease=actual,
                  cg_iterations=result.iterations, cg_exit=result.exit, cauchy=result.cauchy,
                  gradients=tr["gradients"] + work.gradients, hvps=tr["hvps"] + work.hvps,
                  function_values=tr["function_values"] + work.function_values)
        tr["backprops"] = BackpropCounter(tr["gradients"], tr["hvps"], tr["function_values"]).backprops
        return loss_out
