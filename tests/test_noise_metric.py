"""The registered ``noise`` metric against a linear regression whose gradient noise is known in closed form."""

import copy
import json

import pytest
import torch
from tolerances import FLOAT64_EXACT, POOLED_ALPHA_ABS, SE_CALIBRATION, SIGMAS
from torch import nn

import geomprobe as gp
from geomprobe.engine.persample import sample_minibatches
from geomprobe.metrics import noise

N_IN, SIGMA = 5, 0.5


def regression(P, seed=0):
    """y = w*ᵀx + σε, x ~ N(0, I), probed at w = w* + δ under the mean squared error.

    The per-example gradient is ``g = 2 r x`` with ``r = δᵀx − σε``, so (Isserlis) ``G = E g = 2δ`` and
    ``Σ = Cov g = 4(‖δ‖² + σ²) I + 4 δδᵀ``: ``tr Σ = 4n(‖δ‖² + σ²) + 4‖δ‖²``, ``‖G‖² = 4‖δ‖²``.
    """
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(N_IN, generator=g, dtype=torch.float64)
    delta = torch.linspace(0.2, 0.6, N_IN, dtype=torch.float64)
    X = torch.randn(P, N_IN, generator=g, dtype=torch.float64)
    Y = (X @ w_star + SIGMA * torch.randn(P, generator=g, dtype=torch.float64))[:, None]
    model = nn.Linear(N_IN, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    dd = float(delta @ delta)
    trace = 4 * N_IN * (dd + SIGMA**2) + 4 * dd
    truth = {"trace_cov": trace, "grad_norm_sq": 4 * dd, "noise_scale": trace / (4 * dd), "snr": 4 * dd / trace}
    return model, (X, Y), truth


def test_noise_scale_and_snr_match_the_closed_form():
    model, batch, truth = regression(4000)
    out = noise(gp.Landscape(model, nn.MSELoss(), batch), max_samples=None, chunk_size=1000, n_boot=50)
    assert out["source"] == "per-example" and out["method"] == "vmap" and out["samples"] == 4000
    assert out["mean_grad_rel_diff"] < FLOAT64_EXACT
    for key, value in truth.items():
        assert abs(out[key] - value) <= SIGMAS * out[f"{key}_err"], key
        assert out[f"{key}_err"] < 0.1 * abs(value), key


def test_reported_errors_are_standard_errors():
    z = {k: [] for k in ("trace_cov", "grad_norm_sq", "noise_scale", "snr")}
    for seed in range(16):
        model, batch, truth = regression(400, seed=seed)
        out = noise(gp.Landscape(model, nn.MSELoss(), batch), max_samples=None, chunk_size=400, n_boot=20,
                    seed=seed)
        for k, zs in z.items():
            zs.append((out[k] - truth[k]) / out[f"{k}_err"])
    lo, hi = SE_CALIBRATION
    for k, v in z.items():
        assert lo <= float(torch.tensor(v).std()) <= hi, k


def test_minibatch_noise_with_the_finite_population_correction():
    model, (X, Y), _ = regression(3000, seed=3)
    # Truth for this finite data set: per-example gradients over all N, population covariance (divisor N).
    r = (X @ model.weight.detach()[0] - Y[:, 0])
    G1 = 2 * r[:, None] * X
    mean = G1.mean(0)
    truth = float(((G1 - mean) ** 2).sum(1).mean()) / float(mean @ mean)
    batches = sample_minibatches((X, Y), 32, 300, seed=1)
    land = gp.Landscape(model, nn.MSELoss(), (X[:64], Y[:64]))
    out = noise(land, noise_data=batches, max_samples=None, dataset_size=3000, n_boot=20)
    assert out["source"] == "minibatch" and out["batch_size"] == 32 and out["samples"] == 300
    assert "mean_grad_rel_diff" not in out
    assert abs(out["noise_scale"] - truth) <= SIGMAS * out["noise_scale_err"]


def test_noise_data_is_read_only_up_to_max_samples():
    model, (X, Y), _ = regression(500, seed=2)
    drawn = []

    def endless():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randperm(500, generator=g)[:16]
            drawn.append(1)
            yield X[idx], Y[idx]

    out = noise(gp.Landscape(model, nn.MSELoss(), (X[:32], Y[:32])), noise_data=endless(), max_samples=60, n_boot=10)
    assert out["samples"] == 60 and len(drawn) == 60 and out["batch_size"] == 16


def test_chunked_pass_agrees_with_held_samples():
    model, batch, _ = regression(300, seed=1)
    land = gp.Landscape(model, nn.MSELoss(), batch)
    held = noise(land, max_samples=None, n_boot=10)
    chunked = noise(land, max_samples=None, n_boot=10, max_elements=200)   # groups of 40 rows, two passes
    assert held["exact"] and held["passes"] == 1 and not chunked["exact"] and chunked["passes"] == 2
    assert chunked["gradients"] == 600
    for key in ("trace_cov", "grad_norm_sq", "noise_scale", "snr", "alpha_pooled", "hill_alpha"):
        assert chunked[key] == pytest.approx(held[key], rel=FLOAT64_EXACT), key
    assert chunked["noise_scale_err"] == pytest.approx(held["noise_scale_err"], rel=0.5)


class _Pooled(nn.Module):
    """A linear map whose per-example gradient under ``out.mean()`` is the input itself."""

    def __init__(self, d1, d2):
        super().__init__()
        self.a = nn.Linear(d1, 1, bias=False)
        self.b = nn.Linear(d2, 1, bias=False)
        self.d1 = d1

    def forward(self, x):
        return self.a(x[:, : self.d1]) + self.b(x[:, self.d1 :])


def _mean_output(out, target):
    return out.mean()


def test_lognormal_scales_raise_the_heterogeneity_flag_end_to_end():
    g = torch.Generator().manual_seed(11)
    d1, d2, P = 300, 100, 300
    scales = torch.exp(torch.randn(d1 + d2, generator=g, dtype=torch.float64))
    X = torch.randn(P, d1 + d2, generator=g, dtype=torch.float64) * scales
    model = _Pooled(d1, d2).double()
    out = noise(gp.Landscape(model, _mean_output, (X, torch.zeros(P))), max_samples=None, chunk_size=P, n_boot=20)
    assert abs(out["alpha_pooled"] - 1.52) <= POOLED_ALPHA_ABS
    assert abs(out["alpha_standardized"] - 2.0) <= POOLED_ALPHA_ABS
    assert out["scale_heterogeneity"] and out["gap"] > 0.2
    assert set(out["blocks"]) == {"a.weight", "b.weight"}
    assert out["blocks"]["a.weight"]["coordinates"] == d1
    assert abs(out["blocks"]["a.weight"]["alpha_standardized"] - 2.0) <= 2 * POOLED_ALPHA_ABS
    # Per-block traces add up to the whole.
    assert sum(b["trace_cov"] for b in out["blocks"].values()) == pytest.approx(out["trace_cov"])
    # Gaussian noise norms in 400 dimensions have a very light tail.
    assert out["hill_alpha"] > 5


def test_coordinate_subset_bounds_the_tail_sample():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 400, generator=g, dtype=torch.float64)
    land = gp.Landscape(_Pooled(300, 100).double(), _mean_output, (X, torch.zeros(60)))
    out = noise(land, tail_values=60 * 50, n_boot=10)
    # ~50 coordinates in proportion, but at least ceil(4096 / P) = 69 per block (capped by its size).
    assert out["blocks"]["a.weight"]["coordinates"] == 69 and out["blocks"]["b.weight"]["coordinates"] == 69
    assert out["coordinates"] == 138 and out["values"] <= 60 * 138


