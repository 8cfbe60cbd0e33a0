"""The run log: round trip, sidecar arrays, non-finite values, crash tolerance, refusing to touch existing runs."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import geomprobe.runs as runs
from geomprobe.errors import ConfigurationError
from geomprobe.runs.encoding import ARRAY_KEY, flatten_record
from geomprobe.runs.export import export_csv
from geomprobe.runs.files import SCHEMA_VERSION
from geomprobe.runs.reader import RunReader
from geomprobe.runs.writer import INLINE_MAX, RunWriter


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(line: str) -> dict:
    """Parse as strict JSON: NaN/Infinity tokens are refused, as other tools would refuse them."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def write_run(run_dir: Path, n: int = 3) -> None:
    with RunWriter(run_dir, {"model": "MLP"}) as writer:
        for step in range(n):
            writer.append({"step": step * 10, "loss": 1.0 / (step + 1), "grid": np.arange(INLINE_MAX + 1.0)})


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_meta_and_records(tmp_path):
    meta = {
        "model_class": "MLP",
        "num_params": np.int64(1234),
        "blocks": ["fc1.weight", "fc1.bias"],
        "optimizer": {"name": "Adam", "lr": np.float32(0.5), "betas": (0.9, 0.999)},
        "probe": {"mode": "eval", "seed": 0, "samples": torch.tensor([3, 1, 2])},
        "path": tmp_path / "ckpt.pt",
    }
    records = [
        {
            "step": 0,
            "wall_time": 1.5,
            "loss": np.float64(2.25),
            "grad_norm": torch.tensor(0.5),
            "spectrum": {"lambda_max": 3.0, "lambda_max_err": 1e-3, "top": torch.tensor([3.0, 2.0]),
                         "converged": np.bool_(True), "hvps": np.int32(40)},
            "rmed": {"rmed": 1.25, "blocks": {"fc1.weight": {"rmed": 1.0}, 7: {"rmed": 2.0}}},
            "errors": [],
        },
        {"step": 10, "loss": 1.0, "spectrum": {"lambda_max": 2.5, "top": [2.5, 1.0], "converged": False}},
    ]
    with RunWriter(tmp_path / "run", meta) as writer:
        written = [writer.append(r) for r in records]
    assert written[0]["spectrum"]["top"] == [3.0, 2.0]

    reader = RunReader(tmp_path / "run")
    assert reader.meta["schema_version"] == SCHEMA_VERSION
    assert reader.meta["torch_version"] == torch.__version__
    assert reader.meta["numpy_version"] == np.__version__
    assert isinstance(reader.meta["created"], str) and isinstance(reader.meta["created_unix"], float)
    assert reader.meta["num_params"] == 1234
    assert reader.meta["optimizer"] == {"name": "Adam", "lr": 0.5, "betas": [0.9, 0.999]}
    assert reader.meta["probe"]["samples"] == [3, 1, 2]
    assert reader.meta["path"] == str(tmp_path / "ckpt.pt")

    got = reader.records
    assert len(got) == len(reader) == 2
    assert got[0]["loss"] == 2.25 and got[0]["grad_norm"] == 0.5
    assert got[0]["spectrum"] == {"lambda_max": 3.0, "lambda_max_err": 1e-3, "top": [3.0, 2.0],
                                  "converged": True, "hvps": 40}
    assert got[0]["rmed"]["blocks"] == {"fc1.weight": {"rmed": 1.0}, "7": {"rmed": 2.0}}
    assert got[1]["spectrum"]["converged"] is False
    # One strict-JSON object per line.
    lines = (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    assert [strict_json(line)["step"] for line in lines] == [0, 10]


def test_series_and_paths(tmp_path):
    with RunWriter(tmp_path / "run", {}) as writer:
        for step, lam in [(0, 1.0), (50, 2.0), (100, None)]:
            writer.append({"step": step, "spectrum": {"lambda_max": lam, "top": [lam or 0.0, 0.5]},
                           "rmed": {"blocks": {"layer1.weight": {"rmed": step / 10}}}})
        writer.append({"note": "no step here", "spectrum": {"lambda_max": 9.0}})
        writer.append({"step": 150, "loss": 0.1})  # no spectrum: skipped
    reader = RunReader(tmp_path / "run")

    steps, values = reader.series("spectrum.lambda_max")
    assert steps.dtype == np.int64 and steps.tolist() == [0, 50, 100]
    assert values[:2].tolist() == [1.0, 2.0] and math.isnan(values[2])  # null reads as NaN

    steps, values = reader.series("rmed.blocks.layer1.weight.rmed")  # a dotted block name, matched longest first
    assert values.tolist() == [0.0, 5.0, 10.0]
    assert reader.series(("rmed", "blocks", "layer1.weight", "rmed"))[1].tolist() == [0.0, 5.0, 10.0]

    _, top = reader.series("spectrum.top")
    assert top.shape == (3, 2)

    with pytest.raises(ConfigurationError, match=r"no record .* has 'spectrum\.lamda_max'; numeric values present: "
                                                 r"loss, .*spectrum\.lambda_max"):
        reader.series("spectrum.lamda_max")
    with pytest.raises(ConfigurationError, match=r"'spectrum' at step 0 is a dict with keys \['lambda_max', 'top'\]"):
        reader.series("spectrum")
    with pytest.raises(ConfigurationError, match=r"path is empty"):
        reader.series("")


# ------------------------------------------------------------------------------------------------ arrays


def test_large_arrays_go_to_sidecars(tmp_path):
    grid = np.linspace(-1.0, 5.0, 400)
    density = torch.linspace(0.0, 1.0, 400, dtype=torch.float32)
    small = np.arange(INLINE_MAX, dtype=np.float64)
    with RunWriter(tmp_path / "run", {}) as writer:
        written = writer.append({"step": 200, "density": {"grid": grid, "values": density, "small": small},
                                 "bf16": torch.ones(100, dtype=torch.bfloat16)})
        explicit = writer.write_array("hessian top/eigvecs", np.eye(3))
        again = writer.write_array("hessian top/eigvecs.npy", torch.zeros(2))
        writer.append({"step": 201, "eigvecs": explicit})
    assert explicit == "arrays/hessian_top_eigvecs.npy" and again == "arrays/hessian_top_eigvecs-1.npy"

    ref = written["density"]["grid"]
    assert ref[ARRAY_KEY] == "arrays/step00000200-density.grid.npy"
    assert ref["shape"] == [400] and ref["dtype"] == "float64"

    reader = RunReader(tmp_path / "run")
    record = reader.records[0]
    assert record["density"]["small"] == small.tolist()  # at the threshold: inline
    np.testing.assert_array_equal(reader.load_array(record["density"]["grid"]), grid)
    values = reader.load_array(record["density"]["values"])
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, density.numpy())
    bf16 = reader.load_array(record["bf16"])
    assert bf16.dtype == np.float32 and np.all(bf16 == 1.0)
    np.testing.assert_array_equal(reader.load_array(reader.records[1]["eigvecs"]), np.eye(3))
    assert flatten_record(record)["density.grid"] == "arrays/step00000200-density.grid.npy"


