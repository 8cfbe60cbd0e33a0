"""docs/metrics.md explains every statistic; `geomprobe explain` prints it, also from an installed package;
the repository's pointers into it resolve; reports point at it."""

import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from geomprobe.cli.main import cli
from geomprobe.metrics import registry
from geomprobe.report.explain import doc_text, explain_command, section, sections, summary

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("**Definition.**", "**How it is estimated.**", "**Error.**", "**Cost.**", "**How to read it.**",
         "**Source.**")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.mark.parametrize("name", sorted(registry.REGISTRY) + ["smoothness", "edge_of_stability"])
def test_every_metric_and_trajectory_analysis_has_each_part(name):
    text = section(name)
    positions = [text.find(p) for p in PARTS]
    assert all(p > 0 for p in positions) and positions == sorted(positions), name


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_defaults_the_doc_cites_are_the_metrics_real_defaults(name):
    # `option=number` in a metric's section must be that option's default, so the doc cannot drift from the code
    params = inspect.signature(registry.get(name).fn).parameters
    cited = re.findall(r"`([a-z_0-9]+)=([-+0-9.e]+)`", section(name))
    checked = 0
    for key, value in cited:
        if key in params:
            assert math.isclose(float(value), float(params[key].default)), f"{name}: {key}={value}"
            checked += 1
    assert checked >= 1 or name in ("precond",), f"{name} cites no default"


def test_the_cost_of_each_default_budget_is_stated():
    assert "800 by default" in section("density")  # n_v x m = 10 x 80
    assert "`hvps=96` HVPs" in section("trace") and "`hvps=1024`" in section("rmed")
    assert "at most `min(d, max_iter)`" in section("spectrum") and "300" in section("spectrum")
    p = inspect.signature(registry.get("density").fn).parameters
    assert p["n_v"].default * p["m"].default == 800


def test_every_pointer_into_the_doc_resolves_and_no_spec_citation_is_left():
    anchors, stale = set(), []
    for folder in ("geomprobe", "cli", "tests", "examples", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            anchors |= set(re.findall(r"docs/metrics\.md#([a-z_0-9]+)", text))
            if re.search(r"SPEC(\.md)? §", text):
                stale.append(str(path))
    assert not stale, f"citations of the unshipped spec file left: {stale}"
    assert anchors and anchors <= set(sections()), sorted(anchors - set(sections()))


def test_explain_lists_every_section_and_prints_one_with_its_options():
    listing = run("explain")
    assert listing.exit_code == 0
    for name in sections():
        assert name in listing.stdout
    rmed = run("explain", "rmed")
    assert rmed.exit_code == 0
    assert "R_med = max_i |h_i| / median_i |h_i|" in rmed.stdout and "Source." in rmed.stdout
    assert "Options: --metric rmed:key=value" in rmed.stdout and "hvps" in rmed.stdout and "1024" in rmed.stdout
    assert "docs/metrics.md#rmed" in rmed.stdout
    assert f"cost per probe: {registry.get('rmed').cost}" in " ".join(rmed.stdout.split())
    assert "needs besides the model and probe data: optimizer" in run("explain", "precond").stdout
    assert not any(line != line.rstrip() for line in rmed.stdout.splitlines())  # piped: no padding
    assert "Options" not in run("explain", "smoothness").stdout  # not a metric: no --metric options


def test_explain_of_an_unknown_name_is_one_line_with_close_matches():
    result = run("explain", "rmd")
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no explanation of 'rmd'" in lines[0] and "did you mean rmed" in lines[0]


def test_summaries_and_report_pointer():
    assert summary("diagshare").startswith("The diagonal mass share")
    assert explain_command(["loss", "spectrum", "spectrum", "rmed"]) == (
        "What these mean: geomprobe explain NAME for spectrum, rmed (docs/metrics.md)")
    assert explain_command(["loss", "grad_norm"]) == ""

    from geomprobe.report.tables import report_text
    from geomprobe.runs import RunWriter

    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"explain-report-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    with RunWriter(run_dir, {"model": "MLP"}) as w:
        for s in range(3):
            w.append({"step": s, "loss": 1.0 / (s + 1), "spectrum": {"lambda_max": 1.0 + s}})
    try:
        assert "geomprobe explain NAME for spectrum (docs/metrics.md)" in report_text(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_the_installed_package_carries_the_doc(tmp_path):
    # Build a wheel from a copy of the sources, unpack it as an installer would, and run `explain` from a folder
    # with no checkout in reach: the text must come from the package itself.
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("geomprobe", "cli", "docs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, cwd=src)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("geomprobe-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert "geomprobe/docs/metrics.md" in z.namelist()
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "NO_COLOR": "1"}
    code = ("import geomprobe, sys; print(geomprobe.__file__, file=sys.stderr); "
            "from geomprobe.cli.main import cli; cli(['explain', 'trace'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().startswith(str(site))  # the unpacked wheel, not the checkout
    assert "The trace of the Hessian" in out.stdout and "Hutch++" in out.stdout
    assert section("trace").splitlines()[2] in doc_text()
