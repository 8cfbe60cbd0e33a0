"""`geomprobe view line|plane|interpolate|trajectory`: each writes a readable run and draws its figure; every bad
input is one line with exit code 1 (2 for click's own usage errors), before anything is written."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from probe_specs import TinyNet, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from test_cli_probe import error_line, save_training_checkpoints

from geomprobe.cli.main import cli
from geomprobe.report import view_entries
from geomprobe.runs.reader import RunReader

SPEC = "probe_specs:mlp_spec"


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return save_training_checkpoints(tmp_path_factory.mktemp("ckpts"), steps=(10, 20, 30, 40))


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_line_writes_a_run_and_its_figure(tmp_path, ckpts):
    out = tmp_path / "line"
    result = run("view", "line", ckpts[0], ckpts[1], "--spec", SPEC, "--out", out, "--points", "9", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [v["step"] for v in doc["views"]] == [10, 20] and doc["figure"] == str(out / "views.png")
    assert is_png(out / "views.png")
    (step, key, view), _ = view_entries(out)
    assert (step, key) == (10, "view_line") and len(view["t"]) == 9
    assert view["loss"][4] == pytest.approx(RunReader(out).records[0]["loss"], rel=1e-6)
    assert RunReader(out).meta["view"] == "line"


def test_line_along_the_update_uses_the_previous_checkpoint(tmp_path, ckpts):
    out = tmp_path / "update"
    result = run("view", "line", *ckpts[:3], "--spec", SPEC, "--out", out, "--direction", "update", "--points", "3",
                 "--span", "-1", "0", "--json")
    assert result.exit_code == 0, result.output
    entries = view_entries(out)
    assert [s for s, _, _ in entries] == [20, 30]  # the first checkpoint only starts the first step
    a, b = torch.load(ckpts[0])["model"], torch.load(ckpts[1])["model"]
    step = torch.cat([(b[k] - a[k]).reshape(-1) for k in b])
    assert entries[0][2]["norm"] == pytest.approx(float(step.norm()), rel=1e-5)
    # t = -1 along the step is the previous checkpoint: its loss is the previous record's
    assert entries[1][2]["loss"][0] == pytest.approx(entries[0][2]["loss"][-1], rel=1e-5)


def test_plane_draws_a_contour_from_sidecar_grids(tmp_path, ckpts):
    out = tmp_path / "plane"
    png = tmp_path / "plane.png"
    result = run("view", "plane", ckpts[-1], "--spec", SPEC, "--out", out, "--png", png, "--points", "9",
                 "--u", "top", "--v", "random")
    assert result.exit_code == 0, result.output
    assert is_png(png) and any((out / "arrays").iterdir())
    _, key, view = view_entries(out)[0]
    assert key == "view_plane" and view["loss"].shape == (9, 9) and np.isfinite(view["loss"]).all()
    report = run("report", out, "--png", tmp_path / "report.png")
    assert report.exit_code == 0, report.output
    assert is_png(tmp_path / "report.png")  # a run of views alone: they are its figure
    assert not (tmp_path / "report-views.png").exists()


def test_interpolate_and_trajectory_draw_their_figures(tmp_path, ckpts):
    out = tmp_path / "interp"
    result = run("view", "interpolate", *reversed(ckpts), "--spec", SPEC, "--out", out, "--points", "5", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["step"] for r in doc["views"]] == [10, 20, 30, 40]  # ordered by step, whatever the order given
    _, _, view = view_entries(out)[0]
    assert len(view["t"]) == 13 and view["ends"] == [view["loss"][i] for i in (0, 4, 8, 12)]
    assert is_png(out / "views.png")
    out = tmp_path / "traj"
    result = run("view", "trajectory", *ckpts, "--spec", SPEC, "--out", out, "--points", "7", "--json")
    assert result.exit_code == 0, result.output
    _, key, view = view_entries(out)[0]
    assert key == "view_trajectory" and np.shape(view["loss"]) == (7, 7) and "directions" not in view
    assert np.allclose(view["path"][-1], 0.0) and sum(view["explained"]) <= 1 + 1e-12
    assert is_png(out / "views.png")
    # a views-only run: report --png draws the views as its figure
    report = run("report", out, "--png", tmp_path / "t.png")
    assert report.exit_code == 0, report.output
    assert is_png(tmp_path / "t.png") and not (tmp_path / "t-views.png").exists()


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "wide-50.pt"
    torch.save(TinyNet(hidden=9).state_dict(), path)
    return path


@pytest.mark.parametrize("args, message", [
    (["line", "{0}", "--direction", "sideways"], "unknown direction 'sideways'"),
    (["line", "{0}", "--points", "1"], "points must be an integer >= 2"),
    (["line", "{0}", "--span", "1", "-1"], "lo < hi"),
    (["line", "{0}", "--direction", "update"], "needs two or more checkpoints"),
    (["line", "{0}", "--max-forwards", "5"], "needs 41 forward passes"),
    (["plane", "{0}", "--u", "gradient", "--v", "gradient"], "parallel"),
    (["interpolate", "{0}"], "at least 2 checkpoints"),
    (["trajectory", "{0}", "{1}"], "at least 3 checkpoints"),
    (["interpolate", "{0}", "{other}"], "shape"),
    (["line", "missing.pt"], "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, ckpts, other_arch, args, message):
    out = tmp_path / "run"
    args = [a.format(*ckpts, other=other_arch) for a in args]
    result = run("view", *args, "--spec", SPEC, "--out", out)
    assert result.exit_code == 1, result.output
    assert message in error_line(result)
    assert not out.exists() or not any(out.iterdir())


def test_an_existing_run_is_refused_without_force(tmp_path, ckpts):
    out = tmp_path / "run"
    assert run("view", "line", ckpts[0], "--spec", SPEC, "--out", out, "--points", "3").exit_code == 0
    again = run("view", "line", ckpts[0], "--spec", SPEC, "--out", out, "--points", "3")
    assert again.exit_code == 1 and "--force" in error_line(again)
    forced = run("view", "line", ckpts[0], "--spec", SPEC, "--out", out, "--points", "5", "--force")
    assert forced.exit_code == 0 and len(view_entries(out)[0][2]["t"]) == 5


def test_probe_runs_the_direction_metric_and_view_entries_on_checkpoints(tmp_path, ckpts):
    out = tmp_path / "probe"
    result = run("probe", *ckpts[:2], "--spec", SPEC, "--metric", "spectrum", "--metric", "direction",
                 "--metric", "view_line", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    records = RunReader(out).records
    for r in records:
        # checkpoints carry no optimizer step into the probe: the update's entries say so, the rest is measured
        assert r["direction"]["update_curvature"] is None and r["direction"]["grad_curvature"] > 0
        assert r["direction"]["lambda_max"] == pytest.approx(r["spectrum"]["lambda_max"], rel=1e-6)
        assert r["view_line"]["curvature"] == pytest.approx(r["spectrum"]["lambda_max"], rel=1e-2)
    assert len(view_entries(out)) == 2
