"""Directions in parameter space for views of the landscape, and parameter sets as flat vectors.

A direction is named or given:

=================  ==========================================================================  ===========
name               vector                                                                      scaled
=================  ==========================================================================  ===========
``"top"``          the Hessian's top eigenvector (its Ritz vector; ``"top2"`` the second, ...)  unit norm
``"bottom"``       the Hessian's bottom eigenvector (``"bottom2"``, ...)                        unit norm
``"gradient"``     the gradient ``g`` at the Landscape's parameters                             unit norm
``"update"``       the optimizer's last step ``theta_t - theta_{t-1}``                          as taken
``"random"``       a seeded Gaussian vector                                                    by filter
a tensor           flat ``(d,)``, or a dict of tensors shaped like the parameters it names      as given
=================  ==========================================================================  ===========

``normalize`` overrides the scaling: ``"unit"`` (norm 1), ``"filter"`` (Li et al. 2018: each filter, a slice
along a weight's first dimension, is scaled to the norm of the same filter of the weights, so that a step of
1 moves every filter by its own size; a parameter of one dimension, a bias or a norm's scale, takes the
weights themselves, or zeros with ``filter_1d="zero"``, as in Li et al.'s code) or ``"none"``.
The eigenvector's and the random vector's signs are arbitrary: views of ``t`` and ``-t`` are mirror images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..engine.evaluate import flat_parameters
from ..errors import ConfigurationError, OptimizerStateError
from ..linalg.vectors import default_generator, gaussian
from ..metrics.direction import as_update
from ..metrics.ritz_vectors import extreme_ritz

__all__ = ["NAMED", "NORMALIZE", "resolve_direction", "filter_normalize", "parameter_vector"]

NAMED = ("top", "bottom", "gradient", "update", "random")
NORMALIZE = ("unit", "filter", "none")
_DEFAULT_SCALE = {"top": "unit", "bottom": "unit", "gradient": "unit", "update": "none", "random": "filter",
                  "tensor": "none"}
_EIGEN = re.compile(r"^(top|bottom)(\d*)$")


def filter_normalize(land: Any, direction: torch.Tensor, *, filter_1d: str = "weights") -> torch.Tensor:
    """``direction`` (flat, length ``d``) with each filter scaled to the norm of the weights' filter.

    A filter is a slice along a parameter's first dimension (an output channel of a convolution, a row of a
    linear layer). A zero filter of ``direction`` stays zero. Parameters of one dimension take the weights
    (``filter_1d="weights"``) or zeros (``"zero"``). Cost: one pass over ``d`` numbers.
    """
    if filter_1d not in ("weights", "zero"):
        raise ConfigurationError(f"filter_1d must be 'weights' or 'zero', got {filter_1d!r}")
    parts = []
    for p, piece in zip(land.params, land.space.split(direction)):
        w = p.detach().to(direction.dtype)
        if p.dim() <= 1:
            parts.append(w.clone() if filter_1d == "weights" else torch.zeros_like(w))
            continue
        rows = piece.reshape(p.shape[0], -1)
        wn = w.reshape(p.shape[0], -1).norm(dim=1, keepdim=True)
        dn = rows.norm(dim=1, keepdim=True)
        parts.append(torch.where(dn > 0, rows * (wn / torch.where(dn > 0, dn, torch.ones_like(dn))),
                                 torch.zeros_like(rows)))
    return land.space.flatten(parts)


def parameter_vector(land: Any, source: Any, what: str = "parameter set") -> torch.Tensor:
    """``source`` as a flat vector of ``land``'s measured parameters: a model of the same architecture, a dict
    of tensors by parameter name (a state dict; other keys ignored), or a flat tensor of length ``d``."""
    if isinstance(source, nn.Module):
        source = dict(source.named_parameters(remove_duplicate=False))
    if isinstance(source, torch.Tensor):
        if source.dim() != 1 or source.shape[0] != land.dim:
            raise ConfigurationError(f"{what}: a flat tensor must have shape ({land.dim},), got {tuple(source.shape)}")
        flat = source.detach()
    elif isinstance(source, Mapping):
        missing = [n for n in land.param_names if n not in source]
        if missing:
            raise ConfigurationError(f"{what} lacks parameter(s) {', '.join(missing[:5])}"
                                     f"{', ...' if len(missing) > 5 else ''}; it must hold every measured parameter")
        parts = []
        for n, p in zip(land.param_names, land.params):
            t = source[n]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigurationError(f"{what}: {n!r} has shape {got}, the model's is {tuple(p.shape)}")
            parts.append(t.detach().to(device=land.device, dtype=land.dtype))
        flat = land.space.flatten(parts)
    else:
        raise ConfigurationError(f"{what} must be a model, a dict of tensors by parameter name or a flat tensor, "
                                 f"got {type(source).__name__}")
    flat = flat.to(device=land.device, dtype=land.dtype)
    if not torch.isfinite(flat).all():
        raise ConfigurationError(f"{what} has non-finite entries")
    return flat


def _given(land: Any, spec: Any) -> torch.Tensor:
    if isinstance(spec, torch.Tensor):
        return parameter_vector(land, spec, "direction")
    unknown = [k for k in spec if k not in land.param_names]
    if unknown:
        raise ConfigurationError(f"direction names unknown parameter(s) {', '.join(map(repr, unknown[:5]))}; "
                                 f"measured: {', '.join(land.param_names[:8])}{' ...' if land.dim > 8 else ''}")
    full = {n: spec.get(n, torch.zeros_like(p)) for n, p in zip(land.param_names, land.params)}
    return parameter_vector(land, full, "direction")


def _describe(spec: Any) -> str:
    return spec if isinstance(spec, str) else "given"


def resolve_direction(land: Any, spec: Any, *, normalize: str | None = None, seed: int = 0,
                      last_update: torch.Tensor | None = None, previous: Any = None, tol: float = 1e-3,
                      max_iter: int | None = None, filter_1d: str = "weights") -> tuple[torch.Tensor, dict]:
    """The direction ``spec`` (see the module docstring) as a flat vector on ``land``'s device and dtype, and
    a JSON-ready description (``direction``, ``normalize``, ``norm``; ``ritz_value``/``ritz_err`` for
    eigenvectors).

    Cost: ``"top"``/``"bottom"``: one Lanczos run with its basis kept (one HVP per step, at most
    ``min(d, max_iter or 300)``) unless ``spectrum`` or an earlier view recorded enough Ritz vectors on this
    Landscape; the others: none. ``"update"`` needs ``last_update`` (a flat step, as a probe passes) or
    ``previous`` (the parameters before the step: a model, a state dict or a flat tensor).
    """
    if normalize is not None and normalize not in NORMALIZE:
        raise ConfigurationError(f"normalize must be one of {', '.join(NORMALIZE)} (or None), got {normalize!r}")
    info: dict[str, Any] = {"direction": _describe(spec)}
    if isinstance(spec, str):
        m = _EIGEN.match(spec)
        if m:
            kind, index = m.group(1), int(m.group(2) or 1)
            if index < 1:
                raise ConfigurationError(f"direction {spec!r}: eigenvectors count from 1 ({kind}, {kind}2, ...)")
            ritz = extreme_ritz(land, kind, index, tol=tol, max_iter=max_iter, seed=seed)
            if len(ritz) < index:
                raise ConfigurationError(f"direction {spec!r}: the Hessian has only {len(ritz)} Ritz pairs here")
            vec = ritz.vectors[index - 1].to(land.device)  # on the host in the host-vector mode
            info.update(ritz_value=ritz.values[index - 1], ritz_err=ritz.errs[index - 1])
            kind = "top"
        elif spec == "gradient":
            vec, kind = land.grad.to(land.device, copy=True), "gradient"
            if float(vec.norm()) == 0:
                raise ConfigurationError("direction 'gradient': the gradient is zero here; choose another direction")
        elif spec == "update":
            if last_update is not None:
                vec = as_update(land, last_update)
            elif previous is not None:
                vec = flat_parameters(land) - parameter_vector(land, previous, "previous")
            else:
                raise OptimizerStateError(
                    "direction 'update' needs the optimizer's last step: inside a probe it is known after the first "
                    "optimizer step; outside, pass last_update= (a flat tensor) or previous= (the parameters before "
                    "the step)")
            kind = "update"
        elif spec == "random":
            vec, kind = gaussian(land.dim, default_generator(seed), land.dtype, land.device), "random"
        else:
            raise ConfigurationError(f"unknown direction {spec!r}; use one of {', '.join(NAMED)} (top2, bottom2, ... "
                                     "for further eigenvectors), a flat tensor or a dict of tensors by parameter name")
    elif isinstance(spec, (torch.Tensor, Mapping)):
        vec, kind = _given(land, spec), "tensor"
    else:
        raise ConfigurationError(f"a direction is a name ({', '.join(NAMED)}), a flat tensor or a dict of tensors, "
                                 f"got {type(spec).__name__}")
    scale = normalize or _DEFAULT_SCALE[kind]
    if scale == "filter":
        vec = filter_normalize(land, vec, filter_1d=filter_1d)
    elif scale == "unit":
        n = float(vec.norm())
        if n == 0:
            raise ConfigurationError(f"direction {info['direction']!r} is zero; it cannot be scaled to unit norm")
        vec = vec / n
    norm = float(vec.norm())
    if norm == 0 or not torch.isfinite(vec).all():
        raise ConfigurationError(f"direction {info['direction']!r} is zero or not finite after "
                                 f"normalize={scale!r}; choose another direction or scaling")
    info.update(normalize=scale, norm=norm)
    return vec, info
