"""Whether a first-order graph carries exact second derivatives: the checks a Landscape runs before its first
Hessian-vector product.

Built-in operations either have a double backward or raise when asked for one. Two kinds of node can cut
second-order terms without any error, and a Hessian through them would be silently wrong:

* a custom ``torch.autograd.Function`` marked ``@once_differentiable`` (found by its node type);
* a custom ``torch.autograd.Function`` whose ``backward`` leaves autograd: it computes through numpy, on
  ``.detach()``-ed tensors or under ``torch.no_grad``. Autograd records nothing for that computation, so the
  gradient loses its dependence on the parameters through that node.

The second kind is found two ways. Structurally (:class:`CustomBackwardWatch`), when the node's backward
returns a nonzero gradient that carries no graph although the gradient it was given does: a backward is
linear in its incoming gradient, so the result must depend on it, and the missing term is certainly nonzero.
Numerically (:func:`cut_discrepancy`), for a backward that keeps the incoming gradient but drops its
dependence on the Function's own inputs (``2 * x.detach() * g`` for ``x**2``): its Hessian-vector product
is compared with central differences of the gradient at two step sizes. A cut leaves the same discrepancy at
both; rounding, truncation and a ReLU kink crossed by the step do not (they scale with the step), so a
piecewise-linear Function (a hand-written ReLU, whose true second derivative is zero) is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Self

import torch

from ..errors import UnsupportedOperationError

__all__ = [
    "CustomBackwardWatch",
    "CutDiscrepancy",
    "check_broken_nodes",
    "custom_function_nodes",
    "cut_discrepancy",
    "no_double_backward",
    "refuse_cut",
]

_BROKEN_NODES = {
    "Error": "a custom autograd Function marked @once_differentiable",
    "DelayedError": "a custom autograd Function marked @once_differentiable",
    "NotImplemented": "an operation whose derivative is not implemented",
}

# Functions whose double backward geomprobe itself provides and tests against torch's (engine/autodiff).
_OWN_MODULE = "geomprobe.engine.autodiff"

_REMEDY = (
    "write its backward with differentiable torch operations on the saved tensors (no numpy, .detach() or "
    "torch.no_grad), or mark it @once_differentiable and pass hvp_method='finite-difference' (approximate, flagged)"
)


def _walk(roots: Iterable[torch.Tensor | None]):
    """Every node of the graphs below ``roots``, each once."""
    seen: set = set()
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(f for f, _ in node.next_functions)


def check_broken_nodes(grads: Sequence[torch.Tensor | None]) -> None:
    """Refuse a first-order graph holding nodes that fail, or silently drop terms, in a double backward.

    Autograd only runs nodes on a path to the inputs asked for, and a once-differentiable Function detaches
    its backward from the parameters: its HVP terms would vanish without any error. Cost: one walk of the
    graph, no HVP.
    """
    for node in _walk(grads):
        what = _BROKEN_NODES.get(type(node).__name__)
        if what is not None:
            raise UnsupportedOperationError(
                f"the model's gradient graph contains {what} ({node.name()}): its double backward is missing, "
                "so exact Hessian-vector products are impossible through it; replace that layer, or for a "
                "smooth model pass hvp_method='finite-difference' (approximate, flagged)"
            )


def _function_name(node) -> str:
    cls = getattr(node, "_forward_cls", None)
    return f"{cls.__module__}.{cls.__qualname__}" if cls is not None else node.name()


def custom_function_nodes(roots: Iterable[torch.Tensor | None]) -> list:
    """The nodes of user-defined ``torch.autograd.Function`` s below ``roots`` (geomprobe's own excluded)."""
    out = []
    for node in _walk(roots):
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            cls = getattr(node, "_forward_cls", None)
            if cls is None or not cls.__module__.startswith(_OWN_MODULE):
                out.append(node)
    return out


@dataclass
class CustomBackwardWatch:
    """Hooks on the custom Function nodes of a forward graph while its gradient is taken with
    ``create_graph=True``; :meth:`check` then refuses a backward that returned a nonzero gradient outside
    autograd although the gradient it was given depends on the parameters. Cost: nothing beyond the hooks."""

    nodes: list
    _seen: dict = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The watched Functions' qualified names."""
        return [_function_name(n) for n in self.nodes]

    def __enter__(self) -> Self:
        for node in self.nodes:
            self._handles.append(node.register_hook(self._record(node)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _record(self, node) -> Callable:
        def hook(grad_inputs, grad_outputs) -> None:
            given = any(isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs)
            lost = [i for i, g in enumerate(grad_inputs)
                    if given and isinstance(g, torch.Tensor) and not g.requires_grad and bool(g.ne(0).any())]
            if lost:
                self._seen[node] = lost

        return hook

    def check(self) -> None:
        """Raise :class:`UnsupportedOperationError` naming the first Function whose backward left autograd."""
        for node, inputs in self._seen.items():
            raise UnsupportedOperationError(
                f"the backward of the custom autograd Function {_function_name(node)} ({node.name()}) returns "
                f"a gradient for its input(s) {', '.join(map(str, inputs))} that does not depend on the "
                "parameters through autograd (numpy, .detach() or torch.no_grad inside backward): the Hessian "
                f"through it would be silently wrong; {_REMEDY}"
            )


@dataclass
class CutDiscrepancy:
    """A central-difference check of one Hessian-vector product: the relative discrepancy at the step
    ``eps`` and whether it stayed the same at ``eps / 8`` (a cut) or moved with the step (rounding, a kink)."""

    relative: float
    consistent: bool
    blocks: list[str]


def cut_discrepancy(
    hv: torch.Tensor,
    fd: Callable[[float], torch.Tensor],
    eps: float,
    tol: float,
    blocks: Sequence[tuple[str, slice]],
) -> CutDiscrepancy:
    """Compare ``hv = H v`` with ``fd(eps)``, the central difference ``(g(w + eps v) - g(w - eps v)) / 2 eps``.

    The discrepancy ``d(eps) = fd(eps) - hv`` is truncation ``O(eps^2)`` plus rounding ``O(u / eps)`` plus, when
    a step crosses a kink of a piecewise-linear model, a jump term ``O(1 / eps)``; a cut second-order term adds
    a part independent of ``eps``. It is called consistent when ``|d(eps) - d(eps/8)| <= |d(eps)| / 4`` and
    ``|d(eps)| > tol |H v|``: none of the step-dependent terms can do that. Cost: 4 gradients (``fd`` twice).
    ``blocks`` (name, slice of the flat vector) name where the discrepancy exceeds ``tol``.
    """
    d1 = fd(eps) - hv
    scale = max(float(hv.norm()), float((d1 + hv).norm()), torch.finfo(hv.dtype).tiny)
    rel = float(d1.norm()) / scale
    if not rel > tol:
        return CutDiscrepancy(rel, False, [])
    d2 = fd(eps / 8) - hv
    consistent = float((d1 - d2).norm()) <= 0.25 * float(d1.norm())
    named = [name for name, sl in blocks if float(d1[sl].norm()) > tol * scale]
    return CutDiscrepancy(rel, consistent, named)


def refuse_cut(found: CutDiscrepancy, functions: Sequence[str]) -> None:
    """Raise :class:`UnsupportedOperationError` for a consistent discrepancy, naming the Functions and blocks."""
    names = ", ".join(dict.fromkeys(functions)) or "a custom autograd Function"
    where = ", ".join(found.blocks[:4]) + (", ..." if len(found.blocks) > 4 else "")
    raise UnsupportedOperationError(
        f"the gradient of parameter block(s) {where or '?'} does not depend on the parameters through a "
        f"differentiable path: Hessian-vector products differ from differences of gradients by "
        f"{found.relative:.2g} (relative) at two step sizes. The custom autograd Function(s) {names} in the model "
        f"compute their backward outside autograd (numpy, .detach() or torch.no_grad), so the Hessian would be "
        f"silently wrong; {_REMEDY}"
    )


# How torch words a missing double backward (the operation's name, where it gives one)
_NO_DOUBLE_BACKWARD = re.compile(
    r"(derivative for (?P<op>[\w.:]+) is not implemented|(?P<op2>[\w.:]+) does not support double backward"
    r"|double backward.*not (?:supported|implemented))",
    re.IGNORECASE,
)


def no_double_backward(error: BaseException) -> UnsupportedOperationError | None:
    """The refusal to raise for ``error`` when it is torch saying an operation has no double backward (naming
    the operation and what to do), else None. Costs nothing."""
    m = _NO_DOUBLE_BACKWARD.search(str(error))
    if m is None:
        return None
    op = m.group("op") or m.group("op2") or "an operation in the model"
    return UnsupportedOperationError(
        f"double backward is not implemented for {op}, so exact Hessian-vector products are "
        "impossible through it; replace that layer, or for a smooth model pass "
        "hvp_method='finite-difference' (approximate, flagged)"
    )

