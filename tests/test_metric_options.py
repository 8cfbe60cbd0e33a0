"""Metric options in every form (`--metric NAME:key=value`, dicts, mappings), checked against each metric's real
signature before anything runs; and the planned cost of non-default budgets against what the metrics spend."""

import inspect
import json

import pytest
import torch
from click.testing import CliRunner
from probe_specs import one_thread  # noqa: F401  (an autouse fixture)
from torch import nn

import geomprobe as gp
from geomprobe.cli.main import cli
from geomprobe.engine.landscape import Landscape
from geomprobe.errors import ConfigurationError
from geomprobe.metrics import registry
from geomprobe.probe.metric_spec import _OBJECTS, metric_option_types, parse_metric, resolve_metrics
from geomprobe.probe.progress import plan_probe
from geomprobe.runs.reader import RunReader


def test_values_are_read_as_the_options_types():
    assert parse_metric("spectrum:k=3,tol=1e-4,which=largest") == (
        "spectrum", {"k": 3, "tol": 1e-4, "which": "largest"})
    assert parse_metric("precond:raw=false,rmed=yes,max_iter=none") == (
        "precond", {"raw": False, "rmed": True, "max_iter": None})
    assert parse_metric("rmed:blocks=fc1.*+fc2.weight") == ("rmed", {"blocks": ["fc1.*", "fc2.weight"]})
    assert parse_metric("rmed:blocks=fc1.*") == ("rmed", {"blocks": "fc1.*"})
    assert parse_metric(" trace : hvps = 24 ") == ("trace", {"hvps": 24})
    assert parse_metric("isotropy:u_min=none") == ("isotropy", {"u_min": None})
    assert parse_metric("view_line:span=-2+0.5") == ("view_line", {"span": (-2.0, 0.5)})
    with pytest.raises(ConfigurationError, match="numbers joined by"):
        parse_metric("view_line:span=-2+x")
    eps = parse_metric("saddle:eps_g=1")[1]["eps_g"]
    assert eps == 1.0 and isinstance(eps, float)  # a float option reads "1" as a float


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_every_option_of_every_metric_reads_back_its_default(name):
    # The parser works from the real signatures: each settable option, written as its default, parses to it.
    params = inspect.signature(registry.get(name).fn).parameters
    for key in metric_option_types(name):
        default = params[key].default
        if default is None or key in _OBJECTS:
            continue
        if isinstance(default, bool):
            text = str(default).lower()
        elif isinstance(default, (tuple, list)):
            text = "+".join(map(str, default))
        else:
            text = str(default)
        assert parse_metric(f"{name}:{key}={text}") == (name, {key: default}), key


@pytest.mark.parametrize("text, words", [
    ("spectrum:kk=3", ["metric 'spectrum' has no option 'kk'", "it takes k, tol, max_iter, seed, bound, which"]),
    ("spectrum:k=3.5", ["metric 'spectrum'", "k='3.5' must be an integer", "spectrum takes k, tol"]),
    ("spectrum:k=0", ["k=0 must be an integer >= 1"]),
    ("spectrum:tol=-1", ["tol=-1.0 must be a number > 0"]),
    ("spectrum:tol=nan", ["tol=nan must be a number > 0"]),
    ("spectrum:which=top", ["which='top' must be one of 'both', 'largest', 'smallest'"]),
    ("rmed:level=1", ["level=1.0 must be a number in (0, 1)"]),
    ("rmed:k=2", ["k=2 must be an integer >= 3"]),
    ("diagshare:k=1", ["k=1 must be an integer >= 2"]),
    ("trace:method=exact", ["method='exact' must be one of 'deflated', 'hutchinson', 'hutch++'"]),
    ("precond:raw=maybe", ["raw='maybe' must be true or false"]),
    ("spectrum:k", ["'k' is not key=value"]),
    ("spectrum:k=1,k=2", ["option 'k' is given twice"]),
    ("precond:optimizer=adam", ["takes a Python object", "Python API"]),
    ("spectrm:k=3", ["unknown metric 'spectrm'", "did you mean 'spectrum'"]),
    ("", ["NAME or NAME:key=value"]),
])
def test_bad_options_are_one_message_naming_metric_key_and_allowed_keys(text, words):
    with pytest.raises(ConfigurationError) as e:
        parse_metric(text)
    for w in words:
        assert w in str(e.value)


