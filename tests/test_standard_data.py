"""records.jsonl is standard JSON that data-frame tools read with numeric columns (non-finite values as null,
named under "$nonfinite"); runs of schema version 1 still read; Parquet export keeps the floats."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from geomprobe.cli.main import cli
from geomprobe.runs.reader import RunReader
from geomprobe.runs.writer import RunWriter


def _run(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run, {"model": "MLP", "optimizer": "SGD"}) as w:
        w.append({"step": 0, "loss": 2.0, "spectrum": {"lambda_max": 5.0, "top": [5.0, 4.0]}})
        w.append({"step": 10, "loss": float("nan"), "spectrum": {"lambda_max": float("inf"), "top": [1.0, 0.5]}})
        w.append({"step": 20, "loss": 0.5, "spectrum": {"lambda_max": 3.0, "top": [3.0, float("-inf")]}})
    return run


def test_pandas_reads_numeric_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    run = _run(tmp_path)
    frame = pd.json_normalize([json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()])
    assert frame["loss"].dtype == np.float64 and frame["spectrum.lambda_max"].dtype == np.float64
    assert frame["loss"].tolist()[0] == 2.0 and math.isnan(frame["loss"].tolist()[1])
    direct = pd.read_json(run / "records.jsonl", lines=True)
    assert direct["loss"].dtype == np.float64 and direct["step"].tolist() == [0, 10, 20]


def test_polars_reads_numeric_columns(tmp_path):
    pl = pytest.importorskip("polars")
    frame = pl.read_ndjson(_run(tmp_path) / "records.jsonl")
    assert frame.schema["loss"] == pl.Float64
    spectrum = frame["spectrum"].struct.field("lambda_max")
    assert spectrum.dtype == pl.Float64 and spectrum.to_list() == [5.0, None, 3.0]
    assert frame["$nonfinite"].struct.field("/spectrum/lambda_max").to_list() == [None, "Infinity", None]


def test_duckdb_reads_numeric_columns(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    path = str(_run(tmp_path) / "records.jsonl").replace("'", "''")
    rel = duckdb.sql(f"SELECT step, loss, spectrum.lambda_max AS lmax FROM read_json_auto('{path}') ORDER BY step")
    assert [str(t) for t in rel.types] == ["BIGINT", "DOUBLE", "DOUBLE"]
    assert rel.fetchall() == [(0, 2.0, 5.0), (10, None, None), (20, 0.5, 3.0)]


def test_the_reader_restores_the_non_finite_values(tmp_path):
    records = RunReader(_run(tmp_path)).records
    assert math.isnan(records[1]["loss"]) and records[1]["spectrum"]["lambda_max"] == math.inf
    assert records[2]["spectrum"]["top"] == [3.0, -math.inf] and "$nonfinite" not in records[1]


def test_a_string_spelled_NaN_stays_a_string_in_new_runs(tmp_path):
    with RunWriter(tmp_path / "run", {}) as w:
        w.append({"step": 0, "note": "NaN", "x": None})
    record = RunReader(tmp_path / "run").records[0]
    assert record["note"] == "NaN" and record["x"] is None


def test_a_record_may_not_use_the_reserved_key(tmp_path):
    from geomprobe.errors import ConfigurationError

    with RunWriter(tmp_path / "run", {}) as w, pytest.raises(ConfigurationError, match=r"\$nonfinite"):
        w.append({"step": 0, "$nonfinite": {}})


def test_runs_of_schema_version_1_still_read(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"schema_version": 1, "model": "MLP", "lr": "NaN"}))
    (run / "records.jsonl").write_text(json.dumps({"step": 0, "loss": "NaN", "spectrum": {"lambda_max": "Infinity",
                                                                                        "top": [1.0, "-Infinity"]}})
                                       + "\n")
    reader = RunReader(run)
    record = reader.records[0]
    assert math.isnan(reader.meta["lr"]) and math.isnan(record["loss"])
    assert record["spectrum"]["lambda_max"] == math.inf and record["spectrum"]["top"] == [1.0, -math.inf]
    result = CliRunner().invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output


def test_export_parquet_keeps_numeric_columns_and_non_finite_values(tmp_path):
    if importlib.util.find_spec("pyarrow") is None:
        pytest.skip("pyarrow is not installed (pip install 'geomprobe[parquet]')")
    pd = pytest.importorskip("pandas")
    out = tmp_path / "run.parquet"
    result = CliRunner().invoke(cli, ["export", str(_run(tmp_path)), "--parquet", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert frame["loss"].dtype == np.float64 and frame["spectrum.lambda_max"].tolist()[1] == math.inf
    assert math.isnan(frame["loss"].tolist()[1]) and "$nonfinite" not in " ".join(frame.columns)


def test_installed_script_exports_numeric_tables(tmp_path):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    exe = shutil.which("geomprobe")
    if exe is None:
        pytest.skip("the geomprobe console script is not installed")
    run = _run(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([exe, "export", str(run), "--csv", "-"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    column = header.split(",").index("loss")
    assert [row.split(",")[column] for row in rows] == ["2.0", "nan", "0.5"]
    if importlib.util.find_spec("pyarrow") is not None:
        pd = pytest.importorskip("pandas")
        target = tmp_path / "run.parquet"
        done = subprocess.run([exe, "export", str(run), "--parquet", str(target)], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert pd.read_parquet(target)["spectrum.lambda_max"].dtype == np.float64
