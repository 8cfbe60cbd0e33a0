"""geomprobe.report from Python: sparklines, summaries, findings, tables, comparisons and figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from report_runs import make_run

from geomprobe.errors import ConfigurationError
from geomprobe.report import (
    build_report,
    collect_series,
    compare_runs,
    findings,
    plot_run,
    report_text,
    sparkline,
    summarize,
)
from geomprobe.runs.reader import RunReader
from geomprobe.runs.writer import RunWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"sgd": make_run(root / "sgd", "sgd"), "adam": make_run(root / "adam", "adam")}


# ------------------------------------------------------------------------------------ sparklines, summaries


def test_sparkline_scales_marks_gaps_and_bins():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, None, math.nan, 2.0, -math.inf]) == "▁··█↓"
    assert sparkline([]) == "" and sparkline([math.nan]) == "·"
    assert len(sparkline(range(100), width=10)) == 10
    # A ratio growing over four decades reads as steady growth on the log scale, not a late jump.
    assert sparkline([1, 10, 100, 1000, 10000]) == "▁▃▅▆█"
    assert sparkline([1, 10, 100, 1000, 10000], log=False) == "▁▁▁▂█"


def test_generic_metric_gives_every_numeric_leaf_with_its_error():
    records = [{"step": s, "mystery": {"a": float(s), "a_err": 0.1, "nested": {"b": 2.0 * s}, "flag": True,
                                       "label": "x", "hvps": 5, "top": [1, 2], "blocks": {"w": {"a": 1.0}}}}
               for s in range(3)]
    series = collect_series(records)
    assert list(series) == ["mystery.a", "mystery.nested.b"]
    np.testing.assert_array_equal(series["mystery.a"].errors, [0.1, 0.1, 0.1])
    assert series["mystery.nested.b"].errors is None


def test_summary_is_nan_safe_and_names_the_trend():
    records = [{"step": s, "rmed": {"rmed": v, "rmed_err": None}}
               for s, v in enumerate([float("nan"), 5.0, 7.0, None, 20.0, 40.0, 60.0])]
    s = summarize(collect_series(records)["rmed.rmed"])
    assert (s["first"], s["first_step"], s["last"], s["min"], s["max_step"]) == (5.0, 1, 60.0, 5.0, 6)
    assert s["direction"] == "rising" and s["ratio"] == 12.0 and s["first_err"] is None
    four = summarize(collect_series(records[:-1])["rmed.rmed"])   # 4 finite values: too few to name a trend
    assert four["direction"] is None and four["last"] == 40.0
    flat = summarize(collect_series([{"step": i, "loss": 1.0 + 0.01 * i} for i in range(5)])["loss"])
    assert flat["direction"] == "flat"


# ------------------------------------------------------------------------------------ the report


def test_report_document_is_strict_json_with_findings(runs):
    doc = build_report(runs["sgd"], per_layer=True)
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN tokens anywhere
    assert doc["probes"] == 6 and doc["steps"] == [0, 500]
    assert doc["header"]["optimizer"] == "SGD" and doc["header"]["blocks"] == 2
    assert doc["metrics"]["rmed.rmed"]["headline"] and not doc["metrics"]["rmed.max"]["headline"]
    assert doc["metrics"]["spectrum.lambda_max"]["last_err"] == pytest.approx(0.7)
    assert set(doc["blocks"]) == {"0.weight", "2.weight"}
    kinds = {f["kind"]: f for f in doc["findings"]}
    assert {"failures", "unconverged", "edge_of_stability", "saddle", "noise", "rmed", "diagshare",
            "smoothness"} <= set(kinds)
    # SGD lr 0.1, momentum 0.9: threshold 38; lambda_max = 10 + 12 t passes it at step 300.
    assert doc["trajectory"]["edge_of_stability"]["first_step"] == 300
    assert "step 300" in kinds["edge_of_stability"]["text"]
    assert "step(s) 200" in kinds["saddle"]["text"]
    assert doc["cost"]["hvps"] == 6 * 432


def test_findings_word_heavy_tails_and_heterogeneity_apart(runs):
    reader = RunReader(runs["sgd"])
    texts = [f.text for f in findings(reader.records, reader.meta) if f.kind == "noise"]
    assert any(t.startswith("Heavy-tailed gradient noise") for t in texts)
    assert any(t.startswith("Scale heterogeneity at 6 of 6") for t in texts)
    levels = [f.level for f in findings(reader.records, reader.meta)]
    assert levels == sorted(levels, key=["warning", "note", "info"].index)  # warnings first


def test_report_text_has_header_rows_blocks_findings_and_cost(runs):
    text = report_text(runs["adam"], per_layer=True)
    for part in ("Sequential", "336 parameters", "Adam", "betas=[0.9, 0.999]", "mode eval", "R_med",
                 "λ_max(P½HP½)", "0.weight", "Findings", "lowers R_med", "Cost: 2,592 HVPs"):
        assert part in text, part


def test_report_of_a_run_with_a_truncated_last_line(tmp_path):
    run = make_run(tmp_path / "run", "sgd")
    with open(run / "records.jsonl", "ab") as f:
        f.write(b'{"step": 600, "loss": 0.0')  # a crash mid-write
    assert build_report(run)["probes"] == 6


def test_report_of_an_empty_run(tmp_path):
    RunWriter(tmp_path / "empty", {"model": "MLP"}).close()
    assert "No probes recorded yet" in report_text(tmp_path / "empty")
    assert build_report(tmp_path / "empty")["trajectory"]["smoothness"]["error"].startswith("too few")


# ------------------------------------------------------------------------------------ comparisons


def test_compare_by_step_puts_sgd_and_adam_side_by_side(runs):
    cmp = compare_runs([runs["sgd"], runs["adam"]], metrics=["rmed.rmed"])
    assert cmp.runs == ["sgd", "adam"] and not cmp.interpolated
    np.testing.assert_array_equal(cmp.axis, [0, 100, 200, 300, 400, 500])
    np.testing.assert_allclose(cmp.values["rmed.rmed"], [[20, 50, 80, 110, 140, 170], [8, 8.5, 9, 9.5, 10, 10.5]])
    assert cmp.to_dict()["metrics"]["rmed.rmed"]["values"]["adam"][0] == 8


def test_compare_interpolates_when_no_step_is_shared(tmp_path):
    a = make_run(tmp_path / "a", "sgd", range(0, 600, 100))
    b = make_run(tmp_path / "b", "sgd", range(50, 650, 100))
    cmp = compare_runs([a, b], metrics=["rmed.rmed"])
    assert cmp.interpolated and list(cmp.axis) == [100, 200, 300, 400, 500]
    np.testing.assert_allclose(cmp.values["rmed.rmed"][1], [50, 80, 110, 140, 170])  # linear in step: exact


def test_compare_by_loss_interpolates_at_the_first_passage(tmp_path):
    def write(name, losses, values):
        with RunWriter(tmp_path / name, {"optimizer": name}) as w:
            for s, (loss, v) in enumerate(zip(losses, values)):
                w.append({"step": 10 * s, "loss": loss, "rmed": {"rmed": v}})
        return tmp_path / name
    # Run b's loss goes back up after reaching 0.5: the first passage counts, not the later one.
    a = write("a", [1.0, 0.5, 0.25], [10.0, 20.0, 30.0])
    b = write("b", [2.0, 1.0, 0.5, 0.8, 0.25], [1.0, 2.0, 3.0, 99.0, 5.0])
    cmp = compare_runs([a, b], by="loss", metrics=["rmed"], levels=3)
    np.testing.assert_allclose(cmp.axis, [1.0, 0.5, 0.25])
    np.testing.assert_allclose(cmp.values["rmed.rmed"], [[10, 20, 30], [2, 3, 5]])
    np.testing.assert_allclose(cmp.steps_at, [[0, 10, 20], [10, 20, 40]])
    mid = compare_runs([a, b], by="loss", metrics=["rmed"], levels=5)   # 0.7071 lies between probes
    level = mid.axis[1]
    w = (1.0 - level) / (1.0 - 0.5)
    assert mid.values["rmed.rmed"][0][1] == pytest.approx(10 + w * 10)


def test_compare_errors_are_clear(tmp_path, runs):
    with pytest.raises(ConfigurationError, match="metric 'nope' is in none of the runs"):
        compare_runs([runs["sgd"], runs["adam"]], metrics=["nope"])
    with RunWriter(tmp_path / "low", {}) as w:
        for s, loss in enumerate([0.01, 0.005, 0.001]):
            w.append({"step": s, "loss": loss})
    with pytest.raises(ConfigurationError, match="loss ranges do not overlap"):
        compare_runs([runs["sgd"], tmp_path / "low"], by="loss")


# ------------------------------------------------------------------------------------ figures, imports


def test_png_is_written_and_valid_and_not_overwritten(tmp_path, runs):
    target = plot_run(runs["adam"], tmp_path / "adam.png")
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    from matplotlib.image import imread

    height, width, _ = imread(target).shape
    assert height > 300 and width > 300
    with pytest.raises(ConfigurationError, match="already exists"):
        plot_run(runs["adam"], target)
    assert target.read_bytes() == data
    plot_run(runs["adam"], target, metrics=["loss", "rmed.rmed"], overwrite=True)
    assert target.read_bytes() != data and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ConfigurationError, match="no value named rmed.nope"):
        plot_run(runs["adam"], tmp_path / "other.png", metrics=["rmed.nope"])


def test_importing_the_report_does_not_import_matplotlib():
    code = "import sys, geomprobe, geomprobe.report, geomprobe.trajectory; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["geomprobe.report", "geomprobe.trajectory", "geomprobe.trajectory.edge_of_stability"])
def test_public_names_are_unique_public_and_importable(name):
    module = __import__(name, fromlist=["__all__"])
    assert len(module.__all__) == len(set(module.__all__))
    for public in module.__all__:
        assert not public.startswith("_") and hasattr(module, public), public


def test_brackets_in_names_are_printed_literally(tmp_path):
    """Run folders and metric names are text, not rich markup."""
    for name in ("a[1]", "b[bold]"):
        with RunWriter(tmp_path / name, {"model": "[red]MLP"}) as w:
            for s in range(3):
                w.append({"step": s, "loss": 1.0 - 0.1 * s, "custom[x]": {"v[0]": float(s)}})
    assert "[red]MLP" in report_text(tmp_path / "a[1]") and "custom[x].v[0]" in report_text(tmp_path / "a[1]")
    from io import StringIO

    from rich.console import Console

    from geomprobe.report import render_comparison

    buf = StringIO()
    render_comparison(compare_runs([tmp_path / "a[1]", tmp_path / "b[bold]"]), Console(file=buf, width=100))
    assert "a[1]" in buf.getvalue() and "b[bold]" in buf.getvalue() and "(custom[x].v[0])" in buf.getvalue()


def test_compare_reaches_per_block_values_whose_names_hold_dots(tmp_path):
    for name, scale in (("sgd", 1.0), ("adam", 0.5)):
        with RunWriter(tmp_path / name, {"optimizer": name}) as w:
            for s in range(0, 30, 10):
                w.append({"step": s, "loss": 1.0 / (1 + s), "rmed": {
                    "rmed": 10.0, "blocks": {"layer1.0.weight": {"rmed": scale * (5.0 + s)},
                                             "fc.bias": {"rmed": 2.0}}}})
    cmp = compare_runs([tmp_path / "sgd", tmp_path / "adam"], metrics=["rmed[layer1.0.weight]"])
    assert cmp.paths == ["rmed[layer1.0.weight].rmed"]
    assert cmp.values["rmed[layer1.0.weight].rmed"].tolist() == [[5.0, 15.0, 25.0], [2.5, 7.5, 12.5]]
    assert "[layer1.0.weight]" in cmp.labels["rmed[layer1.0.weight].rmed"]
    # the metric named alone stays the whole-model rows
    assert compare_runs([tmp_path / "sgd", tmp_path / "adam"], metrics=["rmed"]).paths == ["rmed.rmed"]
    with pytest.raises(ConfigurationError, match=r"rmed\[layer1.weight\]"):
        compare_runs([tmp_path / "sgd"], metrics=["rmed[nope]"])


def test_runs_a_report_cannot_place_get_a_message_not_a_traceback(tmp_path):
    # every probe failed (nothing to plot), and records whose step is not an integer (written by hand)
    from click.testing import CliRunner

    from geomprobe.cli.main import cli
    from geomprobe.runs import RunWriter

    with RunWriter(tmp_path / "failed", {"model": "MLP"}) as w:
        for s in (0, 10, 20):
            w.append({"step": s, "errors": {"landscape": "OutOfMemory: x"}, "cost": {"hvps": 0, "seconds": 0.1}})
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "failed"), "--png", str(tmp_path / "f.png")])
    assert res.exit_code == 1 and "every one of its 3 probes failed" in res.output and "Traceback" not in res.output
    with RunWriter(tmp_path / "odd", {"model": "MLP"}) as w:
        w.append({"step": "a", "loss": 1.0})
        w.append({"step": 3, "loss": 0.5, "grad_norm": 1.0})
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "odd")])
    assert res.exit_code == 0 and "1 record(s) without an integer step left out" in res.output
