"""The finite-difference HVP of a sharded (FSDP2) model, a mixin of
:class:`~geomprobe.engine.sharded_landscape.ShardedLandscape`: the route for models whose operations have no
double backward. Each product is Richardson-extrapolated from central differences of FSDP gradients at steps
``h`` and ``2h`` (four gradients per vector), and its error estimate ``2 ||D(h) - D(2h)|| / ||v||`` is appended to
``hvp_errors`` (the Lanczos bounds are widened by them)."""

from __future__ import annotations

import math

import torch

__all__ = ["FiniteDifferences"]


class FiniteDifferences:
    """``_fd_one`` (one product, as this rank's slice) and ``_fd_step`` (the step size); uses the Landscape's
    ``_dparams``, ``layout``, ``vector_space``, ``fd_eps``, ``_fsdp_grad``, ``hvp_errors``, ``dtype`` and ``dim``."""

    def _fd_one(self, v: torch.Tensor) -> torch.Tensor:
        vn = float(self.vector_space.norm(v))
        if vn == 0.0:
            self.hvp_errors.append(0.0)
            return torch.zeros_like(v)
        shards = [p.to_local() for p in self._dparams]
        steps = self.layout.split_local(v)
        h = self.fd_eps or self._fd_step(shards, steps, vn)
        saved = [t.detach().clone() for t in shards]

        def grad_at(step: float, subtract_from: torch.Tensor | None = None) -> torch.Tensor:
            with torch.no_grad():
                for t, t0, dv in zip(shards, saved, steps):
                    t.copy_(t0).add_(dv.to(t.dtype), alpha=step)
            return self._fsdp_grad(subtract_from)[0]

        try:
            # each difference is formed in place as its second gradient arrives: at most the two differences
            # and FSDP's fresh gradient shards are held (three slices)
            d1 = grad_at(-h, grad_at(h)).div_(2 * h)
            d2 = grad_at(-2 * h, grad_at(2 * h)).div_(4 * h)
        finally:
            with torch.no_grad():
                for t, t0 in zip(shards, saved):
                    t.copy_(t0)
            self._dversions = [p._version for p in self._dparams]
        diff = d2.sub_(d1).neg_()  # D(h) - D(2h), in place of D(2h)
        self.hvp_errors.append(2 * float(self.vector_space.norm(diff)) / vn)
        return d1.add_(diff, alpha=1 / 3)

    def _fd_step(self, shards: list[torch.Tensor], steps: list[torch.Tensor], vn: float) -> float:
        """``h = u^(1/3) (rms_v(theta) + rms(theta)) / ||v||``: each coordinate moves by about ``u^(1/3)`` of the
        parameters' size where ``v`` lives (``rms_v``, the RMS of ``theta`` weighted by ``v_i^2``), so a ``v``
        concentrated on a few coordinates is not moved as far as a spread one would be in total; ``rms``
        (over all ``d`` coordinates) is the floor where ``theta`` is near 0. One all-reduce of two scalars."""
        acc = torch.float64
        local = torch.stack([
            sum((t.to(acc) * dv.to(acc)).square().sum() for t, dv in zip(shards, steps)),
            sum(t.to(acc).square().sum() for t in shards),
        ]).reshape(2)
        weighted, total = (float(x) for x in self.vector_space.reduce(local).tolist())
        rms_v = math.sqrt(max(weighted, 0.0)) / vn
        rms = math.sqrt(max(total, 0.0) / self.dim)
        scale = rms_v + rms if rms_v + rms > 0 else 1.0
        return torch.finfo(self.dtype).eps ** (1 / 3) * scale / vn
