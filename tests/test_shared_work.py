"""Work shared by the metrics of one probe (docs/metrics.md#shared_work): precond reuses spectrum's Lanczos
run and rmed's diagonal reads, saddle spectrum's run; the values are those of each metric measured alone, the
HVPs fewer by exactly what was received, the plan counts each part once, and options that differ share nothing."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from probe_specs import one_thread  # noqa: F401  (an autouse fixture)
from quadratic_models import Quadratic, covers, exact_rmed, landscape
from reference import TanhMLP
from test_budgeted_diagonal import _floor
from test_cli_probe import save_training_checkpoints
from torch import nn

import geomprobe as gp
from geomprobe.cli.main import cli
from geomprobe.errors import NonFiniteLossError
from geomprobe.metrics import precond, registry, rmed, spectrum
from geomprobe.metrics.registry import register
from geomprobe.probe.metric_order import run_order
from geomprobe.probe.progress import plan_probe

F64 = torch.float64
SAME = 1e-12  # a shared product gives the value computed again, up to nothing (float64)
# rmed on the sampled (exact entries) and packed plans of the 213-parameter MLP's six blocks
SAMPLED = {"exact_threshold": 32, "k": 16, "top": 4, "screen_samples": 4, "bootstrap": 50}
PACKED = {**SAMPLED, "hvps": 40, "min_k": 8}
# packed by the plan, then exact by the pilot: all six blocks' packed reads are contaminated (docs/metrics.md#rmed)
PILOT = {**SAMPLED, "hvps": 64, "min_k": 30}


def setting(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(64, 6, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    model = TanhMLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # Adam's state: a preconditioner far from the identity
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, opt, (X[:32], y[:32])


def probe_record(metrics, seed=0, **kw):
    model, opt, data = setting()
    probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), data, metrics=metrics, optimizer=opt, seed=seed,
                             warm_start=False, **kw)
    record = probe.probe(0)
    probe.close()
    assert "errors" not in record or set(record["errors"]) <= {"boom"}, record.get("errors")
    return record, probe


def assert_same(a, b, path=""):
    """Every number in ``a`` equals its twin in ``b`` to ``SAME`` (relative), every other value exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        assert abs(a - b) <= SAME * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def without_sharing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("hvps", "shared", "shared_hvps")}


@pytest.mark.parametrize("options", [SAMPLED, PACKED, PILOT], ids=["sampled", "packed", "pilot-exact"])
def test_precond_in_a_probe_with_spectrum_and_rmed_equals_precond_alone_for_fewer_hvps(options):
    metrics = {"spectrum": {}, "rmed": options, "precond": {"rmed_options": options}}
    full, _ = probe_record(metrics)
    alone, _ = probe_record({"precond": {"rmed_options": options}})
    mode = full["rmed"]["mode"]
    assert mode == ("packed" if options is PACKED else "exact") and not full["rmed"]["exact"]
    assert (full["rmed"].get("pilot", {}).get("decision") == "exact") == (options is PILOT)
    # the values are those of precond measured alone, to 1e-12
    assert_same(without_sharing(full["precond"]), without_sharing(alone["precond"]))
    # it spent exactly what it received less, and says what it received and what that cost
    received = {"raw spectrum": full["spectrum"]["hvps"], "raw diagonal reads": full["rmed"]["hvps"]}
    assert all(n > 0 for n in received.values())
    assert full["precond"]["shared"] == ["raw spectrum from spectrum", "raw diagonal reads from rmed"]
    assert full["precond"]["shared_hvps"] == received
    assert full["precond"]["hvps"] == alone["precond"]["hvps"] - sum(received.values())
    assert "shared" not in alone["precond"]
    assert full["cost"]["hvps"] == sum(full[m]["hvps"] for m in metrics)  # every HVP counted once
    # the raw values are those of spectrum and rmed themselves
    assert full["precond"]["raw_lambda_max"] == full["spectrum"]["lambda_max"]
    assert full["precond"]["raw_lambda_min"] == full["spectrum"]["lambda_min"]
    for key in ("rmed", "rmed_ci", "rmed_q99", "rmed_q99_ci"):
        assert full["precond"][f"raw_{key}"] == full["rmed"][key], key


def test_the_order_the_metrics_are_listed_in_changes_nothing():
    metrics = {"spectrum": {}, "rmed": SAMPLED, "precond": {"rmed_options": SAMPLED}}
    forward, probe = probe_record(metrics)
    backward, probe_b = probe_record(dict(reversed(list(metrics.items()))))
    assert run_order(["precond", "rmed", "spectrum"]) == ["rmed", "spectrum", "precond"]
    for name in metrics:  # the same values and the same accounting: the products' own metrics compute them
        assert_same(forward[name], backward[name], name)
    assert list(probe_b.cost_plan) == ["precond", "rmed", "spectrum"]  # the plan keeps the order given
    assert_same(probe.cost_plan, {k: probe_b.cost_plan[k] for k in probe.cost_plan})


