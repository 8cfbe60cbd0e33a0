"""rmed: exact small blocks, the sampled large-block estimator and its intervals, against known diagonals."""

import json

import numpy as np
import pytest
import torch
from quadratic_models import (
    Quadratic,
    banded,
    covers,
    exact_rmed,
    indefinite,
    landscape,
    spd,
)
from tolerances import COVERAGE_MIN, FLOAT32_REL, FLOAT64_REL, RMED_LARGE_REL

from geomprobe import ConfigurationError, NonFiniteLossError
from geomprobe.metrics import get, rmed
from geomprobe.metrics.rmed import diagonal_ratios

SIZES = [30, 23, 7]


def _matrices():
    g = torch.Generator().manual_seed(3)
    diag = torch.diag(torch.exp(torch.randn(60, generator=g, dtype=torch.float64)))
    blocks = torch.block_diag(spd(30, seed=1), spd(23, seed=2), spd(7, seed=3))
    return {"diagonal": diag, "block-diagonal": blocks, "spd": spd(60, seed=4),
            "indefinite": indefinite(60, neg=20, seed=5)}


@pytest.mark.parametrize("kind", ["diagonal", "block-diagonal", "spd", "indefinite"])
def test_exact_blocks_match_the_dense_diagonal(kind):
    A = _matrices()[kind]
    model = Quadratic(A, SIZES)
    out = rmed(landscape(model))
    h = model.hessian_diagonal()
    whole, whole_q = exact_rmed(h)
    assert out["exact"] and out["max_certified"] and out["hvps"] == 60
    assert out["rmed"] == pytest.approx(whole, rel=FLOAT64_REL) and out["rmed_err"] == 0.0
    assert out["rmed_q99"] == pytest.approx(whole_q, rel=FLOAT64_REL)
    at = 0
    for i, n in enumerate(SIZES):
        r, q = exact_rmed(h[at : at + n])
        b = out["blocks"][f"w{i}"]
        assert b["rmed"] == pytest.approx(r, rel=FLOAT64_REL) and b["rmed_q99"] == pytest.approx(q, rel=FLOAT64_REL)
        assert b["exact"] and b["size"] == n and b["rmed_ci"] == [b["rmed"], b["rmed"]]
        at += n
    json.dumps(out, allow_nan=False)


def test_absolute_values_are_used():
    # diag = (-8, 1, 2, 3): max |h| = 8, median |h| = 2.5; a signed ratio would be 3 / 1.5.
    model = Quadratic(torch.tensor([-8.0, 1.0, 2.0, 3.0], dtype=torch.float64), [4])
    assert rmed(landscape(model))["rmed"] == pytest.approx(8 / 2.5, rel=FLOAT64_REL)


def test_large_block_estimator_within_ten_percent_of_exact():
    d = 100_000
    a, c = banded(d, seed=1, spread=0.5, coupling=0.5)
    model = Quadratic(a, [d], offdiag=c)
    out = rmed(landscape(model), seed=0)
    exact, exact_q = exact_rmed(model.hessian_diagonal())
    assert not out["exact"] and out["hvps"] == 512 + 64 + 32
    assert abs(out["rmed"] - exact) <= RMED_LARGE_REL * exact
    assert covers(out["rmed_ci"], exact) and abs(out["rmed"] - exact) <= out["rmed_err"]
    assert covers(out["rmed_q99_ci"], exact_q)
    # the screen found the true max and certified it: the max is exact, not estimated
    assert out["max_certified"] and out["max"] == pytest.approx(float(model.hessian_diagonal().abs().max()))


def test_mixed_exact_and_sampled_blocks_pool_into_the_whole_model():
    a, c = banded(2050, seed=2, spread=1.0, coupling=0.3)
    model = Quadratic(a, [2000, 50], offdiag=c)
    out = rmed(landscape(model), exact_threshold=100, k=256, top=32, seed=1)
    h = model.hessian_diagonal()
    assert out["blocks"]["w1"]["exact"] and not out["blocks"]["w0"]["exact"]
    assert out["blocks"]["w1"]["rmed"] == pytest.approx(exact_rmed(h[2000:])[0], rel=FLOAT64_REL)
    assert covers(out["blocks"]["w0"]["rmed_ci"], exact_rmed(h[:2000])[0])
    assert covers(out["rmed_ci"], exact_rmed(h)[0]) and covers(out["rmed_q99_ci"], exact_rmed(h)[1])
    assert out["hvps"] == 50 + 256 + 32 + 32 and out["computed"] == 50 + 256 + 32


