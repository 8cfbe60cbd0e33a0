"""Batch-size scaling rules (docs/metrics.md#batch_scaling): linear for SGD, square root for Adam/AdamW/RMSprop."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe.errors import ConfigurationError
from geomprobe.optim import make, scale_for_batch

REL = 1e-12  # the rules are a few float operations: agreement to rounding


def test_linear_rule_for_sgd_keeps_momentum():
    out = scale_for_batch("sgdm", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, 8)
    assert out == {"lr": pytest.approx(0.8, rel=REL), "momentum": 0.9, "weight_decay": 5e-4}
    assert scale_for_batch("sgd", {}, 0.5) == {"lr": pytest.approx(0.005, rel=REL)}


def test_square_root_rule_for_adam():
    out = scale_for_batch("adam", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, 4)
    assert out["lr"] == pytest.approx(2e-3, rel=REL)
    assert out["betas"] == (pytest.approx(0.6, rel=REL), pytest.approx(0.996, rel=REL))
    assert out["eps"] == pytest.approx(5e-9, rel=REL)


def test_adamw_keeps_weight_decay_and_rmsprop_scales_alpha():
    out = scale_for_batch("adamw", {"lr": 4e-4, "betas": (0.95, 0.999), "weight_decay": 0.1}, 16)
    assert out["lr"] == pytest.approx(1.6e-3, rel=REL) and out["weight_decay"] == 0.1
    assert out["betas"] == (pytest.approx(0.2, rel=1e-9), pytest.approx(0.984, rel=REL))
    out = scale_for_batch("rmsprop", {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8}, 9)
    assert out == {"lr": pytest.approx(3e-3, rel=REL), "alpha": pytest.approx(0.91, rel=REL),
                   "eps": pytest.approx(1e-8 / 3, rel=REL)}


def test_missing_hyperparameters_come_from_the_registry_and_input_is_untouched():
    given_hp = {"lr": 1e-3}
    out = scale_for_batch("adam", given_hp, 2)
    assert given_hp == {"lr": 1e-3}
    assert set(out) == {"lr", "betas", "eps"}
    assert out["betas"][1] == pytest.approx(1 - 2 * 0.001, rel=REL)


def test_scaled_hyperparameters_construct_the_optimizer():
    import torch

    for name in ("sgdm", "adam", "adamw", "rmsprop"):
        make(name, [torch.nn.Parameter(torch.ones(2))], **scale_for_batch(name, {}, 4))


# Products stay below 5, inside the rule for beta1 = 0.8.
kappas = st.floats(min_value=0.05, max_value=2.0, allow_nan=False)


@settings(database=None, deadline=None)
@given(k1=kappas, k2=kappas)
def test_rules_compose(k1, k2):
    # Growing the batch by k1 and then by k2 is growing it by k1·k2.
    hp = {"lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-8}
    twice = scale_for_batch("adam", scale_for_batch("adam", hp, k1), k2)
    once = scale_for_batch("adam", hp, k1 * k2)
    assert twice["lr"] == pytest.approx(once["lr"], rel=1e-9)
    assert twice["eps"] == pytest.approx(once["eps"], rel=1e-9)
    assert twice["betas"] == pytest.approx(once["betas"], rel=1e-9)


@settings(database=None, deadline=None)
@given(k=st.floats(min_value=0.01, max_value=1e4, allow_nan=False))
def test_linear_rule_inverts(k):
    back = scale_for_batch("sgd", scale_for_batch("sgd", {"lr": 0.1}, k), 1 / k)
    assert back["lr"] == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize(
    "name, hp, kappa, match",
    [
        ("adam", {"betas": (0.9, 0.999)}, 10,
         r"beta1=0.9 to 1 - kappa\*\(1 - beta1\) = .* <= 0 at kappa=10.0; it holds only for kappa < 10"),
        ("adamw", {"betas": (0.5, 0.999)}, 3, "beta1"),
        ("adam", {"betas": (0.0, 0.9)}, 1.5, "beta1"),
        ("rmsprop", {"alpha": 0.99}, 100, "alpha=0.99"),
        ("rmsprop", {"alpha": 0.99}, 250, "alpha"),
    ],
)
def test_rejects_kappa_beyond_the_rule(name, hp, kappa, match):
    with pytest.raises(ConfigurationError, match=match):
        scale_for_batch(name, hp, kappa)


def test_largest_valid_kappa_is_accepted():
    out = scale_for_batch("adam", {"betas": (0.9, 0.999)}, 9.9)
    assert out["betas"][0] == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("kappa", [0, -2.0, math.nan, math.inf, True, "4"])
def test_rejects_bad_kappa(kappa):
    with pytest.raises(ConfigurationError, match="kappa .*must be a positive finite number"):
        scale_for_batch("adam", {}, kappa)


@pytest.mark.parametrize(
    "name, hp, match",
    [
        ("lamb", {}, "unknown optimizer 'lamb'; known optimizers"),
        ("adagrad", {},
         "no batch-size scaling rule for optimizer 'adagrad'; rules exist for sgd, sgdm, adam"),
        ("tr-rmsprop", {}, "no batch-size scaling rule"),
        ("rmsprop", {"momentum": 0.9}, "stated for RMSprop without momentum"),
        ("adam", {"betas": (0.9,)}, r"betas must be a pair"),
        ("adam", {"betas": (1.2, 0.9)}, r"beta1 must lie in \[0, 1\)"),
    ],
)
def test_bad_input(name, hp, match):
    with pytest.raises(ConfigurationError, match=match):
        scale_for_batch(name, hp, 2)


def test_hparams_must_be_a_dict():
    with pytest.raises(ConfigurationError, match="hparams must be a dict of keyword arguments, got list"):
        scale_for_batch("sgd", [("lr", 0.1)], 2)