def test_metrics_wait_for_the_metrics_they_reuse_and_keep_their_places_otherwise():
    assert run_order(["precond", "saddle", "trace", "spectrum", "rmed"]) == [
        "trace", "spectrum", "saddle", "rmed", "precond"]
    assert run_order(["trace", "noise", "precond"]) == ["trace", "noise", "precond"]
    assert run_order([]) == []


@pytest.mark.parametrize("spectrum_opts, rmed_opts, precond_opts, shared", [
    ({"tol": 1e-6}, SAMPLED, {"rmed_options": SAMPLED}, ["raw diagonal reads from rmed"]),
    ({"k": 2}, SAMPLED, {"rmed_options": SAMPLED}, ["raw diagonal reads from rmed"]),
    ({}, {**SAMPLED, "top": 3}, {"rmed_options": SAMPLED}, ["raw spectrum from spectrum"]),
    ({}, {**SAMPLED, "blocks": "net.0.*"}, {"rmed_options": SAMPLED}, ["raw spectrum from spectrum"]),
    ({}, {**SAMPLED, "seed": 5}, {"rmed_options": SAMPLED}, ["raw spectrum from spectrum"]),
    ({}, SAMPLED, {"rmed_options": SAMPLED, "seed": 3}, None),
], ids=["tol", "k", "top", "blocks", "seed", "precond-seed"])
def test_options_that_differ_are_not_shared(spectrum_opts, rmed_opts, precond_opts, shared):
    metrics = {"spectrum": spectrum_opts, "rmed": rmed_opts, "precond": precond_opts}
    full, probe = probe_record(metrics)
    alone, _ = probe_record({"precond": precond_opts})
    assert_same(without_sharing(full["precond"]), without_sharing(alone["precond"]))
    assert full["precond"].get("shared") == shared
    own = alone["precond"]["hvps"] - sum(full["precond"].get("shared_hvps", {}).values())
    assert full["precond"]["hvps"] == own
    assert probe.cost_plan["precond"].get("shared") == shared  # the plan foresaw the same


def test_statistics_options_reuse_the_reads_and_apply_their_own_level():
    # level and bootstrap change only what is derived from the reads: the reads are shared, the intervals not
    metrics = {"rmed": {**SAMPLED, "level": 0.8}, "precond": {"rmed_options": SAMPLED}}
    full, _ = probe_record(metrics)
    alone, _ = probe_record({"precond": {"rmed_options": SAMPLED}})
    assert full["precond"]["shared"] == ["raw diagonal reads from rmed"]
    assert_same(without_sharing(full["precond"]), without_sharing(alone["precond"]))
    assert full["precond"]["raw_rmed"] == full["rmed"]["rmed"]  # the same reads
    assert full["precond"]["raw_rmed_ci"] != full["rmed"]["rmed_ci"]  # at its own level (0.95)


@pytest.fixture
def boom():
    calls = []

    @register("boom", cost="a few HVPs, then a failure")
    def boom_metric(land, *, seed: int = 0):
        land.hvp(torch.ones(land.dim, dtype=land.dtype))
        calls.append(seed)
        raise NonFiniteLossError("boom")

    yield calls
    registry.REGISTRY.pop("boom")


def test_shared_products_survive_a_metric_failing_in_between(boom):
    metrics = {"spectrum": {}, "rmed": SAMPLED, "boom": {}, "precond": {"rmed_options": SAMPLED}}
    with pytest.warns(RuntimeWarning, match="boom failed"):
        full, _ = probe_record(metrics)
    alone, _ = probe_record({"precond": {"rmed_options": SAMPLED}})
    assert boom == [0] and "boom" in full["errors"] and "boom" not in full
    assert full["precond"]["shared"] == ["raw spectrum from spectrum", "raw diagonal reads from rmed"]
    assert_same(without_sharing(full["precond"]), without_sharing(alone["precond"]))
    assert full["cost"]["hvps"] == full["spectrum"]["hvps"] + full["rmed"]["hvps"] + full["precond"]["hvps"] + 1


class Fixed(torch.optim.SGD):
    """An optimizer whose preconditioner is given: ``P = diag(p)``."""

    def __init__(self, params, p, sizes):
        super().__init__(params, lr=0.1)
        self.p = list(p.split(sizes))

    def preconditioner(self):
        return self.p


