"""`geomprobe report`, `compare` and `export` through click's runner, bad input included, and one real process."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from report_runs import make_run

from geomprobe.cli.main import cli
from geomprobe.runs.writer import RunWriter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_runs")
    return {"sgd": make_run(root / "sgd", "sgd"), "adam": make_run(root / "adam", "adam")}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *fragments: str, code: int = 1) -> None:
    """Exit ``code``, no traceback, one ``Error:`` line on stderr naming every fragment, nothing on stdout."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ------------------------------------------------------------------------------------ report


def test_report_prints_the_tables_on_stdout(runs):
    result = invoke("report", runs["sgd"], "--per-layer")
    assert result.exit_code == 0, result.output
    for part in ("SGD", "momentum=0.9", "R_med", "Per block", "2.weight", "Edge of stability crossed at step 300",
                 "Cost:"):
        assert part in result.stdout, part
    assert result.stderr == ""


def test_report_json_is_one_document_on_stdout(runs):
    result = invoke("report", runs["adam"], "--json", "--per-layer")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["header"]["optimizer"] == "Adam" and "blocks" in doc
    assert doc["trajectory"]["edge_of_stability"]["rule"] == "adam"


def test_report_png_is_written_and_refused_when_it_exists(tmp_path, runs):
    png = tmp_path / "sgd.png"
    result = invoke("report", runs["sgd"], "--png", png, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["figure"] == str(png) and "wrote figure" in result.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    before = png.read_bytes()
    assert_one_line_error(invoke("report", runs["sgd"], "--png", png), "already exists", "--force")
    assert png.read_bytes() == before


def test_report_bad_runs_get_one_line(tmp_path):
    assert_one_line_error(invoke("report", tmp_path / "missing"), "does not exist")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "notes.txt").write_text("hello")
    assert_one_line_error(invoke("report", tmp_path / "notarun"), "is not a geomprobe run", "meta.json")
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(invoke("report", tmp_path / "afile"), "is a file")


def test_report_refuses_a_corrupt_middle_line_and_leaves_the_run_alone(tmp_path):
    run = make_run(tmp_path / "run", "sgd")
    lines = (run / "records.jsonl").read_bytes().split(b"\n")
    lines[2] = lines[2][: len(lines[2]) // 2]
    (run / "records.jsonl").write_bytes(b"\n".join(lines))
    before = snapshot(run)
    assert_one_line_error(invoke("report", run, "--json"), "line 3")
    assert snapshot(run) == before


def test_report_of_a_truncated_last_line_works(tmp_path):
    run = make_run(tmp_path / "run", "sgd")
    with open(run / "records.jsonl", "ab") as f:
        f.write(b'{"step": 600, "lo')
    before = snapshot(run)
    result = invoke("report", run, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["probes"] == 6
    assert snapshot(run) == before


def test_usage_errors_exit_2():
    assert invoke("report").exit_code == 2
    assert invoke("report", "x", "--bogus").exit_code == 2


# ------------------------------------------------------------------------------------ compare


def test_compare_tables_and_json(runs):
    result = invoke("compare", runs["sgd"], runs["adam"], "--metric", "rmed.rmed")
    assert result.exit_code == 0, result.output
    assert "sgd (SGD)" in result.stdout and "adam (Adam)" in result.stdout and "170" in result.stdout
    result = invoke("compare", runs["sgd"], runs["adam"], "--by", "loss", "--metric", "rmed", "--json")
    doc = json.loads(result.stdout)
    assert doc["by"] == "loss" and set(doc["metrics"]) == {"rmed.rmed", "rmed.rmed_q99"}
    assert len(doc["axis"]) == 8 and set(doc["steps_at"]) == {"sgd", "adam"}


def test_compare_bad_input(tmp_path, runs):
    result = invoke("compare", runs["sgd"])
    assert result.exit_code == 2 and "at least two runs" in result.stderr
    assert invoke("compare", runs["sgd"], runs["adam"], "--by", "time").exit_code == 2
    assert_one_line_error(invoke("compare", runs["sgd"], runs["adam"], "--metric", "nope"), "'nope'", "rmed")
    assert_one_line_error(invoke("compare", runs["sgd"], tmp_path / "gone"), "does not exist")


# ------------------------------------------------------------------------------------ export


def test_export_csv_and_refusals(tmp_path, runs):
    out = tmp_path / "sgd.csv"
    result = invoke("export", runs["sgd"], "--csv", out)
    assert result.exit_code == 0 and "wrote 6 records" in result.stderr and result.stdout == ""
    rows = out.read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("step,") and "rmed.rmed" in rows[0]
    out.write_text("mine")
    assert_one_line_error(invoke("export", runs["sgd"], "--csv", out), "already exists", "--force")
    assert out.read_text() == "mine"
    assert invoke("export", runs["sgd"], "--csv", out, "--force").exit_code == 0
    assert out.read_text().startswith("step,")
    assert_one_line_error(invoke("export", runs["sgd"], "--csv", tmp_path / "no" / "x.csv"), "does not exist")


def test_export_to_stdout_and_never_onto_the_run(tmp_path):
    run = make_run(tmp_path / "run", "sgd")
    before = snapshot(run)
    result = invoke("export", run, "--csv", "-")
    assert result.exit_code == 0 and result.stdout.startswith("step,") and len(result.stdout.splitlines()) == 7
    assert_one_line_error(invoke("export", run, "--csv", run / "records.jsonl", "--force"), "part of run")
    assert_one_line_error(invoke("report", run, "--png", run / "meta.json", "--force"), "part of run")
    assert snapshot(run) == before


def test_export_needs_exactly_one_format(runs, tmp_path):
    assert invoke("export", runs["sgd"]).exit_code == 2
    assert invoke("export", runs["sgd"], "--csv", tmp_path / "a", "--parquet", tmp_path / "b").exit_code == 2


def test_export_parquet(tmp_path, runs):
    out = tmp_path / "sgd.parquet"
    result = invoke("export", runs["sgd"], "--parquet", out)
    if importlib.util.find_spec("pyarrow") is None:
        assert_one_line_error(result, "needs pyarrow", "pip install pyarrow", "--csv")
        assert not out.exists()
    else:
        import pandas as pd

        assert result.exit_code == 0, result.output
        assert len(pd.read_parquet(out)) == 6


def test_empty_run_reports_and_exports(tmp_path):
    RunWriter(tmp_path / "empty", {"model": "MLP"}).close()
    result = invoke("report", tmp_path / "empty")
    assert result.exit_code == 0 and "No probes recorded yet" in result.stdout


# ------------------------------------------------------------------------------------ the installed script


def test_installed_script_prints_json(runs):
    exe = shutil.which("geomprobe")
    command = [exe] if exe else [sys.executable, "-c", "from geomprobe.cli.main import main; main()"]
    done = subprocess.run(command + ["report", str(runs["sgd"]), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["probes"] == 6 and doc["trajectory"]["edge_of_stability"]["first_step"] == 300
