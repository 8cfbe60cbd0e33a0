"""How far the Lanczos vectors have drifted from orthogonality, estimated without reading them, and when a step
must be orthogonalized against the whole stored basis (partial reorthogonalization, Simon 1984).

Full reorthogonalization reads the whole basis twice at every step: ``2 m d`` elements at step ``m``, which on
host memory or a CPU is as slow as the HVPs themselves (a 10M-parameter MLP: 15.8 s of 58 s). In exact
arithmetic the three-term recurrence alone keeps the vectors orthogonal; in floating point they lose
orthogonality only along Ritz vectors that have converged, and at a rate the recurrence itself predicts.
:class:`OrthogonalityEstimate` runs that prediction on the tridiagonal's scalars (``O(m)`` float64 operations a
step, no vector read) and asks for a Gram-Schmidt pass over the basis only when the estimated largest
``|v_i^T v_k|`` passes ``sqrt(eps)``, then for the next vector too (its three-term step inherits the loss).

What this keeps (Simon, "The Lanczos algorithm with partial reorthogonalization", Math. Comp. 1984): with the
vectors semi-orthogonal (``|v_i^T v_k| <= sqrt(eps)``), the computed ``T_m`` is the projection of ``H`` onto an
orthonormal basis of the same Krylov space up to ``O(eps ||H||)``, the rounding a fully reorthogonalized run has
anyway, so Ritz values, their residual bounds and the quadrature weights are as good. The one visible effect is
that a Ritz vector ``V u`` is not quite a unit vector: :meth:`OrthogonalityEstimate.bound_factors` widens each
residual bound by the most its estimated norm allows.

``eps`` of a run: the unit of the arithmetic the inner products accumulate in (float32 for half-precision
vectors, as elsewhere), or the storage type's rounding spread over the vector when that is larger: a rounding
error of relative size ``u`` in every entry of a ``d``-vector has a component of about ``u / sqrt(d)`` along any
fixed unit direction. The recurrence's local error term is the product's own rounding, ``eps ||H||`` per step
along the basis (:func:`injection_eps`: a network's HVP rounds where the basis lies, not evenly over entries).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["REORTH_MODES", "SELECTIVE_VECTORS", "OrthogonalityEstimate", "injection_eps", "orthogonality_eps",
           "spread_eps"]

REORTH_MODES = ("partial", "full")
# A pass the estimate asks for within this many steps of the previous pair ends the estimated regime: an
# eigenvalue far outside the rest has converged and orthogonality leaks along its Ritz vector at every step
# (GPT-2 124M in bf16, an outlier 35x the bulk: a pass at 96 of 99 steps, and 1.5 s more outside its HVPs than
# the full run before this rule). The run then either keeps the few converged Ritz vectors at the ends on the
# compute device and orthogonalizes each step against them alone (selective orthogonalization, Parlett and
# Scott 1979), or, where that does not hold, orthogonalizes every step against the whole basis.
SWITCH_WINDOW = 3
SELECTIVE_ENDS = 2  # converged Ritz vectors the selective regime keeps at each end (d-vectors on the device)
SELECTIVE_VECTORS = 2 * SELECTIVE_ENDS  # the most it holds: what a memory plan counts for it
ASYMMETRY_FLOOR = 0.1  # asymmetry below this times sqrt(eps) ||T|| is taken for the inner products' rounding
EXACT_ENDS = 8  # Ritz vectors at each end whose bound factor is computed exactly (bound_factors)
# The measured inner products stayed below the estimate at 30 (largest ratio 0.74 over three spectra, two seeds,
# float32 and float64, 300 steps each); at 3 the estimate fell 10^7x below them on a dense spectrum and the basis
# lost orthogonality entirely. Larger costs a few more passes (100: 5-35 % more on those runs).
INJECTION_SAFETY = 30.0


def orthogonality_eps(dtype: torch.dtype, dim: int) -> float:
    """The orthogonality the arithmetic keeps (``|v_i^T v_k|`` after a whole-basis pass): the accumulation
    type's ``eps``, or the storage type's rounding spread over the vector when that is larger (module
    docstring). Partial reorthogonalization keeps the vectors within ``sqrt`` of it."""
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return max(torch.finfo(acc).eps, torch.finfo(dtype).eps / math.sqrt(max(dim, 1)))


def injection_eps(dtype: torch.dtype, dim: int) -> float:
    """The loss of orthogonality one step's rounding adds, relative to ``||H|| / beta_j``: the accumulation
    type's ``eps`` for the product's own rounding, or the storage type's rounding spread over the vector with a
    safety factor :data:`INJECTION_SAFETY` when that is larger (half-precision vectors of few entries).

    The product's rounding is not spread evenly over the entries: a network's HVP rounds inside a chain of
    layers, and its error lies where the basis does (in the range of ``H``). Measured in fully
    reorthogonalized runs (``benchmarks/asymmetry.py``, the coefficients of ``H v_j`` on the older vectors),
    the leak per step along a basis vector was ``0.2-0.5 eps ||T||`` for GPT-2 in float32 (3.7M parameters on
    the CPU, 124M on an H200), not ``eps / sqrt(d)``: an injection of ``30 eps / sqrt(d)``, right for a dense
    matrix's product at ``d = 600``, put the estimate 4-40x below the measured inner products of GPT-2 runs
    without passes, which then passed ``sqrt(eps)`` several steps before a pass was asked for.
    ``tests/test_partial_reorth.py`` checks that the estimate stays above the measured inner products, on
    known spectra and on a transformer's HVPs."""
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return max(torch.finfo(acc).eps, spread_eps(dtype, dim) * INJECTION_SAFETY)


