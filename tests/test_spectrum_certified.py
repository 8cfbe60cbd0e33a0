"""`spectrum` certifies that its extremes are the extreme eigenvalues, not merely eigenvalues (issue 18, item 8).

A residual bound says that some eigenvalue lies near a Ritz value; on a family of random float64 tanh MLPs
fitted close to their own outputs (small negative curvature beside a large top eigenvalue) the residual
rule alone reported ``converged=True`` with ``lambda_min`` outside its bound (seeds 56 and 86 below). The
certificate (geomprobe.linalg.certify) bounds what an unseen eigenvalue beyond the extreme Ritz value could
hold of a random start: every claim it makes is checked here against dense float64 spectra.
"""

import math

import numpy as np
import pytest
import torch
from reference import dense_hessian
from tolerances import COVERAGE_SIGMAS, FLOAT64_EXACT
from torch import nn

import geomprobe as gp
from geomprobe import ConfigurationError, linalg
from geomprobe.linalg.certify import extreme_errors, log_christoffel, log_mass_threshold, rounding_level
from geomprobe.metrics import spectrum
from geomprobe.probe.warm_start import WarmStart


def tanh_family(seed):
    """A random tanh MLP (random widths, 20-150 parameters, float64) on targets its own outputs plus noise of
    random size: near a minimum, so lambda_min is a small negative value close to a bulk of near-zeros."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in, h = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(4, 12, (1,), generator=g))
    d_out, n = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(8, 40, (1,), generator=g))
    model = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, d_out)).double()
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    noise = float(torch.empty(1).uniform_(0.0, 0.3, generator=g))
    with torch.no_grad():
        y = model(X) + noise * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return model, nn.MSELoss(), [(X, y)]


def slack(truth):
    return FLOAT64_EXACT * max(1.0, abs(truth))


def claims_hold(out, evals, k):
    """(claims made, claims broken): the certified extremes lie on the stated side within the error, and
    every value flagged certified lies within its error of the true value of its rank."""
    made = broken = 0
    lo, hi = float(evals[0]), float(evals[-1])
    if out["bottom_certified"][0]:
        made += 1
        broken += not (out["lambda_min"] - out["lambda_min_err"] - slack(lo) <= lo <= out["lambda_min"] + slack(lo))
    if out["top_certified"][0]:
        made += 1
        broken += not (out["lambda_max"] - slack(hi) <= hi <= out["lambda_max"] + out["lambda_max_err"] + slack(hi))
    desc = evals.flip(0)
    for i in range(1, k):
        for flag, v, e, t in ((out["top_certified"][i], out["top"][i], out["top_err"][i], float(desc[i])),
                              (out["bottom_certified"][i], out["bottom"][i], out["bottom_err"][i], float(evals[i]))):
            if flag:
                made += 1
                broken += abs(v - t) > e + slack(t)
    return made, broken


def family_check(seeds, risk=1e-2, **options):
    made = broken = old_broken_converged = 0
    for seed in seeds:
        model, loss, batches = tanh_family(seed)
        evals = torch.linalg.eigvalsh(dense_hessian(model, loss, batches))
        out = spectrum(gp.Landscape(model, loss, batches), tol=1e-3, k=3, risk=risk, **options)
        m, b = claims_hold(out, evals, 3)
        made, broken = made + m, broken + b
        assert out["top_certified"][1:] == [False, False] and out["bottom_certified"][1:] == [False, False]
        if out["converged"]:
            assert out["extreme_certified"], out
        old = spectrum(gp.Landscape(model, loss, batches), tol=1e-3, k=3, risk=None, **options)
        lo = float(evals[0])
        old_broken_converged += old["converged"] and abs(old["lambda_min"] - lo) > old["lambda_min_err"] + slack(lo)
    return made, broken, old_broken_converged


def allowed(claims, risk):
    # a probabilistic certificate may fail at its stated rate: binomial mean plus COVERAGE_SIGMAS sds
    mean = claims * risk
    return mean + COVERAGE_SIGMAS * math.sqrt(mean * (1 - risk))


def test_the_residual_rule_alone_misses_and_the_certificate_holds_on_the_tanh_family():
    made, broken, old = family_check(range(100))
    # the residual rule alone: converged with lambda_min outside its bound (the failure of issue 18, item 8)
    assert old >= 2
    assert made >= 190 and broken <= allowed(made, 1e-2), (made, broken)
    assert broken == 0  # the stated rate is an upper bound: on these seeds no claim fails


@pytest.mark.slow
def test_the_certificate_holds_on_260_models_and_with_thick_restarts_and_warm_starts():
    made, broken, old = family_check(range(260))
    assert made >= 500 and broken <= allowed(made, 1e-2) and old >= 3, (made, broken, old)
    made, broken, _ = family_check(range(0, 260, 3), max_basis=9, max_iter=600)
    assert made >= 160 and broken <= allowed(made, 1e-2), (made, broken)


def test_thick_restart_claims_hold_on_the_family():
    made, broken, _ = family_check(range(0, 40, 2), max_basis=9, max_iter=600)
    assert made >= 36 and broken == 0, (made, broken)


def test_warm_starts_along_a_trajectory_are_certified_by_the_same_rule():
    torch.manual_seed(3)
    model, loss, batches = tanh_family(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    warm = WarmStart()
    made = 0
    for step in range(12):
        if step % 3 == 0:
            evals = torch.linalg.eigvalsh(dense_hessian(model, loss, batches))
            out = spectrum(gp.Landscape(model, loss, batches), tol=1e-4, warm=warm)
            assert out["converged"] and out["extreme_certified"] and out["warm"] == (step > 0)
            m, b = claims_hold(out, evals, 1)
            made += m
            assert b == 0, out
        opt.zero_grad()
        loss(model(batches[0][0]), batches[0][1]).backward()
        opt.step()
    assert made == 8


def sym_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return Q @ torch.diag(eigs) @ Q.T, Q


SPECTRA = {
    "outlier_over_bulk": torch.cat([torch.linspace(0.0, 1.0, 198, dtype=torch.float64),
                                    torch.tensor([-0.05, 3.0], dtype=torch.float64)]),
    "dense_edges": torch.linspace(-1.0, 1.0, 200, dtype=torch.float64),
    "cluster_at_top": torch.cat([torch.linspace(-0.5, 1.0, 196, dtype=torch.float64),
                                 torch.tensor([4.97, 4.98, 4.99, 5.0], dtype=torch.float64)]),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("max_basis,reorth", [(None, "full"), (None, "partial"), (10, "full")])
def test_no_eigenvalue_holds_more_of_the_start_than_the_christoffel_bound(name, max_basis, reorth):
    # the inequality the certificate rests on, mu({lambda}) <= 1 / K(lambda), checked at every eigenvalue
    # farther than rounding from the Ritz values, after plain and thick-restarted runs of several lengths.
    # A semi-orthogonal basis (partial reorthogonalization) moves T by O(sqrt(eps)) per step at most: the
    # bound then holds to m sqrt(eps) in the log (measured: 2e-7 at 90 steps, against 1.4e-6 allowed), a
    # relative change of the certified mass that no risk level notices
    eigs = SPECTRA[name]
    A, Q = sym_with_spectrum(eigs, seed=4)
    start = torch.randn(200, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mass = ((Q.T @ (start / start.norm())) ** 2).numpy()
    for steps in (12, 40, 90):
        r = linalg.lanczos(A.__rmatmul__, 200, tol=0.0, max_iter=steps, v0=start, max_basis=max_basis,
                           reorth=reorth)
        near = (eigs[:, None] - r.ritz_values[None, :]).abs().min(1).values.numpy()
        far = near > 1e3 * rounding_level(torch.float64, float(eigs.abs().max()))
        bound = -log_christoffel(r, eigs.numpy())
        slack = 1e-8 if reorth == "full" else steps * math.sqrt(torch.finfo(torch.float64).eps)
        assert far.sum() > 100
        assert (np.log(mass[far]) <= bound[far] + slack).all(), (steps, (np.log(mass) - bound)[far].max())


def test_the_closed_form_christoffel_sum_matches_the_three_term_recurrence():
    A, _ = sym_with_spectrum(SPECTRA["dense_edges"], seed=1)
    r = linalg.lanczos(A.__rmatmul__, 200, tol=0.0, max_iter=15, generator=torch.Generator().manual_seed(2))
    a, b = r.alpha.numpy(), r.beta.numpy()

    def by_recurrence(lam):
        prev, cur, total = 0.0, 1.0, 1.0
        for j in range(len(a)):
            prev, cur = cur, ((lam - a[j]) * cur - (b[j - 1] if j else 0.0) * prev) / b[j]
            total += cur * cur
        return math.log(total)

    theta = r.ritz_values.numpy()
    for lam in (theta[-1] + 1e-3, theta[-1] + 0.5, theta[0] - 2.0, 0.5 * (theta[3] + theta[4]), theta[-1]):
        assert math.isclose(float(log_christoffel(r, lam)[0]), by_recurrence(lam), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("n", [60, 400])
def test_the_mass_threshold_is_exceeded_at_the_stated_rate(n):
    # the probability the certificate rests on: a uniformly random start holds less than t of a fixed
    # direction with probability <= risk, and the bound is tight (a wrong constant either way fails)
    g = torch.Generator().manual_seed(n)
    risk, trials = 0.1, 20000
    z = torch.randn(trials, n, generator=g, dtype=torch.float64).float()
    c2 = z[:, 0] ** 2 / (z * z).sum(1)
    rate = float((c2.log() < log_mass_threshold(n, risk)).double().mean())
    noise = COVERAGE_SIGMAS * math.sqrt(risk * (1 - risk) / trials)
    assert 0.85 * risk <= rate <= risk + noise, rate
    # a warm start a + s z/|z| with the fixed part a orthogonal to the direction (the worst case) and s = 0.1
    s = 0.1
    a = torch.zeros(n)
    a[1] = math.sqrt(1 - s * s)
    v = a + s * z / z.norm(dim=1, keepdim=True)
    c2 = v[:, 0] ** 2 / (v * v).sum(1)
    rate = float((c2.log() < log_mass_threshold(n, risk, s, 1.0)).double().mean())
    assert rate <= risk + noise, rate


def test_end_to_end_failures_stay_below_the_stated_risk():
    # an outlier at 1.5 over a bulk on [0, 1], a loose tol (0.05) and a large risk (0.5), 200 random starts:
    # certified claims do fail here (the test can see them), and no more often than the risk allows
    eigs = torch.cat([torch.linspace(0.0, 1.0, 59, dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64)])
    A, _ = sym_with_spectrum(eigs, seed=5)
    risk, trials, wrong = 0.5, 200, 0
    for s in range(trials):
        r = linalg.lanczos(A.__rmatmul__, 60, tol=0.05, which="largest", risk=risk,
                           generator=torch.Generator().manual_seed(1000 + s))
        assert r.certified[1]
        wrong += float(r.top(1)[0][0]) + r.extreme_err[1] < 1.5 - 1e-12
    assert 1 <= wrong <= risk * trials, wrong


def test_extra_hvps_of_the_certificate_over_the_family():
    # measured cost of waiting for the certificate (risk 1e-2, tol 1e-3) over the residual rule alone on
    # 260 models of the family: median 6 HVPs more, mean 5.9, 90th percentile 9, most 14 (21.5 HVPs per run
    # against 15.6); here 40 of them
    extra = []
    for seed in range(40):
        model, loss, batches = tanh_family(seed)
        land = gp.Landscape(model, loss, batches)
        extra.append(spectrum(land, tol=1e-3)["hvps"] - spectrum(land, tol=1e-3, risk=None)["hvps"])
    extra = np.array(extra)
    assert (extra >= 0).all()
    assert np.median(extra) <= 8 and np.percentile(extra, 90) <= 12, (np.median(extra), np.percentile(extra, 90))


def test_a_start_without_a_random_part_certifies_nothing_and_risk_is_checked():
    A, _ = sym_with_spectrum(SPECTRA["outlier_over_bulk"], seed=2)
    v0 = torch.ones(200, dtype=torch.float64)
    r = linalg.lanczos(A.__rmatmul__, 200, tol=1e-6, v0=v0)
    assert r.risk is None and r.certified == (False, False) and r.extreme_err == (math.inf, math.inf)
    r = linalg.lanczos(A.__rmatmul__, 200, tol=1e-6, v0=v0, v0_random=0.2)
    assert r.certified == (True, True) and r.risk == 1e-2
    model, loss, batches = tanh_family(3)
    out = spectrum(gp.Landscape(model, loss, batches), risk=None)
    assert not out["extreme_certified"] and out["risk"] is None
    assert out["lambda_min_err"] == out["lambda_min_resid"]
    for bad in (0.0, 1.0, -0.1, float("nan"), "x"):
        with pytest.raises(ConfigurationError, match="risk"):
            spectrum(gp.Landscape(model, loss, batches), risk=bad)
    for tol in (float("inf"), float("nan")):
        with pytest.raises(ConfigurationError, match="tol"):
            spectrum(gp.Landscape(model, loss, batches), tol=tol)
    with pytest.raises(ConfigurationError, match="v0_random"):
        linalg.lanczos(A.__rmatmul__, 200, v0=v0, v0_random=2.0)


def test_an_invariant_subspace_certifies_the_extremes_to_rounding():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    r = linalg.lanczos(A.__rmatmul__, 4, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert r.converged and max(r.extreme_err) <= rounding_level(torch.float64, 8.0)
    assert extreme_errors([1.0, 2.0], [0.1, 0.1], 0.0, -10.0, exhausted=True, rounding=1e-15) == (1e-15, 1e-15)