def test_result_is_json_ready_registered_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double().train()
    X, Y = torch.randn(60, 3, dtype=torch.float64), torch.randint(0, 2, (60,))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    metric = gp.metrics.get("noise")
    assert "noise_batches" in metric.needs
    out = metric(gp.Landscape(model, nn.CrossEntropyLoss(), (X, Y), mode="eval"), n_boot=10)
    json.dumps(out, allow_nan=False)
    assert out["hvps"] == 0 and out["gradients"] == 60
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_inputs_raise_clear_errors():
    model, batch, _ = regression(30)
    land = gp.Landscape(model, nn.MSELoss(), batch)
    with pytest.raises(gp.ConfigurationError, match="at least 50 samples, got 30 per-example"):
        noise(land)
    X, Y = torch.randn(400, N_IN, dtype=torch.float64), torch.randn(400, 1, dtype=torch.float64)
    with pytest.raises(gp.ConfigurationError, match="pass more batches in noise_data"):
        noise(land, noise_data=sample_minibatches((X, Y), 8, 20))
    with pytest.raises(gp.ConfigurationError, match="training batch size"):
        noise(land, noise_data=[(X[:8], Y[:8])] * 50 + [(X[:5], Y[:5])])
    with pytest.raises(gp.ConfigurationError, match="dataset_size must exceed the batch size 8"):
        noise(land, noise_data=sample_minibatches((X, Y), 8, 60), dataset_size=8)
    bad = sample_minibatches((X, Y), 8, 60)
    bad[7] = (bad[7][0].clone(), bad[7][1].clone())
    bad[7][0][0, 0] = float("nan")
    with pytest.raises(gp.NonFiniteLossError, match="gradient sample 7 has non-finite entries"):
        noise(land, noise_data=bad)
    same = [(X[:8], Y[:8])] * 50
    with pytest.raises(gp.ConfigurationError, match="all 50 gradient samples are equal"):
        noise(land, noise_data=same)


def test_column_slices_change_no_statistic(monkeypatch):
    # the streamed statistics are taken a slice of columns at a time (float64 rows of a 124M-parameter model
    # would be 24-32 GB): slices of 5 columns crossing the blocks' edges, against one slice of everything
    from geomprobe.stats import gradient_noise

    g = torch.Generator().manual_seed(3)
    X = torch.randn(120, 11, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, 11, dtype=torch.float64)
    model = _Pooled(4, 7).double()
    land = gp.Landscape(model, lambda out, _: out.mean(), (X, torch.zeros(120)))
    sliced = noise(land, max_samples=None, n_boot=10, max_elements=400)  # groups of 20, 5 columns a slice
    monkeypatch.setattr(gradient_noise, "_column_slices", lambda d, rows, max_elements: iter([slice(0, d)]))
    whole = noise(land, max_samples=None, n_boot=10, max_elements=400)
    assert not sliced["exact"] and sliced["passes"] == 2
    flat_s, flat_w = gp.runs.flatten_record(sliced), gp.runs.flatten_record(whole)
    assert flat_s.keys() == flat_w.keys()
    for key, value in flat_w.items():
        if isinstance(value, float):
            assert flat_s[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