def test_a_failing_consumer_leaves_the_products_as_they_were():
    # precond fails after receiving rmed's reads (an HVP of its P-scaled candidates fails); rmed measured
    # again reuses the reads and gets the values it got before: nothing received was changed
    h = torch.linspace(1.0, 5.0, 200, dtype=F64)
    model = Quadratic(h, [120, 80])
    opt = Fixed(model.parameters(), 1.0 / h**2, [120, 80])  # ranks the candidates otherwise than the raw screen
    land = landscape(model)
    first = rmed(land, **SAMPLED)
    inner = land.hvp

    def hvp(v):
        if v.dim() == 2:  # the candidates' columns come in blocks; Lanczos asks for single vectors
            raise RuntimeError("boom")
        return inner(v)

    land.hvp = hvp
    with pytest.raises(RuntimeError, match="boom"):
        precond(land, optimizer=opt, rmed_options=SAMPLED, raw=False, max_iter=2)
    land.hvp = inner
    again = rmed(land, **SAMPLED)
    assert again["hvps"] == 0 and again["shared"] == ["raw diagonal reads from rmed"]
    assert_same(without_sharing(first), without_sharing(again))


def test_a_direct_call_order_shares_too_and_says_from_whom():
    # on one Landscape outside a probe, whichever metric runs first computes; the second receives
    model = Quadratic(torch.linspace(1.0, 5.0, 200, dtype=F64) ** 2, [120, 80], w=torch.ones(200, dtype=F64))
    opt = torch.optim.Adagrad(model.parameters())
    opt.zero_grad()
    model().backward()
    opt.step()
    land = landscape(model)
    pre = precond(land, optimizer=opt, rmed_options=SAMPLED, tol=1e-8)
    r = rmed(land, **SAMPLED)
    s = spectrum(land, tol=1e-8)
    assert r["hvps"] == 0 and r["shared"] == ["raw diagonal reads from precond"]
    assert s["hvps"] == 0 and s["shared"] == ["raw spectrum from precond"]
    assert r["shared_hvps"]["raw diagonal reads"] > 0
    fresh = landscape(model)
    assert_same(without_sharing(r), without_sharing(rmed(fresh, **SAMPLED)))
    assert_same(without_sharing(s), without_sharing(spectrum(fresh, tol=1e-8)))
    assert pre["raw_rmed"] == r["rmed"] and pre["raw_lambda_max"] == s["lambda_max"]
    # the diagonal is known: 200 distinct entries, R_med's max read exactly (sampled, certified)
    assert r["max"] == pytest.approx(25.0, rel=SAME) and r["max_certified"]
    assert covers(r["rmed_ci"], exact_rmed(model.hessian_diagonal())[0])


def test_the_preconditioned_max_is_found_where_p_puts_it():
    # the raw diagonal grows along each block and P = 1/h^2 turns it round: the preconditioned max (1, where
    # h = 1) sits where the raw screen's candidates (h near 10) are not; the extra candidates find and certify it
    h = torch.cat([torch.linspace(1.0, 10.0, 120), torch.linspace(1.0, 10.0, 80)]).to(F64)
    model = Quadratic(h, [120, 80])
    p = 1.0 / h**2
    truth = (p * h).abs()
    pieces = {"whole": truth, "w0": truth[:120], "w1": truth[120:]}
    hits, seeds = dict.fromkeys(pieces, 0), 10
    for seed in range(seeds):  # the max is certified every time; the median's interval covers at its rate
        out = precond(landscape(model), optimizer=Fixed(model.parameters(), p, [120, 80]), rmed_options=SAMPLED,
                      tol=1e-8, seed=seed)
        assert out["rmed_max_certified"] and not out["rmed_exact"]
        for name, part in pieces.items():
            res = out if name == "whole" else out["blocks"][name]
            assert res["rmed_max_certified"], name
            hits[name] += covers(res["rmed_ci"], exact_rmed(part)[0])
    assert all(n / seeds >= _floor(seeds) for n in hits.values()), hits
    # the raw values are rmed's, on its own candidates: max 10, certified
    raw = rmed(landscape(model), **SAMPLED, seed=seed)
    assert out["raw_rmed"] == raw["rmed"] and raw["max"] == pytest.approx(10.0, rel=SAME) and raw["max_certified"]


def test_saddle_reuses_spectrum_when_its_options_match():
    shared, _ = probe_record({"spectrum": {"tol": 1e-4}, "saddle": {}})
    alone, _ = probe_record({"saddle": {}})
    assert shared["saddle"]["hvps"] == 0 and shared["saddle"]["shared"] == ["raw spectrum from spectrum"]
    assert shared["saddle"]["shared_hvps"] == {"raw spectrum": shared["spectrum"]["hvps"]}
    assert_same(without_sharing(shared["saddle"]), without_sharing(alone["saddle"]))
    assert alone["saddle"]["hvps"] == shared["spectrum"]["hvps"] > 0
    differ, _ = probe_record({"spectrum": {}, "saddle": {}})  # tol 1e-3 against saddle's 1e-4
    assert "shared" not in differ["saddle"] and differ["saddle"]["hvps"] > 0


