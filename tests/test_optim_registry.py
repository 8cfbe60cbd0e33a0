"""The optimizer registry: every registered optimizer through one common test, plus names, defaults, the
public API and accounting."""

import importlib

import pytest
import torch

import geomprobe.optim as optim
from geomprobe.errors import ConfigurationError
from geomprobe.optim import (
    REGISTRY,
    BackpropCounter,
    EllipsoidalTR,
    available,
    get,
    make,
    make_closure,
    track_backprops,
)


def small_regression(seed=0):
    """A two-layer tanh network on a fixed random regression batch, weights from an explicit generator."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 5, generator=gen)
    y = torch.sin(X @ torch.randn(5, 1, generator=gen))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model, lambda: torch.nn.functional.mse_loss(model(X), y)


@pytest.mark.parametrize("name", available())
def test_every_optimizer_takes_the_same_calls_and_decreases_the_loss(name):
    model, loss_fn = small_regression()
    opt = make(name, model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, get(name).cls)
    counter = track_backprops(opt)
    with torch.no_grad():
        start = float(loss_fn())
    for _ in range(30):
        loss = opt.step(make_closure(opt, loss_fn))
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    with torch.no_grad():
        end = float(loss_fn())
    assert end < start, f"{name}: loss {start:.4g} -> {end:.4g}"
    assert counter.gradients == 30 and counter.backprops >= 30
    counter.remove()


def test_registered_names():
    assert available() == sorted(
        ["sgd", "sgdm", "adam", "adamw", "rmsprop", "adagrad", "tr-sphere", "tr-adagrad", "tr-rmsprop"]
    )
    assert set(REGISTRY) == set(available())


@pytest.mark.parametrize("name", [n for n in available() if not n.startswith("tr-")])
def test_torch_optimizers_get_the_stated_defaults(name):
    opt = make(name, [torch.nn.Parameter(torch.ones(2))])
    assert type(opt).__module__.startswith("torch.optim")
    for key, value in get(name).defaults.items():
        assert opt.defaults[key] == value, (name, key)


@pytest.mark.parametrize("name", [n for n in available() if n.startswith("tr-")])
def test_trust_region_registry_defaults_are_the_constructor_defaults(name):
    opt = make(name, [torch.nn.Parameter(torch.ones(2))])
    stated = dict(get(name).defaults)
    stated["initial_radius"] = stated.pop("radius")
    stated["ellipsoid"] = name.removeprefix("tr-")
    assert {k: opt.defaults[k] for k in stated} == stated
    assert set(opt.defaults) == set(stated)


def test_overrides_reach_the_optimizer():
    opt = make("adam", [torch.nn.Parameter(torch.ones(2))], lr=0.05, betas=(0.8, 0.9))
    assert opt.defaults["lr"] == 0.05 and opt.defaults["betas"] == (0.8, 0.9)
    tr = make("tr-rmsprop", [torch.nn.Parameter(torch.ones(2))], radius=0.01)
    assert isinstance(tr, EllipsoidalTR) and tr.radius == 0.01


def test_unknown_name_lists_the_known_ones():
    known = "adagrad, adam, adamw, rmsprop, sgd, sgdm, tr-adagrad"
    with pytest.raises(ConfigurationError, match=f"unknown optimizer 'lbfgs'; known optimizers: {known}"):
        make("lbfgs", [torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ConfigurationError, match="unknown optimizer"):
        get(["adam"])


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("sgd", dict(betas=(0.9, 0.99)), r"optimizer 'sgd' \(SGD\) rejected its options"),
        ("adam", dict(lr=-1.0), r"optimizer 'adam' \(Adam\): Invalid learning rate"),
        ("tr-sphere", dict(ellipsoid="rmsprop"), "fixes ellipsoid='sphere'; choose another registered name"),
        ("tr-rmsprop", dict(lr=0.1), r"optimizer 'tr-rmsprop' \(EllipsoidalTR\) rejected its options"),
        ("tr-adagrad", dict(radius=0.0), "initial_radius must be a positive finite number"),
    ],
)
def test_bad_overrides(name, overrides, match):
    with pytest.raises(ConfigurationError, match=match):
        make(name, [torch.nn.Parameter(torch.ones(2))], **overrides)


def test_make_closure_matches_what_each_optimizer_expects():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    loss_fn = lambda: (w ** 2).sum()  # noqa: E731
    tr = make("tr-sphere", [w])
    assert make_closure(tr, loss_fn) is loss_fn
    sgd = make("sgd", [w])
    w.grad = torch.full_like(w, 100.0)
    make_closure(sgd, loss_fn)()
    torch.testing.assert_close(w.grad, 2 * w.detach())  # zeroed, then the fresh gradient
    with pytest.raises(ConfigurationError,
                       match="make_closure expects a callable returning the loss, got float"):
        make_closure(sgd, 1.0)


def test_backprop_counter_arithmetic():
    c = BackpropCounter()
    c.add(gradients=2, hvps=3, function_values=3)
    assert c.backprops == 2 + 3 + 1.5
    c.merge(BackpropCounter(gradients=1))
    assert c.as_dict() == {"gradients": 3, "hvps": 3, "function_values": 3, "backprops": 7.5}
    with pytest.raises(ConfigurationError, match="expects a torch.optim.Optimizer, got str"):
        track_backprops("adam")


def test_counter_stops_after_remove():
    w = torch.nn.Parameter(torch.ones(2))
    opt = make("sgd", [w])
    counter = track_backprops(opt)
    opt.step(make_closure(opt, lambda: (w ** 2).sum()))
    counter.remove()
    opt.step(make_closure(opt, lambda: (w ** 2).sum()))
    assert counter.backprops == 1.0


def test_public_api():
    names = optim.__all__
    assert len(names) == len(set(names))
    assert all(not n.startswith("_") for n in names)
    module = importlib.import_module("geomprobe.optim")
    for n in names:
        assert getattr(module, n) is not None