def test_inline_max_is_configurable(tmp_path):
    with RunWriter(tmp_path / "run", {}, inline_max=0) as writer:
        written = writer.append({"step": 0, "top": np.array([1.0, 2.0]), "scalar": np.array(3.0)})
    assert ARRAY_KEY in written["top"]
    assert written["scalar"] == 3.0  # a 0-d array is a number, never a sidecar


def test_load_array_refuses_missing_and_escaping_paths(tmp_path):
    write_run(tmp_path / "run", n=1)
    reader = RunReader(tmp_path / "run")
    with pytest.raises(ConfigurationError, match=r"sidecar 'arrays/nope\.npy' is missing"):
        reader.load_array("arrays/nope.npy")
    with pytest.raises(ConfigurationError, match=r"points outside the run folder"):
        reader.load_array("../elsewhere.npy")
    with pytest.raises(ConfigurationError, match=r"expected a record's array reference"):
        reader.load_array(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ non-finite


def test_nan_and_inf_round_trip_as_null_with_a_flag(tmp_path):
    record = {
        "step": 0,
        "loss": float("nan"),
        "grad_norm": float("inf"),
        "lambda_min": np.float32("-inf"),
        "top": torch.tensor([1.0, float("nan")]),
        "nested": {"values": [float("inf"), 2.0]},
    }
    with RunWriter(tmp_path / "run", {"lr": float("nan")}) as writer:
        writer.append(record)
    line = (tmp_path / "run" / "records.jsonl").read_text()
    parsed = strict_json(line)  # the file is strict JSON
    assert parsed["loss"] is None and parsed["grad_norm"] is None and parsed["lambda_min"] is None
    assert parsed["top"] == [1.0, None] and parsed["nested"]["values"] == [None, 2.0]
    assert parsed["$nonfinite"] == {"/loss": "NaN", "/grad_norm": "Infinity", "/lambda_min": "-Infinity",
                                    "/top/1": "NaN", "/nested/values/0": "Infinity"}
    meta = strict_json((tmp_path / "run" / "meta.json").read_text())
    assert meta["lr"] is None and meta["$nonfinite"] == {"/lr": "NaN"} and meta["schema_version"] == 2

    reader = RunReader(tmp_path / "run")
    got = reader.records[0]
    assert math.isnan(got["loss"]) and got["grad_norm"] == math.inf and got["lambda_min"] == -math.inf
    assert got["top"][0] == 1.0 and math.isnan(got["top"][1])
    assert got["nested"]["values"] == [math.inf, 2.0]
    assert math.isnan(reader.meta["lr"])
    assert math.isnan(reader.series("loss")[1][0])


def test_unstorable_value_fails_before_writing_anything(tmp_path):
    with RunWriter(tmp_path / "run", {}) as writer:
        before = snapshot(tmp_path / "run")
        with pytest.raises(ConfigurationError, match=r"value at 'spectrum\.bad' has type object"):
            writer.append({"step": 0, "grid": np.zeros(1000), "spectrum": {"bad": object()}})
        with pytest.raises(ConfigurationError, match=r"key \(1, 2\) under 'rmed' has type tuple"):
            writer.append({"rmed": {(1, 2): 1.0}})
        with pytest.raises(ConfigurationError, match=r"a record is a dict, got list"):
            writer.append([1, 2])  # type: ignore[arg-type]
        assert snapshot(tmp_path / "run") == before  # no line, no orphan sidecar
    with pytest.raises(ConfigurationError, match=r"value at 'meta\.model' has type type"):
        RunWriter(tmp_path / "other", {"model": torch.nn.Linear})
    assert not (tmp_path / "other").exists()


def test_closed_writer_refuses_appends(tmp_path):
    writer = RunWriter(tmp_path / "run", {})
    writer.close()
    with pytest.raises(ConfigurationError, match=r"is closed; open a new one with resume=True"):
        writer.append({"step": 0})


# ------------------------------------------------------------------------------------------------ crashes


def test_truncated_last_line_is_skipped(tmp_path):
    write_run(tmp_path / "run", n=3)
    path = tmp_path / "run" / "records.jsonl"
    complete = path.read_bytes()
    path.write_bytes(complete + b'{"step": 30, "loss": 0.2')  # a write cut short by a crash
    reader = RunReader(tmp_path / "run")
    assert [r["step"] for r in reader.records] == [0, 10, 20]
    path.write_bytes(complete + b"\x00\x00\x00\n")  # garbage last line, newline included
    assert len(RunReader(tmp_path / "run").records) == 3


def test_corrupt_middle_line_names_its_line_number(tmp_path):
    write_run(tmp_path / "run", n=3)
    path = tmp_path / "run" / "records.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:20]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ConfigurationError, match=r"line 2 is not a complete JSON record"):
        RunReader(tmp_path / "run").records


def test_resume_after_a_crash_drops_the_partial_line(tmp_path):
    write_run(tmp_path / "run", n=2)
    path = tmp_path / "run" / "records.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 99, "lo')
    with RunWriter(tmp_path / "run", {"ignored": True}, resume=True) as writer:
        assert writer.n_records == 2
        assert writer.meta["model"] == "MLP" and "ignored" not in writer.meta  # the run's meta is kept
        writer.append({"step": 20, "loss": 0.25, "grid": np.arange(INLINE_MAX + 1.0)})
    reader = RunReader(tmp_path / "run")
    assert [r["step"] for r in reader.records] == [0, 10, 20]
    assert reader.load_array(reader.records[2]["grid"]).shape == (INLINE_MAX + 1,)


def test_resume_keeps_a_whole_record_missing_only_its_newline(tmp_path):
    write_run(tmp_path / "run", n=2)
    path = tmp_path / "run" / "records.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with RunWriter(tmp_path / "run", resume=True) as writer:
        writer.append({"step": 20})
    assert [r["step"] for r in RunReader(tmp_path / "run").records] == [0, 10, 20]


CHILD = r"""
import sys
import numpy as np
from geomprobe.runs import RunWriter

writer = RunWriter(sys.argv[1], {"model": "child"})
step = 0
while True:
    writer.append({"step": step, "loss": 1.0 / (step + 1), "payload": "x" * 50000, "grid": np.full(300, float(step))})
    print(step, flush=True)
    step += 1
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkilled_writer_leaves_a_readable_run(tmp_path):
    run_dir = tmp_path / "run"
    root = str(Path(runs.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    guard = threading.Timer(120.0, proc.kill)  # never hang the suite if the child stalls before printing
    guard.start()
    try:
        printed = []
        while len(printed) < 5:
            line = proc.stdout.readline()
            assert line, f"child exited early: {proc.stderr.read()}"
            printed.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)  # mid-loop: possibly mid-write
        proc.wait(timeout=30)
    finally:
        guard.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    reader = RunReader(run_dir)
    assert reader.meta["model"] == "child"
    records = reader.records
    assert len(records) >= 5  # every record the child reported complete is there
    assert [r["step"] for r in records] == list(range(len(records)))
    for record in records:
        assert record["payload"] == "x" * 50000
        np.testing.assert_array_equal(reader.load_array(record["grid"]), np.full(300, float(record["step"])))


# ------------------------------------------------------------------------------------------------ existing folders


def test_existing_run_is_refused_and_left_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, n=2)
    before = snapshot(run_dir)
    with pytest.raises(ConfigurationError, match=r"already holds a geomprobe run; refusing to overwrite it\. "
                                                 r"Pass force=True .* resume=True"):
        RunWriter(run_dir, {"model": "other"})
    assert snapshot(run_dir) == before


def test_non_run_folder_is_refused_and_left_byte_identical(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigurationError, match=r"is not empty \(notes\.txt\) and holds no meta\.json"):
        RunWriter(tmp_path, {})
    with pytest.raises(ConfigurationError, match=r"not a geomprobe run to resume"):
        RunWriter(tmp_path, {}, resume=True)
    assert snapshot(tmp_path) == before
    with pytest.raises(ConfigurationError, match=r"is a file, not a folder"):
        RunWriter(tmp_path / "notes.txt", {})


def test_resume_refuses_another_schema_and_leaves_files_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, n=1)
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["schema_version"] = 0
    (run_dir / "meta.json").write_text(json.dumps(meta))
    before = snapshot(run_dir)
    with pytest.raises(ConfigurationError, match=r"cannot resume .* schema version 0, this geomprobe writes 2"):
        RunWriter(run_dir, {}, resume=True)
    assert snapshot(run_dir) == before


def test_force_replaces_the_run_but_not_foreign_files(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, n=3)
    (run_dir / "notes.txt").write_text("mine")
    with RunWriter(run_dir, {"model": "new"}, force=True) as writer:
        writer.append({"step": 5})
    reader = RunReader(run_dir)
    assert reader.meta["model"] == "new"
    assert [r["step"] for r in reader.records] == [5]
    assert not (run_dir / "arrays").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_empty_or_missing_folder_is_fine_and_resume_starts_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    RunWriter(tmp_path / "empty", {}).close()
    with RunWriter(tmp_path / "fresh" / "nested", {}, resume=True) as writer:
        writer.append({"step": 0})
    assert len(RunReader(tmp_path / "fresh" / "nested").records) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"force": True, "resume": True}, r"force=True replaces a run and resume=True appends to it; pass one"),
        ({"inline_max": -1}, r"inline_max must be an integer >= 0, got -1"),
        ({"meta": [1]}, r"meta must be a dict, got list"),
        ({"meta": {"schema_version": 2}}, r"meta may not set 'schema_version'"),
    ],
)
def test_writer_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        RunWriter(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_reader_errors(tmp_path):
    with pytest.raises(ConfigurationError, match=r"does not exist; check the path"):
        RunReader(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ConfigurationError, match=r"is not a geomprobe run: it has no meta\.json"):
        RunReader(tmp_path / "bare")
    (tmp_path / "bare" / "meta.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match=r"meta\.json' is not valid JSON"):
        RunReader(tmp_path / "bare")
    (tmp_path / "bare" / "meta.json").write_text('{"model": "x"}')
    with pytest.raises(ConfigurationError, match=r"has no integer schema_version"):
        RunReader(tmp_path / "bare")
    (tmp_path / "bare" / "meta.json").write_text('{"schema_version": 99}')
    with pytest.raises(ConfigurationError, match=r"schema version 99, newer than the 2 this geomprobe reads"):
        RunReader(tmp_path / "bare")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match=r"is a file; a run is a folder"):
        RunReader(tmp_path / "file")


def test_run_without_records_file_reads_as_empty(tmp_path):
    write_run(tmp_path / "run", n=0)
    (tmp_path / "run" / "records.jsonl").unlink()
    reader = RunReader(tmp_path / "run")
    assert reader.records == []
    steps, values = reader.series("loss")
    assert steps.size == 0 and values.size == 0


# ------------------------------------------------------------------------------------------------ export


def test_to_dataframe_flattens_to_dotted_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    write_run(tmp_path / "run", n=2)
    with RunWriter(tmp_path / "run", resume=True) as writer:
        writer.append({"step": 20, "spectrum": {"lambda_max": 2.0, "top": [2.0, 1.0]}})
    frame = RunReader(tmp_path / "run").to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["step"]) == [0, 10, 20]
    assert "spectrum.lambda_max" in frame.columns and "grid" in frame.columns
    assert frame["spectrum.lambda_max"].iloc[2] == 2.0 and math.isnan(frame["spectrum.lambda_max"].iloc[0])


def test_to_dataframe_without_pandas_says_how_to_install(tmp_path, monkeypatch):
    write_run(tmp_path / "run", n=1)
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail as if not installed
    with pytest.raises(ImportError, match=r"needs pandas, which is not installed; install it with `pip install "
                                          r"pandas`"):
        RunReader(tmp_path / "run").to_dataframe()


def test_export_csv(tmp_path):
    with RunWriter(tmp_path / "run", {}) as writer:
        writer.append({"step": 0, "loss": float("nan"), "spectrum": {"top": [2.0, 1.0], "converged": True}})
        writer.append({"step": 10, "loss": 0.5, "grid": np.zeros(INLINE_MAX + 1)})
    reader = RunReader(tmp_path / "run")
    out = tmp_path / "run.csv"
    assert export_csv(reader, out) == 2
    assert out.read_text().splitlines() == [
        "step,loss,spectrum.top,spectrum.converged,grid",
        '0,nan,"[2.0, 1.0]",true,',
        "10,0.5,,,arrays/step00000010-grid.npy",
    ]
    with pytest.raises(ConfigurationError, match=r"run\.csv' already exists; pass overwrite=True"):
        export_csv(reader, out)
    assert export_csv(reader, out, overwrite=True) == 2
    with pytest.raises(ConfigurationError, match=r"is a folder; give a file name"):
        export_csv(reader, tmp_path, overwrite=True)
    stream = io.StringIO()
    export_csv(reader, stream)
    assert stream.getvalue() == out.read_text()


@pytest.mark.parametrize("tail, steps", [(b'{"step": 5, "lo', [0, 1, 6]), (b'{"step": 5, "loss": 0.5}', [0, 1, 5, 6])])
def test_a_partial_last_line_never_swallows_the_next_record(tmp_path, tail, steps):
    # a write that stopped short (a full disk: ENOSPC after part of the line) leaves a partial last line; the
    # next record must start on its own line, or both are lost and the run stops parsing there
    run_dir = tmp_path / "run"
    with RunWriter(run_dir, {"model": "MLP"}) as w:
        w.append({"step": 0, "loss": 1.0})
        w.append({"step": 1, "loss": 0.9})
        with open(run_dir / "records.jsonl", "ab") as f:
            f.write(tail)  # a whole record whose newline was lost is kept; a cut one is dropped
        w.append({"step": 6, "loss": 0.4})
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    assert [strict_json(line)["step"] for line in lines] == steps  # every line whole
    assert [r["step"] for r in RunReader(run_dir).records] == steps