def test_every_form_of_a_selection_gives_the_same_options():
    want = {"spectrum": {"k": 3}, "rmed": {"hvps": 256}}
    assert resolve_metrics(["spectrum:k=3", {"name": "rmed", "hvps": 256}]) == want
    assert resolve_metrics({"spectrum": {"k": 3}, "rmed": {"hvps": 256}}) == want
    assert resolve_metrics(("spectrum:k=3", "rmed:hvps=256")) == want
    assert resolve_metrics({"name": "trace", "hvps": 12}) == {"trace": {"hvps": 12}}
    assert resolve_metrics("trace") == {"trace": {}}
    with pytest.raises(ConfigurationError, match="metric 'spectrum' is given twice"):
        resolve_metrics(["spectrum", "spectrum:k=2"])
    with pytest.raises(ConfigurationError, match="needs its 'name' key"):
        resolve_metrics([{"hvps": 3}])
    with pytest.raises(ConfigurationError, match="options of metric 'rmed' must be a dict"):
        resolve_metrics({"rmed": 256})
    with pytest.raises(ConfigurationError, match="no metrics asked for"):
        resolve_metrics([])
    with pytest.raises(ConfigurationError, match="tol=0 must be a number > 0"):  # the Python API is checked too
        resolve_metrics({"spectrum": {"tol": 0}})
    with pytest.raises(ConfigurationError, match="hvps=True must be an integer"):
        resolve_metrics([{"name": "trace", "hvps": True}])


def _mlp():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), (X, y)


def test_geometry_probe_takes_option_strings_and_refuses_bad_ones_at_construction(tmp_path):
    model, batch = _mlp()
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), batch,
                             metrics=["spectrum:k=2", {"name": "rmed", "hvps": 40}], run_dir=tmp_path / "run")
    record = probe.probe(0)
    probe.close()
    assert len(record["spectrum"]["top"]) == 2 and record["rmed"]["hvps"] == 40
    assert RunReader(tmp_path / "run").meta["probe"]["metrics"] == {"spectrum": {"k": 2}, "rmed": {"hvps": 40}}
    with pytest.raises(ConfigurationError, match="metric 'rmed': option signs=1 must be an integer >= 2"):
        gp.GeometryProbe(model, nn.CrossEntropyLoss(), batch, metrics=["rmed:signs=1"])


@pytest.mark.parametrize("name, options", [
    ("rmed", {"hvps": 40}), ("rmed", {"hvps": 200}), ("rmed", {"hvps": 300, "exact_threshold": 50, "k": 40, "top": 8}),
    ("diagshare", {"hvps": 20}), ("diagshare", {"hvps": 150, "exact_threshold": 100}),
])
def test_the_plan_of_a_non_default_budget_is_what_the_metric_spends(name, options):
    # 403 parameters in 4 blocks: every budget below forces the metric off its default layout
    model, batch = _mlp()
    land = Landscape(model, nn.CrossEntropyLoss(), batch)
    fixed = {**options, "rel_tol": 0} if name == "diagshare" else options  # the whole budget: the plan is spent
    planned = plan_probe({name: fixed}, land.space)[name]
    assert planned["exact"] and planned["hvps"] == registry.get(name)(land, **fixed)["hvps"] <= options["hvps"]
    if name == "diagshare":
        # the default rel_tol may stop a sampled plan early: the plan is then a cap, and says so
        planned, out = plan_probe({name: options}, land.space)[name], registry.get(name)(land, **options)
        assert out["hvps"] <= planned["hvps"] == plan_probe({name: fixed}, land.space)[name]["hvps"]
        assert planned["exact"] == out["exact"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_cli_metric_options_reach_the_record(tmp_path):
    import test_cli_probe

    ckpt = test_cli_probe.save_training_checkpoints(tmp_path, steps=(5,))[0]
    result = run("probe", ckpt, "--spec", "probe_specs:mlp_spec", "--metric", "spectrum:k=2,tol=1e-6",
                 "--metric", "rmed:hvps=40", "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    record = RunReader(tmp_path / "run").records[0]
    assert len(record["spectrum"]["top"]) == 2 and record["rmed"]["hvps"] == 40
    assert json.loads(result.stdout)["metrics"] == ["spectrum", "rmed"]


def test_cli_refuses_a_bad_option_before_loading_anything(tmp_path):
    # the spec does not exist: the metric is refused first, as a usage error, and nothing is written
    result = run("probe", tmp_path / "missing.pt", "--spec", "no_such_module:f", "--metric", "rmed:hvp=40",
                 "--out", tmp_path / "run")
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "metric 'rmed' has no option 'hvp'" in lines[0] and "hvps" in lines[0]
    assert not (tmp_path / "run").exists()
    dup = run("probe", tmp_path / "missing.pt", "--spec", "no_such_module:f", "--metric", "trace",
              "--metric", "trace:hvps=4")
    assert dup.exit_code == 1 and "metric 'trace' is given twice" in dup.stderr