def test_interval_covers_the_truth_at_its_rate():
    a, c = banded(2000, seed=4, spread=1.0, coupling=0.3)
    model = Quadratic(a, [2000], offdiag=c)
    exact = exact_rmed(model.hessian_diagonal())[0]
    land = landscape(model)
    hits = [covers(rmed(land, exact_threshold=10, k=64, top=8, screen_samples=8, seed=s)["rmed_ci"], exact)
            for s in range(20)]
    assert np.mean(hits) >= COVERAGE_MIN


def test_a_weak_screen_says_so_and_still_bounds_the_max():
    # Strong coupling makes the Bekas screen noisy; 4 probes and one recomputed candidate cannot rule out
    # every other coordinate, so the max is flagged and max_upper carries the uncertainty.
    a, c = banded(3000, seed=5, spread=0.2, coupling=3.0)
    model = Quadratic(a, [3000], offdiag=c)
    out = rmed(landscape(model), exact_threshold=10, k=64, top=1, screen_samples=4, seed=0)
    true_max = float(model.hessian_diagonal().abs().max())
    assert not out["max_certified"]
    assert out["max"] <= true_max + 1e-12 <= out["max_upper"] + 2e-12
    assert covers(out["rmed_ci"], exact_rmed(model.hessian_diagonal())[0])


def test_scalings_share_the_exact_entries():
    A = spd(40, seed=6)
    model = Quadratic(A, [40])
    land = landscape(model)
    p = torch.linspace(0.1, 3.0, 40, dtype=torch.float64)
    (raw, scaled), hvps = diagonal_ratios(land.hvp, 40, land.space.blocks, scalings=[None, p])
    assert hvps == 40
    assert scaled["rmed"] == pytest.approx(exact_rmed(p * torch.diagonal(A))[0], rel=FLOAT64_REL)
    assert raw["rmed"] == pytest.approx(exact_rmed(torch.diagonal(A))[0], rel=FLOAT64_REL)


def test_zero_median_gives_an_undefined_ratio():
    model = Quadratic(torch.tensor([0.0, 0.0, 0.0, 2.0, 5.0], dtype=torch.float64), [5])
    out = rmed(landscape(model))
    assert out["rmed"] is None and out["rmed_err"] is None and out["max"] == 5.0


def test_float32_landscape():
    A = spd(50, seed=7)
    model = Quadratic(A, [50], dtype=torch.float32)
    out = rmed(landscape(model))
    assert out["rmed"] == pytest.approx(exact_rmed(torch.diagonal(A))[0], rel=FLOAT32_REL)


def test_randomness_is_local_and_seeded():
    a, c = banded(3000, seed=8)
    land = landscape(Quadratic(a, [3000], offdiag=c))
    state = torch.random.get_rng_state()
    first = rmed(land, exact_threshold=10, k=64, top=8, screen_samples=8, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    again = rmed(land, exact_threshold=10, k=64, top=8, screen_samples=8, generator=torch.Generator().manual_seed(3))
    # the same draws, so the same columns: on the same Landscape they are not read again (docs/metrics.md#shared_work)
    assert again["hvps"] == 8 and again["shared_hvps"] == {"hessian columns": first["hvps"] - 8}
    assert {k: v for k, v in again.items() if k not in ("hvps", "shared", "shared_hvps")} == {
        k: v for k, v in first.items() if k != "hvps"}


def test_no_selected_block_is_a_clear_error():
    land = landscape(Quadratic(spd(10), [6, 4]))
    with pytest.raises(ConfigurationError, match="no parameter block matches blocks=.*available blocks: w0, w1"):
        rmed(land, blocks="decoder.*")


def test_non_finite_loss_is_a_clear_error():
    model = Quadratic(spd(6), [6], w=torch.full((6,), float("nan")))
    with pytest.raises(NonFiniteLossError, match="the loss on probe batch 0 is nan"):
        rmed(landscape(model))


def test_non_finite_curvature_is_a_clear_error():
    class NaNCurvature:
        dim, dtype, device, chunk_size = 4, torch.float64, torch.device("cpu"), 16

        def __init__(self):
            self.space = landscape(Quadratic(spd(4), [4])).space

        def hvp(self, v):
            return torch.full_like(v, float("nan"))

    with pytest.raises(NonFiniteLossError, match="returned NaN or infinite entries"):
        rmed(NaNCurvature())


def test_registered_with_its_cost():
    m = get("rmed")
    assert m.fn is rmed and "HVP" in m.cost and not m.needs
