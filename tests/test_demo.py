"""The demo end to end at a reduced size: runs written, comparison printed, bad options refused."""

import json

import pytest
from click.testing import CliRunner

import geomprobe as gp
from geomprobe.cli.main import cli


def test_demo_runs_end_to_end_at_reduced_size(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--budget", "40", "--probes", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [r["optimizer"] for r in doc["results"]] == ["sgdm", "adam", "tr-rmsprop"]
    for r in doc["results"]:
        assert r["backprops"] >= 40 and r["probes"] == 2
        run = gp.RunReader(r["run_dir"])
        rec = run.records[-1]
        assert rec["spectrum"]["lambda_max"] > 0 and "rmed" in rec and "diagshare" in rec
        assert "errors" not in rec, rec.get("errors")
        assert rec["precond"]["lambda_max"] > 0           # the optimizer's own geometry after its first steps
        assert run.meta["demo"]["optimizer"] == r["optimizer"]
        # the demo picks its own probe points: the run says so instead of the default schedule
        assert run.meta["probe"]["schedule"] == "manual('at 2 backprop counts from 0 to 40, geometrically spaced')"
    assert "spectrum.lambda_max" in doc["comparison"]["metrics"]
    # step 0 has no optimizer state for Adam: precond is skipped there, not an error
    first = gp.RunReader(out / "adam").records[0]
    assert "precond" in first["skipped"] and "errors" not in first


def test_demo_refuses_an_existing_folder_and_unknown_optimizers(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--budget", "10", "--probes", "1"])
    assert res.exit_code == 1 and "exists and is not empty" in res.output and "Traceback" not in res.output
    assert (out / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "x"), "--optimizers", "sgdm,lbfgs"])
    assert res.exit_code == 2 and "unknown optimizer 'lbfgs'" in res.output


def test_probe_points_end_at_the_budget():
    from geomprobe.demo.run import probe_points

    assert probe_points(40, 2) == [0.0, 40.0]  # geomspace of one point would have given its start, 1
    pts = probe_points(400, 5)
    assert pts[0] == 0.0 and pts[1] == 10.0 and abs(pts[-1] - 400) < 1e-9 and pts == sorted(pts)
    assert probe_points(40, 1) == [0.0]


@pytest.mark.parametrize("args, match", [
    (["--budget", "inf"], "finite number of backprops"),   # would train forever
    (["--budget", "nan"], "finite number of backprops"),   # would train nothing
    (["--optimizers", ","], "name at least one optimizer"),  # would leave an empty folder
])
def test_demo_refuses_a_budget_or_optimizer_list_that_cannot_run(tmp_path, args, match):
    out = tmp_path / "x"
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), *args])
    assert res.exit_code == 2 and match in res.output and not out.exists()
