"""Warm starts along a trajectory: Lanczos at one probe starts from the previous probe's Ritz vectors, moved on.

Between two probes of a training run the parameters move a little, and so do the Hessian's extreme
eigenvectors. A Lanczos start close to them reaches the same residual bounds in fewer HVPs than a random
start, whose component along the top eigenvector is about ``1/sqrt(d)``. The start for ``which="both"`` must
serve both ends at once: it is the normalized sum of one start per end, mixed with a random Gaussian
component of weight :attr:`WarmStart.mix`,

    v0 = sqrt(1 - mix^2) * u / ||u|| + mix * z / ||z||,    u = x_top + x_bottom,

so that no eigendirection is excluded from the Krylov space: a new outlier orthogonal to the old vectors
still emerges, only a few steps later than from a cold start. The residual bounds and ``converged`` do not
depend on the start, so a warm run certifies exactly what a cold run does: the extreme certificate
(:mod:`geomprobe.linalg.certify`) credits only the random component, whose weight ``mix`` is passed on.

**Moving the vectors on.** Each end's start ``x`` is its kept leading Ritz vector ``u`` stepped on along its
last move, ``x = (u + g (u - s p)) / ||.||`` with ``p`` the leading vector one probe earlier (``s`` its sign
against ``u``; further kept vectors of the end are added as they are). The gain ``g`` of each end is fitted
along the trajectory itself: after every run, the new leading vector ``q`` is projected on the plane of
``u`` and ``u - s p``, ``q ~ alpha u + beta (u - s p)``, whose ``g* = beta / alpha`` is the step that would have
pointed best (three dot products of length ``d``, no HVP), and ``g <- clip((g + g*) / 2, 0, 1)``. Where the
eigenvectors drift (AdamW on a GPT-2: the angle the top eigenvector turns per step is mostly the same
direction from one step to the next) the gains settle near 1; where they jump about (a noisy trajectory,
or probes far apart) the fits turn negative and the gain stays 0, the plain start of earlier versions,
which ``extrapolate=False`` keeps. Why the start is one vector and not a block: Lanczos from the sum of the
two ends builds one polynomial that grows at both ends of the spectrum at once; measured on a 0.13M GPT-2
(AdamW, one step apart), a block start (Rayleigh-Ritz on the kept vectors, then residual or block-Krylov
expansion, 2 HVPs per block step) took 19-20 HVPs where Lanczos from the sum took 14, and adding the
second Ritz vector of each end to the start or to the subspace did not pay for its HVPs (the new
leading vector lies 97-99 % inside the old one and only 0.2-1 % more inside the old top eight: it moves out
of the old Krylov space, into the bulk).

Measured with residual bounds (``risk=None``, tol 1e-3, both ends; CPU, ``benchmarks/warm_start.py``,
``benchmarks/results/warm_start_gpt2_cpu.json``): a randomly initialised Hugging Face GPT-2 (2 layers, width 64,
vocabulary 500, 0.13M parameters) trained by AdamW (lr 3e-4) on random tokens, a probe every step over
100 steps: **6.5 HVPs per probe moved on against 19.9 cold (3.1x)** and 8.2 with the plain start (2.4x); a
probe every 5 steps: 11.1 against 19.9 (1.8x; plain 11.6, 1.7x). No warm run missed an extreme eigenvalue the
cold run found. A 4-layer, width-128 GPT-2 (0.86M): 8.5 against 17.4 one step apart (2.0x; plain 8.9),
11.4 against 16.7 five steps apart (1.5x; plain 11.3); the 0.12M GPT-2 of ``benchmarks/scale.py trajectory``
one step apart: 8.35 against 19.7 (2.4x; plain 9.35), ``lambda_max`` alone 6.4 against 16.9 (2.6x). Where
probes lie further apart or the trajectory is noisy (an MLP or a small transformer under SGD with momentum,
a probe every 5 steps) the moved start is within about an HVP of the plain one, either way
(benchmarks/RESULTS.md, section 6, "Warm starts moved on along the trajectory").

The savings above are on the residual rule alone. Once ``converged`` also waits for the certificate that
nothing lies beyond the extremes, most of them go (see "When a warm start pays" below): the warm start
converges the known Ritz values sooner, but the certificate needs the Krylov space to resolve the spectrum's
edges whatever the start. On the float64 tanh-MLP trajectory of tests/test_warm_start.py, with the plain
start: both ends, 590 HVPs warm against 551 cold over 20 probes (mix 0.1; 573 at mix 0.5); the largest end
alone (tol 1e-4, a probe every 4 steps), 141 against 149.

The plain start was chosen by measurement on a 26k-parameter MLP on digits (SGD, tol 1e-3, which="both", a probe every 5
steps): one vector per end beat two or four per end (15.6 HVPs per probe against 18.4 and 20.8; cold 26.5);
weighting the two ends 1:1, 1:2, 1:4 or 2:1 changed the mean by under 1 HVP, and the bottom vector alone did
as well as both (the bottom end, often at a dense bulk edge, takes most steps), so the two are summed with
equal weights; ``mix`` between 0.03 and 0.3 made no measurable difference, and 0.1 is kept. On a 110k-parameter
transformer (SGD, every 5 steps) mix 0.3 cost 37.3 HVPs per probe against 36.4 at 0.1 (cold 56.6).
The random share ``mix`` is the floor of what a good start can save: a 10 % random part takes as many
Lanczos steps to filter out as a vector that turned by a tenth of a radian (on the rotating spectra of
tests/test_warm_extrapolate.py the moved start saves a quarter at ``mix`` 0.01 and little at 0.1), but
along the GPT-2 trajectory above the vectors' own error dominates (``mix`` 0.01 saved 0.1 HVP per probe),
and a smaller random part finds a new outlier later, so 0.1 is kept. ``benchmarks/warm_start.py`` measured
the plain start against cold along training runs of an MLP, a CNN and a small transformer (CPU, an earlier
version): 1.5-2.0x fewer HVPs per probe with a probe every 5 steps, 1.0-1.7x every 20. A Krylov space can
miss an extreme eigenvalue whatever its start (its bounds certify that some eigenvalue lies within them):
over those 312 probes the warm start missed one the cold start found once, the cold start twice.

**When a warm start pays.** The extreme certificate reads the start's spectral measure, and the kept Ritz
vectors put two large atoms of it at the ends: near an atom of mass ``m`` the Christoffel sum stays below
``1/m``, so the run must grow it past the atom by a factor of about ``m / t`` more than from a random start
(whose atom at the top holds about ``1/d``) before it can rule out an eigenvalue just beyond. The start's
head start on the Ritz values is then spent on the certificate, and more. Measured with the certificate
(risk 1e-2, tol 1e-3, both ends): GPT-2 124M bf16 on an H200, AdamW, a probe every 5 steps, **22.4 HVPs per
probe warm against 16.0 cold**; a 0.12M-parameter GPT-2 on the CPU, a probe every step, 35.4 against 29.1
(mix 0.1; 32.0 at mix 0.9, as the warm part shrinks the penalty does). Without the certificate
(``risk=None``, residual bounds only) the same 0.12M model: **12.0 warm against 22.1 cold**. Hence the
``certified`` switch: ``WarmStart(certified=False)`` (what :class:`GeometryProbe` uses by default) starts
warm only the runs that do not certify their extremes, and a certified run starts from the seeded random
vector it would start from without a WarmStart and keeps no vectors for it; ``certified=True`` (the
class's default, for a caller who built one on purpose) warm-starts every run.

The vectors live on the host, in the model's dtype (``2 k`` vectors of length ``d``, at most
``max_vectors``, and the leading vector of each end one probe earlier: two more); they never touch the
model, and the random component comes from the metric's own generator, so a warm start moves neither the
parameters nor the global RNG.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from ..errors import ConfigurationError
from ..linalg.device_draw import drawn_on_device, draws_elsewhere
from ..linalg.pinned_memory import pinned_empty
from ..linalg.vectors import gaussian

__all__ = ["WarmStart"]

# the fit compares vectors whose inner products lie within 1e-3 of 1: summed in float64, a column chunk at a time
_DOT_CHUNK = 1 << 20


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """``x . y`` of two host vectors, summed in float64 over chunks (no float64 copy of a whole vector)."""
    total = 0.0
    for a in range(0, x.shape[0], _DOT_CHUNK):
        total += float(torch.dot(x[a : a + _DOT_CHUNK].double(), y[a : a + _DOT_CHUNK].double()))
    return total


class WarmStart:
    """The previous probe's extreme Ritz vectors, kept on the host, and the start vector built from them.

    Args:
        mix: weight of the random component of the start vector (0 < mix < 1).
        max_vectors: the most vectors kept (split evenly between the two ends).
        certified: warm-start runs that certify their extremes too (``risk`` set). ``False`` starts those
            cold, where a warm start costs more HVPs than it saves (see above); runs with ``risk=None`` start
            warm either way.
        extrapolate: start each end from its leading Ritz vector moved on along its last step,
            ``u + g (u - u_prev)``, with the gain ``g`` in ``[0, 1]`` fitted per end along the trajectory (see
            above); ``False``: the kept vectors as they are (the start of earlier versions).

    :meth:`start` returns ``None`` (a cold start) when nothing is kept yet, or when the vectors were kept
    for another model or other parameter shapes or dtype; :attr:`reason` then says why (empty after a warm
    start).
    :func:`geomprobe.metrics.spectrum` accepts a WarmStart as ``warm=``; :class:`GeometryProbe` keeps one per
    probe unless ``warm_start=False``.

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> from geomprobe.metrics import spectrum
    >>> model = nn.Linear(8, 1, bias=False).double()
    >>> X = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.zeros(32, 1, dtype=torch.float64)))
    >>> warm = WarmStart()
    >>> first, second = spectrum(land, tol=1e-6, warm=warm), spectrum(land, tol=1e-6, warm=warm)
    >>> first["warm"], second["warm"], abs(first["lambda_max"] - second["lambda_max"]) < 1e-9
    (False, True, True)
    """

    def __init__(self, *, mix: float = 0.1, max_vectors: int = 8, certified: bool = True, extrapolate: bool = True):
        if not 0.0 < mix < 1.0:
            raise ConfigurationError(
                f"mix must lie in (0, 1), got {mix!r}: it is the weight of the random part of the start vector "
                "(0 would exclude directions the kept vectors miss, 1 is a cold start); 0.1 is the default"
            )
        if max_vectors < 1:
            raise ConfigurationError(f"max_vectors must be >= 1, got {max_vectors!r}; pass warm_start=False for cold starts")
        self.mix = float(mix)
        self.max_vectors = int(max_vectors)
        if not isinstance(extrapolate, bool):
            raise ConfigurationError(f"extrapolate must be True or False, got {extrapolate!r}")
        self.certified = bool(certified)
        self.extrapolate = extrapolate
        self.top: torch.Tensor | None = None  # (n, d) on the host, unit rows, descending Ritz values
        self.bottom: torch.Tensor | None = None  # (n, d), ascending
        # the leading vector of each end one probe earlier (host, unit), and each end's fitted gain
        self.previous: dict[str, torch.Tensor] = {}
        self.gain: dict[str, float] = {"top": 0.0, "bottom": 0.0}
        self._signature: tuple | None = None
        self._model: weakref.ref | None = None
        self.reason = "no vectors kept yet"

    @staticmethod
    def _signature_of(land: Any) -> tuple:
        shapes = tuple((n, tuple(p.shape)) for n, p in zip(land.param_names, land.params))
        return (land.dim, land.dtype, shapes)

    def clear(self, reason: str = "cleared") -> None:
        """Forget the kept vectors; the next start is cold."""
        self.top = self.bottom = None
        self._signature = self._model = None
        self._forget_motion()
        self.reason = reason

    def _forget_motion(self) -> None:
        self.previous = {}
        self.gain = {"top": 0.0, "bottom": 0.0}

    def matches(self, land: Any) -> bool:
        """Whether the kept vectors belong to ``land``'s model and parameter space (sets :attr:`reason`)."""
        if self._signature is None:
            self.reason = "no vectors kept yet"
            return False
        if self._model is None or self._model() is not land.model:
            self.reason = "the kept vectors are from another model"
            return False
        if self._signature != self._signature_of(land):
            self.reason = "the parameters changed shape, dtype or selection since the vectors were kept"
            return False
        return True

    def start(self, land: Any, *, which: str, generator: torch.Generator,
              risk: float | None = None) -> torch.Tensor | None:
        """A unit start vector in ``land``'s dtype, where its vectors live (``vector_device``), for Lanczos at
        the ``which`` end(s), or None.

        Draws one Gaussian vector from ``generator`` when warm (none when cold, so a cold run draws the
        same start it would without a WarmStart). ``risk``: the run's certificate (None: none); with one and
        ``certified=False`` the start is cold.
        """
        if not self.serves(risk):
            self.reason = ("a run that certifies its extremes starts cold: kept Ritz vectors make its certificate "
                           "cost more HVPs than they save (WarmStart(certified=True) to force)")
            return None
        if not self.matches(land):
            return None
        ends = [e for e, w in (("top", ("both", "largest")), ("bottom", ("both", "smallest")))
                if which in w and getattr(self, e) is not None]
        if not ends:
            self.reason = f"no kept vectors serve which={which!r}"
            return None
        where = getattr(land, "vector_device", None) or land.device  # the host in the host-vector mode
        work = torch.float32 if land.dtype.itemsize < 4 else land.dtype
        u = None
        for end in ends:
            part = self._end_start(end, where, work)
            u = part if u is None else u.add_(part)
        un = u.norm()
        if not torch.isfinite(un) or un == 0:
            self.reason = "the kept vectors cancel or are not finite"
            return None
        self.reason = ""
        # host vectors draw on the model's accelerator (a CPU draw of a 1B model's vector took seconds), as a
        # unit vector: no second pass over it for its norm
        if draws_elsewhere(where, land.device):
            z = drawn_on_device(land.dim, generator, u.dtype, land.device, unit=True)
        else:
            z = gaussian(land.dim, generator, u.dtype, where)
            z = z / z.norm()
        v0 = math.sqrt(1.0 - self.mix**2) * (u / un) + self.mix * z
        return v0.to(land.dtype)

    def _end_start(self, end: str, where: Any, work: torch.dtype) -> torch.Tensor:
        """One end's part of the start, in ``work`` on ``where``: its kept vectors summed, the leading one
        moved on by the end's gain along its last step (a unit vector before the sum)."""
        kept = getattr(self, end)
        u = kept.to(device=where, dtype=work).sum(0)
        prev, g = self.previous.get(end), self.gain[end]
        if self.extrapolate and prev is not None and g > 0:
            lead = kept[0].to(device=where, dtype=work)
            p = prev.to(device=where, dtype=work)
            c = _dot(kept[0], prev)
            s = 1.0 if c >= 0 else -1.0  # a Ritz vector's sign is arbitrary: step from the aligned one
            # lead + g (lead - s p) has norm^2 (1 + g)^2 + g^2 - 2 g (1 + g) |c| for unit lead and p
            norm = math.sqrt(max((1 + g) ** 2 + g * g - 2 * g * (1 + g) * abs(c), 1e-30))
            moved = lead.mul(1 + g).sub_(p, alpha=g * s).div_(norm)
            u.sub_(lead).add_(moved)
        return u

    @staticmethod
    def fitted_gain(c: float, a: float, b: float) -> float | None:
        """The gain ``g`` for which ``u + g (u - s p)`` (``s = sign c``) points nearest to the new vector ``q``:
        the least-squares fit ``q ~ alpha u + beta (u - s p)``, ``g = beta / alpha``, from ``c = u.p``,
        ``a = q.u``, ``b = q.p`` for unit ``u``, ``p``, ``q`` (the sign of ``q`` cancels). None when the vectors did
        not move (``|c| ~ 1``: no direction to extrapolate along) or ``q`` has no part along the plane."""
        s = 1.0 if c >= 0 else -1.0
        det = 1.0 - c * c  # Gram determinant of (u, u - s p)
        if det < 1e-12:
            return None
        e, f, bq = 1.0 - s * c, 2.0 - 2.0 * s * c, a - s * b
        alpha = (f * a - e * bq) / det
        beta = (bq - e * a) / det
        if abs(alpha) < 1e-12:
            return None
        return beta / alpha

    def serves(self, risk: float | None) -> bool:
        """Whether a run with this ``risk`` (None: no certificate) starts warm, so that its Ritz vectors are
        worth keeping for the next one."""
        return risk is None or self.certified

    def keep(self, land: Any, top: torch.Tensor, bottom: torch.Tensor) -> None:
        """Keep the unit Ritz vectors ``top`` (k, d) and ``bottom`` (k, d) of ``land`` for the next start.

        When the vectors kept before belong to the same model and space, each end's gain is refitted first:
        ``g* =`` :meth:`fitted_gain` of the new leading vector against the last two, then
        ``gain <- clip((gain + g*) / 2, 0, 1)`` (half the last gain: one noisy step does not decide it; clipped:
        ``g < 0`` would step back towards an older vector, ``g > 1`` overshoots). Cost: three dot products of
        length ``d`` per end on the host, no HVP."""
        per_end = max(1, self.max_vectors // 2)
        reason = self.reason  # matches() below must not change what the last start said
        new_top, new_bottom = self._host_copy(top[:per_end], land.dtype), self._host_copy(bottom[:per_end], land.dtype)
        if self._signature is not None and self.matches(land):
            for end, new in (("top", new_top), ("bottom", new_bottom)):
                self._refit(end, getattr(self, end), new)
        else:
            self._forget_motion()
        self.top, self.bottom = new_top, new_bottom
        self._signature = self._signature_of(land)
        self._model = weakref.ref(land.model)
        self.reason = reason

    @staticmethod
    def _host_copy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` in host memory in ``dtype``, taken as it is when it already lives there (unless it is a small
        part of a larger pageable tensor): the vectors a run hands over are its own
        (:meth:`.LanczosResult.take_ritz_vectors`), and neither this class nor the metrics sharing them write
        into them. From a device, a page-locked copy (torch caches page-locked
        blocks, so from the second probe on it costs no allocation; a fresh pageable copy faults in every
        page, ~0.7 s/GB), pageable where the driver refuses."""
        x = x.detach()
        if x.device.type == "cpu":
            # a few rows of a larger pageable tensor are copied out: a view would hold all of it
            whole = x.is_pinned() or x.untyped_storage().nbytes() <= 2 * x.numel() * x.element_size()
            return x.to(dtype) if whole else x.to(dtype, copy=True)
        out = None
        if x.device.type == "cuda":
            out = pinned_empty(tuple(x.shape), dtype)  # exact size, pooled for the next probe (pinned_memory.py)
        if out is None and x.device.type == "cuda":
            try:
                out = torch.empty(x.shape, dtype=dtype, pin_memory=True)
            except RuntimeError:
                pass
        out = torch.empty(x.shape, dtype=dtype) if out is None else out
        return out.copy_(x)

    def _refit(self, end: str, old: torch.Tensor | None, new: torch.Tensor) -> None:
        if old is None:
            return
        prev = self.previous.get(end)
        if prev is not None:
            c, a, b = _dot(old[0], prev), _dot(new[0], old[0]), _dot(new[0], prev)
            g = self.fitted_gain(c, a, b) if all(map(math.isfinite, (c, a, b))) else None
            if g is not None:
                self.gain[end] = min(max(0.5 * (self.gain[end] + g), 0.0), 1.0)
        # a single row is its whole storage: no copy (a fresh host copy of a 355M-parameter row is 1.4 GB)
        self.previous[end] = old[0] if old.shape[0] == 1 else old[0].clone()
