"""Products one metric computes that another metric at the same parameters reuses, with what they cost
(docs/metrics.md#shared_work).

Several metrics of one probe start from the same expensive product: ``precond``'s raw spectrum is the Lanczos
run of ``spectrum`` (and ``saddle``'s), its raw R_med the diagonal reads of ``rmed``; ``rmed``'s exact entries
and ``diagshare``'s sampled columns are the same HVPs ``H e_j``, kept column by column (:mod:`._columns`,
noted with :meth:`Reuse.note`). A product is shared only
when it is the same estimator: the same kernel run with the same options and the same seeded randomness, so
that reusing it gives results bit-identical to computing it again. Its **key** names exactly that (the
options that change the product, the seed); options that change only what is derived from it (a confidence
level, bootstrap resamples) stay out of the key and are applied by each metric to the shared product.

Products live in the Landscape's ``results`` (the parameters cannot change under a Landscape, so what is
kept for it stays valid for its life, and goes with it); :mod:`.ritz_vectors` keeps the extreme Ritz vectors
the same way. A product is kept only once it is complete, and no metric changes a product it receives, so a
metric failing in between leaves the others' products as they were. Each metric reports what it received in
its result (:meth:`Reuse.fields`): ``shared`` (``"raw spectrum from spectrum"``) and ``shared_hvps`` (what
each received product cost the metric that computed it); its ``hvps`` counts only HVPs it spent itself.

Seeded cold Lanczos runs in full memory are also found by their **start** (:meth:`Reuse.longest_from`: the seed
alone), whatever options stopped them: every such run from one seed starts from the same Gaussian vector and
takes the same first steps, so the longest holds the first ``m`` steps of all, from which ``density`` takes
its first SLQ start.

A probe runs the metrics that compute a product before those that reuse it (``after`` in the registry) and
plans the cost of the set with each shared part counted once (``shares`` in the registry:
:class:`~.registry.SharedPart`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RAW_DIAGONAL", "RAW_SPECTRUM", "Product", "Reuse", "diagonal_key", "lanczos_key", "start_of"]

RAW_SPECTRUM = "raw spectrum"        # a seeded cold Lanczos run on the Hessian (spectrum, precond, saddle)
RAW_DIAGONAL = "raw diagonal reads"  # rmed's diagonal entries of the Hessian (rmed, precond)


@dataclass(frozen=True)
class Product:
    """A kept product: ``what`` it is, its ``value``, the metric that computed it (``source``) and the HVPs
    that cost."""

    what: str
    value: Any
    source: str
    hvps: int


def lanczos_key(*, k: int, tol: float, max_iter: int | None, which: str, seed: int, bound: str,
                max_basis: int | None, risk: float | None) -> tuple:
    """What determines a seeded cold Lanczos run on the Hessian (where its basis lives does not, nor whether it
    was reorthogonalized fully or partially: the same run to rounding)."""
    return ("lanczos", k, tol, max_iter, which, seed, bound, max_basis, risk)


def start_of(key: tuple) -> int | None:
    """The seed of the run a :func:`lanczos_key` names (its start is the Gaussian vector the seed's first number
    seeds), or None: for another product, or a run in bounded memory (``max_basis``), whose thick restarts
    replace its tridiagonal and whose restarting depends on its start."""
    if not (isinstance(key, tuple) and len(key) == 9 and key[0] == "lanczos" and key[7] is None):
        return None
    return key[5]


def diagonal_key(blocks: Sequence[Any], *, seed: int, exact_threshold: int, k: int, top: int, screen_samples: int,
                 z: float, hvps: int, signs: int, min_k: int, pilot: int = 0) -> tuple:
    """What determines rmed's diagonal reads: the blocks read, the plan's options, the screen's ``z`` (it
    picks the candidates, and the pilot's decision) and the seed; not ``level`` nor ``bootstrap``, which only
    the statistics use."""
    return ("diagonal", tuple(b.name for b in blocks), seed, exact_threshold, k, top, screen_samples, z, hvps,
            signs, min_k, pilot)


class Reuse:
    """One metric's view of the products kept on ``land``: what it received and from whom.

    ``metric`` names the metric asking; products it keeps are recorded as computed by it. A Landscape without
    a ``results`` store (or a call with its own generator, whose randomness no key names) shares nothing.
    """

    def __init__(self, land: Any, metric: str):
        self.metric = metric
        self._store = getattr(land, "results", None)
        self.received: list[Product] = []

    def find(self, key: tuple) -> Any | None:
        """The kept product's value under ``key`` (noted as received), or None when none is kept."""
        if self._store is None:
            return None
        got = self._store.get(key)
        if not isinstance(got, Product):
            return None
        if all(p is not got for p in self.received):
            self.received.append(got)
        return got.value

    def held(self, key: tuple) -> Any | None:
        """The value kept under ``key`` without noting it as received (to compare before keeping), or None."""
        got = self._store.get(key) if self._store is not None else None
        return got.value if isinstance(got, Product) else None

    def longest_from(self, seed: int) -> tuple | None:
        """The key of the kept seeded cold Lanczos run from ``seed``'s start (:func:`start_of`) with the most
        steps (the first kept of equals), or None. Runs from one start take the same first steps, so the
        longest holds those of all. Notes nothing (:meth:`find` does); no HVP."""
        best: tuple | None = None
        for key, got in (self._store or {}).items():
            if start_of(key) == seed and isinstance(got, Product) and (
                    best is None or got.value.steps > self._store[best].value.steps):
                best = key
        return best

    def keep(self, key: tuple, what: str, value: Any, hvps: int) -> None:
        """Keep ``value`` under ``key``, computed by this metric for ``hvps`` HVPs (a complete product only)."""
        if self._store is not None:
            self._store[key] = Product(what, value, self.metric, int(hvps))

    def note(self, what: str, source: str, hvps: int) -> None:
        """Note that ``hvps`` HVPs' worth of ``what``, computed by ``source``, was received piecewise rather than
        as one kept product (the Hessian columns of :mod:`._columns`); repeated notes add up."""
        if hvps <= 0:
            return
        for i, p in enumerate(self.received):
            if p.what == what and p.source == source:
                self.received[i] = Product(what, None, source, p.hvps + int(hvps))
                return
        self.received.append(Product(what, None, source, int(hvps)))

    def fields(self) -> dict:
        """``shared`` and ``shared_hvps`` for the metric's result; empty when it received nothing. Parts of
        one kind received from several metrics add up in ``shared_hvps``."""
        if not self.received:
            return {}
        cost: dict[str, int] = {}
        for p in self.received:
            cost[p.what] = cost.get(p.what, 0) + p.hvps
        return {"shared": [f"{p.what} from {p.source}" for p in self.received], "shared_hvps": cost}
