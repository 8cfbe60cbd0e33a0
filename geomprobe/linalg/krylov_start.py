"""A Lanczos run's start: the unit start vector (given or drawn) and the basis holding it."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigurationError
from .device_draw import drawn_on_device, draws_elsewhere
from .krylov_basis import LanczosBasis
from .space import VectorSpace
from .vectors import default_generator, vector_norm

__all__ = ["start_basis", "start_vector"]


def start_vector(dim: int, v0: torch.Tensor | None, generator: torch.Generator | None, dtype: torch.dtype,
                 device, space: VectorSpace | None = None) -> torch.Tensor:
    """The unit start vector: ``v0`` normalized, or a Gaussian drawn on ``device`` in ``dtype``.

    With a sharded ``space`` both are this process's slice (``v0`` of length ``space.local_dim``) and the
    norm is the global one."""
    if v0 is None:
        if space is None:  # a large host vector is drawn by threads (VectorSpace.gaussian)
            q = VectorSpace(dim).gaussian(generator or default_generator(), dtype, device)
        else:
            q = space.gaussian(generator or default_generator(), dtype, device)
    else:
        n = dim if space is None else space.local_dim
        if v0.shape != (n,):
            raise ConfigurationError(f"v0 must have shape ({n},), got {tuple(v0.shape)}")
        q = v0.to(dtype=dtype, device=device if device is not None else v0.device, copy=True)
    qn = float(vector_norm(q) if space is None else space.norm(q))
    if not math.isfinite(qn) or qn == 0:
        raise ConfigurationError("the Lanczos start vector is zero or not finite")
    return q.div_(qn)  # a Python scalar: half types scale in float32, not by a norm rounded to their precision


def start_basis(space: VectorSpace, v0: torch.Tensor | None, generator: torch.Generator | None, dtype: torch.dtype,
                device, *, basis_dtype: torch.dtype | None = None, basis_device=None, capacity: int | None = None,
                contiguous: bool = False, draw_device=None, lean: bool | str = False,
                rows_limit: int | None = None) -> tuple[LanczosBasis, torch.Tensor]:
    """A Lanczos run's basis (:class:`LanczosBasis` of ``basis_dtype or dtype`` on ``basis_device``, else where the
    vectors live; ``capacity``, ``contiguous`` as it takes them) holding the unit start vector
    (:func:`start_vector`), and that vector as the compute device holds it.

    ``draw_device``: where a random start is drawn when the vectors live in host memory and it is an
    accelerator (:func:`.device_draw.drawn_on_device`; the host-vector mode, whose CPU draw of a 1B model's start
    took about a product's time): a host basis of the vectors' own type takes the draw straight into its first
    row, written once. Elsewhere, and for a given ``v0`` or a sharded space, it is not used. ``lean``: the basis
    keeps two d-vectors on the compute device, or one beside a product (``"streamed"``; :class:`LanczosBasis`'s
    ``lean``). ``rows_limit``: the most rows the run stores (page-locked blocks are not allocated ahead beyond
    it). Cost: no matvec."""
    sharded = space if space.sharded else None
    if v0 is None and sharded is None and draws_elsewhere(device, draw_device):
        home = torch.device("cpu")
        basis = LanczosBasis(space.local_dim, basis_dtype or dtype, home if basis_device is None else
                             torch.device(basis_device), home, capacity=capacity, contiguous=contiguous, space=space,
                             round_to=dtype, rows_limit=rows_limit)
        gen = generator or default_generator()
        if basis.on_host and basis.round_to is None:
            row = basis._next_row()
            drawn_on_device(space.dim, gen, dtype, draw_device, out=row, unit=True)
            return basis, row
        return basis, basis.append_normalized(drawn_on_device(space.dim, gen, dtype, draw_device, unit=True), 1.0)
    q = start_vector(space.dim, v0, generator, dtype, device, sharded)
    basis = LanczosBasis(space.local_dim, basis_dtype or dtype, q.device if basis_device is None else
                         torch.device(basis_device), q.device, capacity=capacity, contiguous=contiguous, space=space,
                         round_to=dtype, lean=lean, rows_limit=rows_limit)
    if basis.lean_vectors is not None:
        basis.lean_vectors.adopt(q)  # a fresh vector: given back after the first step like the others
    return basis, basis.append_normalized(q, 1.0)