def spread_eps(dtype: torch.dtype, dim: int) -> float:
    """A rounding of relative size ``eps`` in each of ``d`` entries (the storage of a vector), along a fixed unit
    vector: about ``eps / sqrt(d)``."""
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return max(torch.finfo(acc).eps, torch.finfo(dtype).eps) / math.sqrt(max(dim, 1))


class OrthogonalityEstimate:
    """Simon's recurrence for ``omega_{j,k} ~ v_j^T v_k`` over a Lanczos run, and the partial-reorthogonalization
    rule built on it.

    Call :meth:`advance` once per step with the run's ``alpha_0..alpha_j`` and ``beta_0..beta_j`` (``beta_j``
    the norm of the unnormalized next vector after its three-term step and its local pass against ``v_j`` and
    ``v_{j-1}``) and a bound on ``||H||``; it returns whether that vector must be orthogonalized against the
    whole basis before it is stored. After such a pass, call :meth:`orthogonalized`. Cost: ``O(j)`` float64
    operations per step, no matvec, no vector read. ``selective=False``: where passes come back to back the run
    goes to whole-basis steps even where selective orthogonalization would hold (a memory plan without room for
    the :data:`SELECTIVE_VECTORS` Ritz vectors it keeps).

    The estimate: with ``H v_i = beta_{i-1} v_{i-1} + alpha_i v_i + beta_i v_{i+1} + f_i`` and ``||f_i|| <=
    eps ||H||``, symmetry of ``H`` gives, for ``k < j``::

        beta_j w_{j+1,k} = beta_k w_{j,k+1} + (alpha_k - alpha_j) w_{j,k} + beta_{k-1} w_{j,k-1}
                           - beta_{j-1} w_{j-1,k} + O(eps ||H||)

    and the rounding term is taken with the sign that makes ``|w|`` grow (the usual pessimistic choice), so the
    estimate tends to exceed the true inner products; ``tests/test_partial_reorth.py`` checks it against the
    measured ``V^T V`` on matrices whose Ritz values converge to working precision.
    """

    def __init__(self, dtype: torch.dtype, dim: int, *, threshold: float | None = None, selective: bool = True):
        self.eps = orthogonality_eps(dtype, dim)
        self.psi = injection_eps(dtype, dim)
        self.acc_eps = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps
        self.threshold = math.sqrt(self.eps) if threshold is None else float(threshold)
        self._prev = np.zeros(0)        # w_{j-1, 0..j-1}
        self._cur = np.ones(1)          # w_{j, 0..j}
        self._force = False             # the vector after a reorthogonalized one is reorthogonalized too
        self._chain = False             # the pending pass was asked for by the estimate (it forces the next)
        self.full_passes = 0            # steps that were orthogonalized against the whole basis
        self.level = self.eps           # the largest |w_{i,k}| (i != k) estimated so far, over every pair
        self.steps = 0
        self._omega = np.zeros((0, 0))
        self._signs = np.random.default_rng(0)  # fixed: the same run takes the same passes
        self._last_pass = -SWITCH_WINDOW - 1    # the step of the last pass
        self.always = False                     # passes come back to back: every step is one from now on
        self.selective = False                  # ... or selective orthogonalization against converged Ritz vectors
        self.may_keep = bool(selective)         # False: no room for the Ritz vectors selective orthogonalization keeps
        self.keep_none_why = "no room for the converged Ritz vectors"  # why not, for the regime's description
        self.regime = "estimated"               # how the run ended up orthogonalizing, and from which step why
        self.spread_eps = spread_eps(dtype, dim)  # one step's storage rounding along a fixed direction
        self.measured = False                   # each step's inner products are measured (.measured_reorth)

    def advance(self, alphas: list[float], betas: list[float], norm: float, asymmetry: float = 0.0) -> bool:
        """Estimate ``w_{j+1,k}`` for the new vector (step ``j = len(alphas) - 1``) and say whether it must be
        orthogonalized against the whole basis (the estimate passes :attr:`threshold`, or the previous vector
        was). ``norm``: a bound on ``||H||`` (the Gershgorin bound of ``T``). ``asymmetry``: the largest
        ``|(H v_j)^T v_{j-1} - beta_{j-1}|`` seen so far, the matvec's own error along the basis: the recurrence
        assumes a symmetric matvec, and an HVP off by 1e-4 relative (fp32 through cuDNN) injects that much
        loss of orthogonality at every step, far above rounding (twice it is taken, for both terms)."""
        j = len(alphas) - 1
        a = np.asarray(alphas, dtype=np.float64)
        b = np.asarray(betas, dtype=np.float64)
        own, inject = self._injection(norm, asymmetry)
        new = np.empty(j + 2)
        if j >= 1:
            cur, prev = self._cur, self._prev
            t = b[:j] * cur[1 : j + 1] + (a[:j] - a[j]) * cur[:j] - b[j - 1] * prev[:j]
            t[1:] += b[: j - 1] * cur[: j - 1]
            new[:j] = self._signed(t, inject) / self._beta(b[j])
        return self._decide(new, j, inject / self._beta(b[j]), own)

    def advance_projected(self, S: np.ndarray, beta: float, beta_prev: float, norm: float,
                          asymmetry: float = 0.0) -> bool:
        """:meth:`advance` for a basis whose projection ``S = V^T H V`` (``(j+1) x (j+1)``, its last vector
        ``v_j`` the newest, ``S[j, j] = alpha_j``) is not tridiagonal: the thick restart's arrowhead of kept Ritz
        vectors followed by a tridiagonal (:mod:`.restarted_lanczos`). The new vector ``beta v_{j+1} = H v_j -
        alpha_j v_j - beta_prev v_{j-1}`` has, for ``k < j - 1``, ``beta w_{j+1,k} = sum_l S_{kl} w_{j,l} -
        alpha_j w_{j,k} - beta_prev w_{j-1,k}`` plus the rounding and asymmetry terms, the tridiagonal
        recurrence when ``S`` is tridiagonal. Call it only for a three-term step whose predecessor is known
        (``v_{j-1}``): the first step after a restart is orthogonalized whole (:meth:`passed`). Cost ``O(j^2)``
        float64 operations."""
        S = np.asarray(S, dtype=np.float64)
        j = S.shape[0] - 1
        own, inject = self._injection(norm, asymmetry)
        cur, prev = self._cur, self._prev
        new = np.empty(j + 2)
        t = S[:j, :] @ cur[: j + 1] - S[j, j] * cur[:j] - beta_prev * prev[:j]
        new[:j] = self._signed(t, inject) / self._beta(beta)
        return self._decide(new, j, inject / self._beta(beta), own)

    def _injection(self, norm: float, asymmetry: float) -> tuple[float, float]:
        # the measured asymmetry includes the rounding of its own inner products, which grows with d (7 eps ||T||
        # for a float32 CPU HVP of a 0.9M-parameter MLP, more at 10M, where taking it whole asked for a pass at
        # 85 of 93 steps); only what exceeds ASYMMETRY_FLOOR sqrt(eps) ||T|| is taken for the matvec's own error
        own = max(0.0, asymmetry - ASYMMETRY_FLOOR * math.sqrt(self.acc_eps) * max(norm, 0.0))
        return own, max(self.psi * max(norm, 0.0), 2.0 * own)

    @staticmethod
    def _beta(beta: float) -> float:
        return beta if beta > 0 else float(np.finfo(np.float64).tiny)

    def _random_signs(self, n: int) -> np.ndarray:
        # a pass leaves rounding of random sign (the run's fixed generator: the same run takes the same passes)
        return np.where(self._signs.random(n) < 0.5, -1.0, 1.0)

    @staticmethod
    def _signed(t: np.ndarray, inject: float) -> np.ndarray:
        # the rounding term with the sign that makes |w| grow (the usual pessimistic choice)
        return t + np.where(t >= 0, 1.0, -1.0) * inject

    def _decide(self, new: np.ndarray, j: int, local: float, own: float) -> bool:
        # the local pass keeps the new vector orthogonal to the last two to rounding
        new[max(j - 1, 0) : j + 1] = local
        new[j + 1] = 1.0
        self._prev, self._cur = self._cur, new
        self._store(j + 1, new)
        self.steps += 1
        worst = float(np.abs(new[: j + 1]).max())
        forced, self._force = self._force, False
        due = forced or worst > self.threshold
        # a pass the estimate asked for forces the next one; a forced pass ends the episode
        self._chain = due and not forced
        if due and not forced and self.steps - self._last_pass <= SWITCH_WINDOW:
            # selective orthogonalization where the loss is the converged Ritz vectors' (Paige): a symmetric
            # matvec whose rounding, spread over the vector, stays far below the threshold over a whole run;
            # else (a matvec with its own asymmetric error; half-precision vectors of few entries, whose
            # rounding leaks orthogonality along every direction) whole-basis steps
            holds = own == 0.0 and self.spread_eps * math.sqrt(300) < 0.1 * self.threshold
            if holds and self.may_keep:
                self.selective = True
                self.regime = f"selective from step {self.steps}"
            else:
                self.always = True
                why = (self.keep_none_why if holds else
                       "the matvec's asymmetry" if own > 0.0 else "the storage rounding over few entries")
                self.regime = f"whole-basis from step {self.steps} ({why})"
        if not due:
            self.level = max(self.level, worst)
        return due

    def passed(self) -> None:
        """The newest vector's own step ran a whole-basis pass (the first step after a thick restart, whose
        vector couples to every kept Ritz vector): its inner products are at rounding level. Not a pass the
        estimate asked for (the back-to-back rule does not see it)."""
        j = len(self._cur) - 1
        new = np.empty(j + 2)
        new[: j + 1] = self.psi * self._random_signs(j + 1)
        new[j + 1] = 1.0
        self._prev, self._cur = self._cur, new
        self._store(j + 1, new)
        self.steps += 1
        self.full_passes += 1

    def restarted(self, U: np.ndarray) -> None:
        """A thick restart replaced the ``p`` stored vectors ``V`` by the ``l`` Ritz vectors ``Y = V U``
        (``U``: ``p x l``, orthonormal columns) and appended the residual, made orthogonal to every old vector
        first. ``Y^T Y - I = U^T E U`` with ``E = V^T V - I``, so ``||Y^T Y - I|| <= ||E|| <= rho(|W|)`` for the
        estimated entries ``|W| >= |E|`` (Perron), plus the rotation's rounding: the kept block is stored as
        ``sigma I``, which bounds every quadratic form of it (what :meth:`bound_factors` and
        :meth:`gram_spread` read; the recurrence reads only the newest vectors' rows). An entrywise bound
        ``|U|^T |W| |U|`` would grow by up to ``p`` at every restart. The residual's inner product with ``y_i``
        is at most ``psi ||u_i||_1``. The estimate continues from there (:meth:`passed` for the first step,
        then :meth:`advance_projected`). Cost: one ``p x p`` symmetric eigenvalue problem."""
        U = np.abs(np.asarray(U, dtype=np.float64))
        p, l = U.shape
        W = self._omega[:p, :p]
        sigma = (float(np.linalg.eigvalsh(W)[-1]) if p else 0.0) + self.psi * p
        r = self.psi * U.sum(axis=0)
        self._omega = np.zeros((2 * (l + 2), 2 * (l + 2)))
        self._omega[:l, :l] = sigma * np.eye(l)
        self._omega[l, :l] = self._omega[:l, l] = r
        self._cur = np.append(r * self._random_signs(l), 1.0)
        self._prev = np.zeros(0)
        self._force = self._chain = False
        self.level = max(self.level, sigma)

    def selective_step(self) -> None:
        """A step of the selective regime: the new vector is kept orthogonal to the converged Ritz vectors, where
        Paige's theorem puts all loss of orthogonality of a symmetric run, so its inner products are taken at
        the semi-orthogonal level :attr:`threshold` (for the bound factors)."""
        self.steps += 1
        self._store(self.steps, np.full(self.steps + 1, self.threshold))
        self.level = max(self.level, self.threshold)

    def good(self, theta: np.ndarray, resid: np.ndarray, norm: float, kept: list[float]) -> tuple[list[int], bool]:
        """The Ritz pairs converged far enough for the vectors to lose orthogonality along them (residual
        ``<= psi ||T|| / threshold``; Paige: the loss is ``~psi ||T|| / residual``) that are not among ``kept``
        (values), and whether they all lie at the ends (:data:`SELECTIVE_ENDS` each): one converged in the
        interior ends the selective regime."""
        n = len(theta)
        # Paige: the vectors' part along a Ritz vector of residual r settles near (injected loss) / r; it stays
        # below the threshold unless r <= psi ||T|| / threshold (at the bulk's edges r hovers just above that)
        limit = self.psi * max(norm, 0.0) / self.threshold
        close = 1e-8 * max(norm, 1e-300)
        new = [i for i in np.flatnonzero(resid <= limit).tolist() if all(abs(theta[i] - t) > close for t in kept)]
        ends = all(i < SELECTIVE_ENDS or i >= n - SELECTIVE_ENDS for i in new)
        return new, ends

    def asymmetric(self, norm: float, asymmetry: float) -> bool:
        """Whether the matvec's measured asymmetry exceeds what the inner products' own rounding explains (the
        part :meth:`advance` injects at every step)."""
        return self._injection(norm, asymmetry)[0] > 0.0

    def measured_threshold(self, norm: float, asymmetry: float, tol: float) -> float:
        """The level the measured regime keeps the inner products under: ``sqrt(a / ||T||)`` for a matvec whose
        asymmetry along the basis is ``a``, within ``sqrt(tol / 10)``, and not below ``sqrt(eps)`` (the
        estimate's). Semi-orthogonality at ``eta`` keeps ``T`` the projection of ``H`` to ``O(eta^2 ||H||)``
        (Simon 1984): at that level ``T`` is as accurate as the product itself is symmetric, and
        :meth:`semi_floor` adds ``eta^2 ||T||`` (at most a tenth of the tolerance) to the certified errors."""
        own = math.sqrt(max(asymmetry, 0.0) / norm) if norm > 0 else 0.0
        return max(self.threshold, min(own, math.sqrt(max(tol, 0.0) / 10.0)))

    def measured_step(self, bounds: np.ndarray, passed: bool = False) -> None:
        """A step of the measured regime: the new vector's inner products with every stored one are at most
        ``bounds`` (measured, :class:`.sketched_gram.SketchedGram`), after a whole-basis pass where ``passed``."""
        self.steps += 1
        self.full_passes += int(passed)
        row = np.minimum(np.asarray(bounds, dtype=np.float64), 1.0)
        self.level = max(self.level, float(row.max()) if row.size else 0.0)
        self._store(self.steps, np.append(row, 1.0))

    def spread_with(self, row: np.ndarray) -> float:
        """:meth:`gram_spread` of the stored vectors with one more whose inner products with them are ``row``."""
        row = np.asarray(row, dtype=np.float64)
        n = row.size
        sums = self._omega[:n, :n].sum(axis=1) + row if self._omega.shape[0] >= n else row
        return float(max(sums.max(initial=0.0), row.sum()))

    def semi_floor(self, norm: float) -> float:
        """What the measured regime's looser orthogonality adds to the run's rounding floor: ``level^2 ||T||``
        (0 in the estimated regimes, whose level stays within ``sqrt(eps)`` and adds at most ``eps ||T||``,
        below :func:`.certify.rounding_level`)."""
        return self.level ** 2 * max(norm, 0.0) if self.measured else 0.0

    def full_step(self) -> None:
        """A step orthogonalized against the whole basis in the "always" regime (no estimate needed: its inner
        products are at rounding level)."""
        self.steps += 1
        self.full_passes += 1
        self._store(self.steps, np.zeros(self.steps + 1))

    def orthogonalized(self) -> None:
        """The newest vector was orthogonalized against the whole basis: its inner products are at rounding
        level, and the next vector is orthogonalized too (Simon's rule: its three-term step carries the loss of
        the one before)."""
        j = len(self._cur) - 1
        # a pass leaves the rounding of its own update, of random sign: a constant row would start the recurrence
        # with almost none of its fastest-growing mode, which the measured inner products do have (the estimate
        # then fell 500x below them on a dense spectrum)
        self._cur[:j] = self.psi * self._random_signs(j)
        self._store(j, self._cur)
        self._force = self._chain
        self._chain = False
        self.full_passes += 1
        self._last_pass = self.steps

    def _store(self, i: int, row: np.ndarray) -> None:
        # |w_{i,k}| for k < i, kept whole (m^2 float64: 0.7 MB at 300 steps) for the Ritz vectors' norms
        if self._omega.shape[0] <= i:
            grown = np.zeros((2 * (i + 1), 2 * (i + 1)))
            grown[: self._omega.shape[0], : self._omega.shape[1]] = self._omega
            self._omega = grown
        self._omega[i, :i] = np.abs(row[:i])
        self._omega[:i, i] = self._omega[i, :i]

    def gram_spread(self, m: int) -> float:
        """Gershgorin's bound ``max_i sum_k |w_{ik}|`` on ``||V^T V - I||`` for the first ``m`` vectors: any
        combination ``y = V s`` of them has ``||y||^2 >= (1 - spread) ||s||^2``."""
        return float(self._omega[:m, :m].sum(axis=1).max()) if m else 0.0

    def bound_factors(self, U: np.ndarray) -> np.ndarray:
        """The factor by which each residual bound ``beta_m |u_{m,i}|`` widens for the Ritz vector ``V u_i`` of a
        basis whose inner products are the estimated ``w``: ``||V u||^2 >= 1 - |u|^T |W_off| |u|``, so
        ``||H y - theta y|| / ||y|| <= beta_m |u_m| / sqrt(1 - |u|^T |W_off| |u|)`` (``inf`` when that may reach
        0), exactly for the :data:`EXACT_ENDS` Ritz vectors at each end, by the Gershgorin bound ``max_i sum_k
        |w_{ik}|`` for the others. ``U``: the eigenvectors of ``T_m`` as columns. Cost: ``O(m^2)`` float64
        operations per end vector, no vector read."""
        m = U.shape[0]
        W = self._omega[:m, :m]
        worst = float(W.sum(axis=1).max()) if m else 0.0  # >= |u|^T |W| |u| for every unit u (Gershgorin)
        if worst < 1e-6:  # every factor within 1e-6 of 1: one bound for all, O(m^2) instead of O(m^3)
            return np.full(U.shape[1], 1.0 / math.sqrt(1.0 - worst))
        # the exact quadratic form for the Ritz vectors at both ends (those the stopping rule and the record
        # read), the Gershgorin bound for the rest: O(m^2) per column, no m x m product (a threaded BLAS
        # product on a shared host took milliseconds a step)
        spread = np.full(U.shape[1], worst)
        A = np.abs(U)
        n = U.shape[1]
        for i in sorted(set(range(min(EXACT_ENDS, n))) | set(range(max(n - EXACT_ENDS, 0), n))):
            spread[i] = float(A[:, i] @ (W @ A[:, i]))
        out = np.full(spread.shape, math.inf)
        ok = spread < 0.5
        out[ok] = 1.0 / np.sqrt(1.0 - spread[ok])
        return out
