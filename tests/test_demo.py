"""The demo end to end at a reduced size: runs written, comparison printed, bad options refused."""

import json

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
