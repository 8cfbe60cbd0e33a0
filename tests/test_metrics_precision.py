"""precision: the Landscape's HVPs against float64 HVPs of a copy of the model."""

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe.metrics import precision


def _problem(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g).to(dtype)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 4, (64,), generator=g)


def test_float32_hvps_are_close_to_float64_and_the_model_is_untouched():
    model, loss_fn, X, y = _problem(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    out = precision(gp.Landscape(model, loss_fn, (X, y)), vectors=3)
    assert 0 < out["hvp_rel_err"] < 1e-5 and out["hvp_rel_err_median"] <= out["hvp_rel_err"]
    assert out["hvps"] == out["reference_hvps"] == 3
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_low_precision_is_caught():
    model, loss_fn, X, y = _problem(torch.bfloat16)
    out = precision(gp.Landscape(model, loss_fn, (X, y)))
    assert out["hvp_rel_err"] > 1e-3  # bfloat16 keeps about three digits


def test_a_float64_landscape_is_its_own_reference():
    model, loss_fn, X, y = _problem(torch.float64)
    assert precision(gp.Landscape(model, loss_fn, (X, y)))["hvp_rel_err"] == 0.0


def test_the_probe_records_it(tmp_path):
    model, loss_fn, X, y = _problem(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.GeometryProbe(model, loss_fn, (X, y), metrics=["precision"], schedule=gp.every(1)) as probe:
        probe.attach(opt)
    assert probe.records[0]["precision"]["hvp_rel_err"] == pytest.approx(
        precision(gp.Landscape(model, loss_fn, (X, y)))["hvp_rel_err"])
