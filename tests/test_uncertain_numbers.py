"""Values whose error exceeds half their size are marked unresolved in tables and figures; findings state
their evidence and are withheld below a minimum; blocks a table drops are listed; the PNG says when it shows
only some panels; the edge-of-stability rule is not fooled by a preconditioned sharpness on a falling loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from geomprobe.cli.main import cli
from geomprobe.report import build_report, report_text
from geomprobe.report._format import fmt_err, unresolved
from geomprobe.report.figures import MAX_PANELS, plot_run
from geomprobe.report.findings import MIN_TREND_POINTS, rank_interval
from geomprobe.runs.writer import RunWriter
from geomprobe.trajectory.edge_of_stability import edge_of_stability

ADAM = {"optimizer": "Adam", "optimizer_hparams": [{"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}]}


def write(tmp_path, records, meta=None, name="run"):
    with RunWriter(tmp_path / name, meta or {"model": "MLP", "optimizer": "SGD"}) as w:
        for r in records:
            w.append(r)
    return tmp_path / name


def test_the_threshold_is_half_the_value():
    assert unresolved(39.36, 75) and unresolved(4755, 3.4e5) and unresolved(-2.0, 1.01)
    assert not unresolved(2.0, 1.0) and not unresolved(2.0, None) and not unresolved(math.nan, 1.0)
    assert fmt_err(39.36, 75) == "39.36 ± 75 ?" and fmt_err(2.0, 0.5) == "2 ± 0.5"


def test_tables_mark_unresolved_values_and_explain_the_mark(tmp_path):
    run = write(tmp_path, [{"step": s, "loss": 1.0 / (s + 1), "rmed": {"rmed": v, "rmed_err": e}}
                           for s, (v, e) in enumerate([(12.0, 0.5), (20.0, 1.0), (39.36, 75.0)])])
    text = report_text(run)
    assert "39.36 ± 75 ?" in text and "12 ± 0.5 ?" not in text
    assert "? unresolved: the error exceeds 50 % of the value" in text
    assert build_report(run)["metrics"]["rmed.rmed"]["unresolved_steps"] == [2]
    clean = write(tmp_path, [{"step": s, "rmed": {"rmed": 10.0 + s, "rmed_err": 0.1}} for s in range(3)], name="ok")
    assert "? unresolved" not in report_text(clean) and " ?" not in report_text(clean)


def test_a_trend_from_three_points_is_withheld(tmp_path):
    run = write(tmp_path, [{"step": 10 * s, "loss": 1.0 - 0.1 * s, "grad_norm": 1.0 + s,
                            "spectrum": {"lambda_max": 2.0 + s},
                            "rmed": {"rmed": 10.0 + s, "rmed_err": 0.01}} for s in range(3)])
    texts = [f["text"] for f in build_report(run)["findings"]]
    rmed = next(t for t in texts if t.startswith("R_med"))
    assert "rose" not in rmed and "3 probes are too few for a rank correlation (at least 5)" in rmed
    smooth = next(t for t in texts if "smoothness" in t)
    assert "rank correlation" not in smooth.replace("too few for a rank correlation", "")
    assert not any("rank correlation with step 1" in t for t in texts)


def test_a_trend_from_enough_points_states_its_evidence(tmp_path):
    n = 8
    run = write(tmp_path, [{"step": 10 * s, "rmed": {"rmed": 10.0 + s, "rmed_err": 0.01}} for s in range(n)])
    rmed = next(f for f in build_report(run)["findings"] if f["kind"] == "rmed")
    lo, hi = rank_interval(1.0, n)
    assert rmed["level"] == "note" and "rose" in rmed["text"]
    assert f"over {n} probes (95 % interval" in rmed["text"] and 0.9 < lo < hi <= 1.0
    assert n >= MIN_TREND_POINTS


def test_unresolved_ends_claim_no_trend(tmp_path):
    run = write(tmp_path, [{"step": s, "rmed": {"rmed": 10.0 + s, "rmed_err": 0.1 if s < 7 else 40.0}}
                           for s in range(8)])
    rmed = next(f for f in build_report(run)["findings"] if f["kind"] == "rmed")
    assert rmed["level"] == "info" and "no trend is claimed" in rmed["text"] and "at 1 of 8 probes" in rmed["text"]


def test_rank_interval_covers_the_true_rank_correlation_at_its_rate():
    # bivariate normal with Pearson r: the population Spearman correlation is (6/π) asin(r/2)
    rng = np.random.default_rng(0)
    r, n, trials = 0.6, 20, 600
    truth = 6 / math.pi * math.asin(r / 2)
    hits = 0
    for _ in range(trials):
        x = rng.standard_normal(n)
        y = r * x + math.sqrt(1 - r * r) * rng.standard_normal(n)
        rho = float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])
        lo, hi = rank_interval(rho, n)
        hits += lo <= truth <= hi
    assert 0.92 <= hits / trials <= 0.985  # 95 % nominal; binomial sd at 600 trials is 0.009


def test_edge_of_stability_is_not_called_on_a_smoothly_falling_loss(tmp_path):
    # Adam whose preconditioned sharpness is ~2000x the threshold of 38/η while the loss falls at every probe
    records = [{"step": 100 * t, "loss": 2.0 * 0.8 ** t, "lr": [1e-3],
                "precond": {"lambda_max": 7.6e7 * (1 + 0.01 * t), "lambda_max_err": 1.0}} for t in range(10)]
    eos = edge_of_stability(records, ADAM)
    assert not eos.crossed and eos.contradicted == 10 and eos.peak_ratio > 1000
    run = write(tmp_path, records, {"model": "MLP", **ADAM})
    text = next(f["text"] for f in build_report(run)["findings"] if f["kind"] == "edge_of_stability")
    assert "crossed at" not in text and "No edge-of-stability crossing" in text and "while the loss kept falling" in text and "At 10 probe(s)" in text
    # the same sharpness with a loss that blows up is a crossing
    rising = [dict(r, loss=2.0 * 1.5 ** t) for t, r in enumerate(records)]
    assert edge_of_stability(rising, ADAM).crossed and edge_of_stability(rising, ADAM).contradicted == 0


def test_one_probe_above_the_threshold_is_too_little_for_a_crossing(tmp_path):
    meta = {"model": "MLP", "optimizer": "SGD", "optimizer_hparams": [{"lr": 0.1, "momentum": 0.0}]}
    records = [{"step": s, "loss": 1.0, "lr": [0.1], "spectrum": {"lambda_max": 25.0 if s == 3 else 10.0}}
               for s in range(6)]
    f = next(f for f in build_report(write(tmp_path, records, meta))["findings"] if f["kind"] == "edge_of_stability")
    assert f["level"] == "info" and "only 1 of 6 probes (step 3): too little to call a crossing" in f["text"]


def test_blocks_without_a_finite_value_are_listed(tmp_path):
    records = [{"step": s, "rmed": {"rmed": 5.0, "blocks": {"layer1.weight": {"rmed": 4.0 + s},
                                                            "layer1.bias": {"rmed": None}}}} for s in range(3)]
    run = write(tmp_path, records)
    doc = build_report(run, per_layer=True)
    assert doc["blocks_dropped"] == {"rmed.rmed": ["layer1.bias"]}
    result = CliRunner().invoke(cli, ["report", str(run), "--per-layer"])
    assert result.exit_code == 0 and "not shown, rmed.rmed never finite: layer1.bias" in result.output


def test_the_png_says_when_it_shows_only_some_panels(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    many = {f"v{i}": float(i + 1) for i in range(MAX_PANELS + 3)}
    run = write(tmp_path, [{"step": s, "rmed": {"rmed": 3.0, "rmed_err": 2.0}, "custom": dict(many)} for s in range(3)])
    with Image.open(plot_run(run, tmp_path / "run.png")) as image:
        note = image.text["Description"]
    assert f"of {MAX_PANELS + 4} values; not shown:" in note and "hollow: unresolved" in note
    few = write(tmp_path, [{"step": s, "rmed": {"rmed": 3.0, "rmed_err": 0.1}} for s in range(3)], name="few")
    with Image.open(plot_run(few, tmp_path / "few.png")) as image:
        assert image.text["Description"] == "all values shown"


def test_installed_script_marks_unresolved_values_on_a_pipe(tmp_path):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    exe = shutil.which("geomprobe")
    if exe is None:
        pytest.skip("the geomprobe console script is not installed")
    run = write(tmp_path, [{"step": s, "rmed": {"rmed": v, "rmed_err": e}}
                           for s, (v, e) in enumerate([(12.0, 0.5), (20.0, 1.0), (39.36, 75.0)])])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([exe, "report", str(run)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "39.36 ± 75 ?" in out.stdout and "? unresolved: the error exceeds 50 % of the value" in out.stdout
