"""What the commands print on a pipe: no wrapped commands, no trailing spaces, whole per-block cells; and
`compare --png` with its warnings about runs probed differently (CliRunner and the installed script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from report_runs import BLOCKS, make_run

from geomprobe.cli.main import cli
from geomprobe.runs.writer import RunWriter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    out = {"sgd": make_run(root / "sgd", "sgd"), "adam": make_run(root / "adam", "adam")}
    # the same run, probed in train mode on other data: not comparable value for value
    meta = json.loads((out["adam"] / "meta.json").read_text())
    records = [json.loads(line) for line in (out["adam"] / "records.jsonl").read_text().splitlines()]
    meta["probe"] |= {"mode": "train", "data": {"source": "loader", "samples": 64}}
    with RunWriter(root / "adam-train", {k: v for k, v in meta.items() if k not in (
            "schema_version", "geomprobe_version", "torch_version", "numpy_version", "python_version", "created",
            "created_unix")}) as w:
        for r in records:
            w.append(r)
    out["adam-train"] = root / "adam-train"
    return out


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_no_trailing_spaces(text: str) -> None:
    bad = [line for line in text.splitlines() if line != line.rstrip(" ")]
    assert not bad, f"{len(bad)} line(s) end in spaces, e.g. {bad[0]!r}"


def test_piped_report_has_no_trailing_spaces_and_unwrapped_findings(runs):
    result = invoke("report", runs["sgd"], "--per-layer")
    assert result.exit_code == 0, result.output
    assert_no_trailing_spaces(result.stdout)
    long = [line for line in result.stdout.splitlines() if len(line) > 120]
    assert long, "findings longer than a terminal stay on one line on a pipe"


def test_per_block_cells_do_not_wrap(runs):
    out = invoke("report", runs["sgd"], "--per-layer").stdout
    table = out[out.index("Per block"):]
    for block in BLOCKS:
        rows = [line for line in table.splitlines() if f" {block['name']} " in line]
        assert rows, block["name"]
        for row in rows:  # the block's value cells on its own line: first, last and a trend or sparkline
            assert row.count("±") >= 2 or sum(c.isdigit() for c in row) >= 4, row


def test_a_long_message_is_one_line_on_a_piped_stderr(runs, tmp_path):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4)
    deep.mkdir()
    png = deep / "report.png"
    result = invoke("report", runs["sgd"], "--png", png)
    assert result.exit_code == 0, result.output
    assert f"wrote figure {png}" in result.stderr.splitlines()
    assert_no_trailing_spaces(result.stderr)


def test_compare_png_and_no_warning_for_runs_probed_alike(runs, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    png = tmp_path / "cmp.png"
    result = invoke("compare", runs["sgd"], runs["adam"], "--metric", "rmed", "--png", png)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr and f"wrote figure {png}" in result.stderr
    with Image.open(png) as image:
        assert image.size[0] > 100 and image.text["Description"] == "all values shown"
    again = invoke("compare", runs["sgd"], runs["adam"], "--png", png)
    assert again.exit_code == 1 and "already exists" in again.stderr and again.stdout == ""
    assert invoke("compare", runs["sgd"], runs["adam"], "--png", png, "--force").exit_code == 0


def test_compare_warns_when_runs_were_probed_differently(runs, tmp_path):
    result = invoke("compare", runs["sgd"], runs["adam-train"], "--metric", "rmed", "--png", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("different probe modes (sgd: eval, adam-train: train)" in w for w in warnings), result.stderr
    assert any("different probe data" in w for w in warnings)
    Image = pytest.importorskip("PIL.Image")
    with Image.open(tmp_path / "c.png") as image:  # the figure carries the warnings under its panels
        assert "warning: the runs used different probe modes" in image.text["Description"]
    doc = json.loads(invoke("compare", runs["sgd"], runs["adam-train"], "--json").stdout)
    assert len(doc["warnings"]) == 2


def test_installed_script_on_a_pipe(runs):
    exe = shutil.which("geomprobe")
    if exe is None:
        pytest.skip("the geomprobe console script is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    report = subprocess.run([exe, "report", str(runs["sgd"]), "--per-layer"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert report.returncode == 0, report.stderr
    assert_no_trailing_spaces(report.stdout)
    assert max(len(line) for line in report.stdout.splitlines()) > 80  # COLUMNS does not wrap a pipe
    cmp = subprocess.run([exe, "compare", str(runs["sgd"]), str(runs["adam-train"]), "--metric", "rmed"],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert cmp.returncode == 0 and "warning: the runs used different probe modes" in cmp.stderr
    assert all(len(line) > 80 for line in cmp.stderr.splitlines() if line.startswith("warning:"))
    assert_no_trailing_spaces(cmp.stdout)


def test_compare_titles_stay_whole_and_unresolved_cells_are_marked(tmp_path):
    for name, err in (("a", 0.1), ("b", 30.0)):
        with RunWriter(tmp_path / name, {"model": "MLP", "optimizer": "SGD"}) as w:
            for s in range(4):
                w.append({"step": s, "loss": 1.0 / (s + 1), "rmed": {"rmed": 10.0 + s, "rmed_err": err}})
    result = invoke("compare", tmp_path / "a", tmp_path / "b", "--by", "loss", "--metric", "rmed.rmed")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Step at which each run first reached the loss (interpolated)" in lines
    assert "R_med (rmed.rmed) by loss (interpolated)" in lines
    rows = [line.split() for line in lines if line.strip().startswith(("1 ", "0."))]
    marked = [r for r in rows if len(r) == 4]  # loss, run a's value, run b's value, b's "?"
    assert marked and all(r[-1] == "?" and "?" not in r[1] for r in marked), rows
    assert any(line.startswith("? unresolved") for line in lines)
    doc = json.loads(invoke("compare", tmp_path / "a", tmp_path / "b", "--json").stdout)
    assert doc["metrics"]["rmed.rmed"] and doc["errors"]["rmed.rmed"]["b"][0] == 30.0
    Image = pytest.importorskip("PIL.Image")
    assert invoke("compare", tmp_path / "a", tmp_path / "b", "--png", tmp_path / "ab.png").exit_code == 0
    with Image.open(tmp_path / "ab.png") as image:
        assert "hollow: unresolved, error above 50 % of the value" in image.text["Description"]
    assert_no_trailing_spaces(result.stdout)


def test_the_demo_suggests_whole_commands_on_a_pipe(tmp_path):
    out = tmp_path / ("a-long-folder-name-for-the-demo-runs-" * 2)
    result = invoke("demo", "--out", out, "--budget", "40", "--probes", "2")
    assert result.exit_code == 0, result.output
    nxt = [line for line in result.stderr.splitlines() if line.startswith("Runs written to")]
    assert len(nxt) == 1 and len(nxt[0]) > 160, result.stderr  # one line however long, not wrapped at 80
    assert f"geomprobe compare {out}/sgdm {out}/adam {out}/tr-rmsprop --by step" in nxt[0]
    assert_no_trailing_spaces(result.stdout)
    assert_no_trailing_spaces(result.stderr)