def test_spectrum_runs_cold_when_another_metric_reuses_its_run():
    model, opt, data = setting()
    for metrics, warm in (({"spectrum": {}, "precond": {}}, False), ({"spectrum": {}, "saddle": {}}, True),
                          ({"spectrum": {"tol": 1e-4}, "saddle": {}}, False), ({"spectrum": {}}, True)):
        probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), data, metrics=metrics, optimizer=opt)
        assert (probe._warm_for("spectrum") is not None) == warm, metrics
        probe.close()


FULL = ("spectrum", "trace", "density", "rmed", "diagshare", "noise", "precond")


def test_the_plan_of_the_full_set_counts_each_shared_part_once():
    model, opt, data = setting()
    space = gp.GeometryProbe(model, nn.CrossEntropyLoss(), data, optimizer=opt).space
    full = plan_probe({m: {} for m in FULL}, space, dtype=F64)
    alone = plan_probe({"precond": {}}, space, dtype=F64)["precond"]
    spectrum_plan, rmed_plan = full["spectrum"]["hvps"], full["rmed"]["hvps"]
    assert full["precond"]["hvps"] == alone["hvps"] - spectrum_plan - rmed_plan
    assert full["precond"]["shared"] == ["raw spectrum from spectrum", "raw diagonal reads from rmed"]
    assert full["precond"]["shared_hvps"] == {"raw spectrum": spectrum_plan, "raw diagonal reads": rmed_plan}
    assert all("shared" not in full[m] for m in FULL if m != "precond")  # nothing else in the set is the same
    before = sum(plan_probe({m: {}}, space, dtype=F64)[m]["hvps"] for m in FULL)
    assert sum(p["hvps"] for p in full.values()) == before - spectrum_plan - rmed_plan
    # differing options: nothing shared, nothing taken off
    apart = plan_probe({"spectrum": {"tol": 1e-5}, "rmed": {"hvps": 512}, "precond": {}}, space, dtype=F64)
    assert apart["precond"]["hvps"] == alone["hvps"] and "shared" not in apart["precond"]


@pytest.mark.parametrize("options", [{}, SAMPLED, PACKED, PILOT], ids=["default", "sampled", "packed", "pilot-exact"])
def test_precond_spends_within_its_plan_alone_and_shared(options):
    metrics = {"spectrum": {}, "rmed": options, "precond": {"rmed_options": options}}
    for chosen in (metrics, {"precond": metrics["precond"]}):
        record, probe = probe_record(chosen)
        for name in chosen:
            planned = probe.cost_plan[name]
            assert record[name]["hvps"] <= planned["hvps"], (name, record[name]["hvps"], planned)
            if planned["exact"]:
                assert record[name]["hvps"] == planned["hvps"], name


def test_dry_run_plans_the_full_set_with_shared_parts_once(tmp_path):
    (tmp_path / "ckpts").mkdir()
    ckpts = save_training_checkpoints(tmp_path / "ckpts", steps=(10,))
    args = ["probe", *map(str, ckpts), "--spec", "probe_specs:mlp_spec", "--dry-run", "--json"]
    full = CliRunner().invoke(cli, args + [a for m in FULL if m != "noise" for a in ("--metric", m)])
    alone = CliRunner().invoke(cli, args + ["--metric", "precond"])
    assert full.exit_code == 0 and alone.exit_code == 0, full.output + alone.output
    plan, plan_alone = json.loads(full.stdout)["cost_plan"], json.loads(alone.stdout)["cost_plan"]
    drop = plan["spectrum"]["hvps"] + plan["rmed"]["hvps"]
    assert plan["precond"]["hvps"] == plan_alone["precond"]["hvps"] - drop
    assert plan["precond"]["shared"] == ["raw spectrum from spectrum", "raw diagonal reads from rmed"]
    table = CliRunner().invoke(cli, args[:-1] + ["--metric", "spectrum", "--metric", "precond"])
    assert "raw spectrum from spectrum" in table.stdout


def test_an_unknown_rmed_option_of_precond_is_refused_before_any_hvp():
    model = Quadratic(torch.linspace(1.0, 5.0, 40, dtype=F64), [40])
    land = landscape(model)
    with pytest.raises(gp.ConfigurationError, match=r"unknown keys \['kk'\].*known: bootstrap, exact_threshold"):
        precond(land, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), rmed_options={"kk": 3})
    assert land.hvps == 0 and land.results == {}
