"""Probe specs: every accepted form resolves, and every form of bad spec gets one clear line."""

import probe_specs
import pytest
import torch
from probe_specs import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

from geomprobe.errors import ConfigurationError
from geomprobe.load.spec import ProbeSpec, load_spec, resolve_callable, spec_from_result


@pytest.mark.parametrize("name", ["probe_specs:mlp_spec", f"{probe_specs.SPEC_FILE}:mlp_spec"])
def test_module_and_file_specs_resolve(name):
    spec = load_spec(name)
    assert isinstance(spec, ProbeSpec)
    assert type(spec.model).__name__ == "TinyNet"
    assert isinstance(spec.build_optimizer(), torch.optim.Adam)


@pytest.mark.parametrize("fn", ["mlp_dict_spec", "mlp_tuple_spec"])
def test_dict_and_tuple_results_are_accepted(fn):
    spec = load_spec(f"probe_specs:{fn}")
    assert isinstance(spec.model, nn.Module) and spec.optimizer_factory is None
    assert spec.build_optimizer() is None


def test_spec_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = load_spec("probe_specs:mlp_random_data_spec"), load_spec("probe_specs:mlp_random_data_spec")
    c = load_spec("probe_specs:mlp_random_data_spec", seed=1)
    assert torch.equal(a.probe_data[0], b.probe_data[0])
    assert torch.equal(a.model.fc1.weight, b.model.fc1.weight)
    assert not torch.equal(a.probe_data[0], c.probe_data[0])
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_file_spec_can_import_modules_beside_it(tmp_path):
    (tmp_path / "helper_mod_for_spec.py").write_text("SIZE = 3\n")
    (tmp_path / "my_spec.py").write_text(
        "import torch\nfrom torch import nn\nimport helper_mod_for_spec as h\n"
        "def spec():\n    X = torch.zeros(4, h.SIZE)\n"
        "    return nn.Linear(h.SIZE, 1), nn.MSELoss(), (X, torch.zeros(4, 1))\n"
    )
    assert load_spec(f"{tmp_path}/my_spec.py:spec").model.in_features == 3


BAD = [
    ("no_colon_here", "is not of the form"),
    ("probe_specs:", "is not of the form"),
    ("no_such_module_for_geomprobe:fn", "no module named 'no_such_module_for_geomprobe'"),
    ("/no/such/dir/spec.py:fn", "does not exist"),
    ("probe_specs:missing_function", "has no attribute 'missing_function'"),
    ("probe_specs:NOT_CALLABLE", "names a int, not a function"),
    ("probe_specs:not_a_spec", "returned int; it must return a geomprobe.load.spec.ProbeSpec"),
    ("probe_specs:not_a_module_spec", "must be a torch.nn.Module"),
    ("probe_specs:raising_spec", r"raised ValueError: boom \(at probe_specs.py:\d+\)"),
]


@pytest.mark.parametrize("name, message", BAD)
def test_bad_specs_raise_one_clear_line(name, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        load_spec(name)
    assert "\n" not in str(info.value)


def test_a_spec_file_with_a_syntax_error_or_a_folder(tmp_path):
    (tmp_path / "broken.py").write_text("def spec(:\n")
    with pytest.raises(ConfigurationError, match=r"importing spec file .* failed: SyntaxError"):
        resolve_callable(f"{tmp_path}/broken.py:spec")
    with pytest.raises(ConfigurationError, match="is a folder, not a Python file"):
        resolve_callable(f"{tmp_path}/:spec")


@pytest.mark.parametrize(
    "result, message",
    [
        ({"model": nn.Linear(1, 1), "loss_fn": nn.MSELoss(), "probe_data": 1, "optimiser": None}, "unknown key"),
        ({"model": nn.Linear(1, 1), "loss_fn": nn.MSELoss()}, "without probe_data"),
        (ProbeSpec(nn.Linear(1, 1), "mse", (1, 2)), "is not callable"),  # type: ignore[arg-type]
        (ProbeSpec(nn.Linear(1, 1), nn.MSELoss(), None), "gave no probe_data"),
        (ProbeSpec(nn.Linear(1, 1), nn.MSELoss(), (1, 2), optimizer_factory="adam"), "optimizer_factory of type str"),  # type: ignore[arg-type]
    ],
)
def test_results_that_break_the_contract(result, message):
    with pytest.raises(ConfigurationError, match=message):
        spec_from_result(result)


def test_an_optimizer_factory_that_fails_or_returns_the_wrong_thing():
    spec = ProbeSpec(nn.Linear(1, 1), nn.MSELoss(), (1, 2), optimizer_factory=lambda m: 1 / 0)
    with pytest.raises(ConfigurationError, match="optimizer_factory\\(model\\) raised ZeroDivisionError"):
        spec.build_optimizer()
    spec.optimizer_factory = lambda m: "adam"
    with pytest.raises(ConfigurationError, match="must return a torch.optim.Optimizer, got str"):
        spec.build_optimizer()
