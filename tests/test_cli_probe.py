"""`geomprobe probe`: several checkpoints into one run, and every bad input as one line with the right exit code."""

import json
import os
import subprocess
import sysconfig
from pathlib import Path

import probe_specs
import pytest
import torch
from click.testing import CliRunner
from probe_specs import TinyNet, adam, one_thread, train  # noqa: F401  (one_thread: an autouse fixture)

from geomprobe.cli.main import cli
from geomprobe.runs.reader import RunReader

SPEC = "probe_specs:mlp_spec"


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def error_line(result):
    """The one line of an error exit: click's 'Error: ...' on stderr."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def save_training_checkpoints(folder: Path, steps=(30, 10, 20)) -> list[Path]:
    """Training dicts labelled with ``steps``; one Adam step apart (enough for distinct weights and state)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = adam(model)
    paths = []
    for step in sorted(steps):
        train(model, opt, 1)
        path = folder / f"ckpt-{step}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return save_training_checkpoints(tmp_path_factory.mktemp("ckpts"))


def test_several_checkpoints_probed_into_one_run_ordered_by_step(tmp_path, ckpts):
    out = tmp_path / "run"
    unsorted = [ckpts[2], ckpts[0], ckpts[1]]
    result = run("probe", *unsorted, "--spec", SPEC, "--metric", "spectrum", "--metric", "precond",
                 "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20, 30]
    assert all(not c["errors"] for c in doc["checkpoints"])
    reader = RunReader(out)
    assert [r["step"] for r in reader.records] == [10, 20, 30]
    assert all("lambda_max" in r["spectrum"] and "precond" in r for r in reader.records)
    assert reader.meta["optimizer"] == "Adam" and reader.meta["spec"] == SPEC
    assert [c["step"] for c in reader.meta["checkpoints"]] == [10, 20, 30]
    # Losses differ between checkpoints: each one's weights were really loaded.
    assert len({r["loss"] for r in reader.records}) == 3
    assert "[3/3]" in result.stderr and "ETA" in result.stderr  # plain progress when not a terminal


def test_same_seed_same_run_and_a_glob_we_expand(tmp_path, ckpts):
    losses = []
    for name in ("a", "b"):
        result = run("probe", str(ckpts[0].parent / "ckpt-*.pt"), "--spec", "probe_specs:mlp_loader_spec",
                     "--samples", 24, "--seed", 3, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        assert "probed checkpoints" in result.stdout
        losses.append([r["loss"] for r in RunReader(tmp_path / name).records])
    assert losses[0] == losses[1]


def test_existing_run_is_refused_without_force_and_left_untouched(tmp_path, ckpts):
    out = tmp_path / "run"
    assert run("probe", ckpts[0], "--spec", SPEC, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = run("probe", ckpts[1], "--spec", SPEC, "--out", out)
    assert result.exit_code == 1
    assert "exists and is not empty; pass --force" in error_line(result)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    result = run("probe", ckpts[1], "--spec", SPEC, "--out", out, "--force")
    assert result.exit_code == 0
    assert [r["step"] for r in RunReader(out).records] == [20]


def test_pickled_module_needs_trust_pickle(tmp_path):
    torch.save(TinyNet(), tmp_path / "model-5.pt")
    result = run("probe", tmp_path / "model-5.pt", "--spec", SPEC, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "--trust-pickle" in error_line(result)
    assert not (tmp_path / "run").exists()
    result = run("probe", tmp_path / "model-5.pt", "--spec", SPEC, "--out", tmp_path / "run", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "warning: loading" in result.stderr and "weights_only=False" in result.stderr


def write_bad_inputs(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    wide = probe_specs.wide_spec().model
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    other = {"fc1.weight": torch.zeros(6, 4), "head.weight": torch.zeros(3, 6)}
    torch.save(other, tmp_path / "other.pt")
    torch.save({"model": TinyNet().state_dict(), "step": 3}, tmp_path / "no-opt.pt")


BAD_INPUTS = [
    # (arguments after "probe", expected exit code, text of the one error line)
    (["{tmp}/missing.pt", "--spec", SPEC], 1, "does not exist"),
    (["{tmp}/nothing-*.pt", "--spec", SPEC], 1, "no checkpoint matches"),
    (["{tmp}/corrupt.pt", "--spec", SPEC], 1, "is corrupt"),
    (["{tmp}/wide.pt", "--spec", SPEC], 1, "shape differs"),
    (["{tmp}/other.pt", "--spec", SPEC], 1, "missing key(s): fc1.bias"),
    (["{ckpt}", "--spec", "no_module_here_xyz:spec"], 1, "no module named"),
    (["{ckpt}", "--spec", "probe_specs:missing"], 1, "has no attribute"),
    (["{ckpt}", "--spec", "probe_specs:raising_spec"], 1, "raised ValueError: boom"),
    (["{ckpt}", "--spec", "probe_specs:mlp_no_optimizer_spec", "--metric", "precond"], 1, "add optimizer_factory"),
    (["{tmp}/no-opt.pt", "--spec", SPEC, "--metric", "precond"], 1, "do not hold"),
    (["{ckpt}", "--spec", SPEC, "--samples", "5"], 1, "needs a DataLoader"),
    (["{ckpt}", "--spec", SPEC, "--metric", "curvature"], 2, "Invalid value for '--metric'"),
    (["{ckpt}", "--spec", SPEC, "--mode", "test"], 2, "Invalid value for '--mode'"),
    (["{ckpt}"], 2, "Missing option '--spec'"),
    (["--spec", SPEC], 2, "Missing argument 'CKPT...'"),
]


@pytest.mark.parametrize("args, code, message", BAD_INPUTS)
def test_bad_input_gets_one_line_and_the_right_exit_code(tmp_path, ckpts, args, code, message):
    write_bad_inputs(tmp_path)
    out = tmp_path / "run"
    argv = [a.format(tmp=tmp_path, ckpt=ckpts[0]) for a in args]
    result = run("probe", *argv, "--out", out)
    assert result.exit_code == code, result.output
    assert message in error_line(result)
    assert result.stdout == ""
    assert not out.exists()


def test_a_probe_that_fails_is_recorded_and_exits_1(tmp_path):
    model = probe_specs.FirstOrderNet()
    torch.save(model.state_dict(), tmp_path / "ckpt-1.pt")
    result = run("probe", tmp_path / "ckpt-1.pt", "--spec", "probe_specs:first_order_spec", "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "1 of 1 probes recorded errors" in error_line(result)
    assert "once_differentiable" in RunReader(tmp_path / "run").records[0]["errors"]["landscape"]


def _installed_script() -> str:
    found = Path(sysconfig.get_path("scripts")) / "geomprobe"
    return str(found) if found.exists() else "geomprobe"


def test_the_installed_script_probes_a_checkpoint(tmp_path, ckpts):
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [_installed_script(), "probe", str(ckpts[1]), str(ckpts[0]), "--spec", f"{probe_specs.SPEC_FILE}:mlp_spec",
         "--out", str(tmp_path / "run"), "--json"],
        check=False, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert [c["step"] for c in json.loads(proc.stdout)["checkpoints"]] == [10, 20]
    assert "Traceback" not in proc.stderr and "run written to" in proc.stderr


def test_an_out_path_that_is_a_file_is_refused(tmp_path, ckpts):
    (tmp_path / "taken").write_text("keep me")
    result = run("probe", ckpts[0], "--spec", SPEC, "--out", tmp_path / "taken")
    assert result.exit_code == 1 and "is a file" in error_line(result)
    assert (tmp_path / "taken").read_text() == "keep me"


def test_a_hugging_face_folder_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.BertForMaskedLM(probe_specs.tiny_bert_config()).save_pretrained(tmp_path / "checkpoint-40")
    result = run("probe", tmp_path / "checkpoint-40", "--spec", "probe_specs:bert_spec", "--out", tmp_path / "run",
                 "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["checkpoints"]
    assert (row["step"], row["format"], row["errors"]) == (40, "hf-folder", {})
    assert row["key_match"] == "2 tied key(s) shared"  # the decoder shares the embeddings' weights


def test_progress_bar_on_a_terminal():
    import io

    from rich.console import Console

    from geomprobe.cli.commands_probe import _Progress
    from geomprobe.load.checkpoints import CheckpointInfo

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    info = CheckpointInfo("ckpt-5.pt", "state-dict", 5, "file name", False, 4)
    with _Progress(console, 1) as progress:
        progress.starting(info)
        progress.finished(info, {"loss": 0.5, "cost": {"seconds": 0.1}})
    assert progress.done == 1 and progress.bar is not None


def test_planned_cost_is_shown_before_probing_and_checkpoints_start_warm(tmp_path, ckpts):
    result = run("probe", *ckpts, "--spec", SPEC, "--metric", "spectrum", "--metric", "trace", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    plan_at = result.stderr.index("planned cost per probe (51 parameters, float32)")
    assert plan_at < result.stderr.index("[1/3]")  # before the first probe
    cells = {c[0]: c for c in ([x.strip() for x in ln.strip("│ ").split("│")] for ln in result.stderr.splitlines())}
    assert cells["spectrum"][1] == "<=51" and cells["trace"][1] == "96"  # Lanczos: at most d steps; trace: exact
    assert cells["spectrum"][3] == f"{(51 + 3) * 51 * 4 / 1024:.1f} KiB"  # the Lanczos basis
    records = RunReader(tmp_path / "run").records
    # a certified spectrum starts cold and says why; without the certificate the checkpoints start warm
    assert [r["spectrum"]["warm"] for r in records] == [False, False, False]
    assert "certifies its extremes" in records[1]["spectrum"]["cold_because"]
    assert all(r["cost"]["hvps"] <= 51 + 96 for r in records)
    resid = run("probe", *ckpts, "--spec", SPEC, "--metric", "spectrum:risk=none", "--out", tmp_path / "resid", "-q")
    assert resid.exit_code == 0, resid.output
    assert [r["spectrum"]["warm"] for r in RunReader(tmp_path / "resid").records] == [False, True, True]
    assert RunReader(tmp_path / "run").meta["probe"]["cost_plan"]["trace"]["hvps"] == 96
    cold = run("probe", *ckpts, "--spec", SPEC, "--out", tmp_path / "cold", "--no-warm-start")
    assert cold.exit_code == 0, cold.output
    assert not any(r["spectrum"]["warm"] for r in RunReader(tmp_path / "cold").records)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, ckpts):
    result = run("probe", *ckpts, "--spec", SPEC, "--metric", "spectrum", "--metric", "rmed", "--out",
                 tmp_path / "run", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc["cost_plan"]) == ["spectrum", "rmed"] and doc["parameters"] == 51 and doc["checkpoints"] == 3
    assert doc["cost_plan"]["rmed"] == {"hvps": 51, "exact": True, "gradients": 0, "vector_bytes": 32 * 51 * 4,
                                         "forwards": 0}
    assert not (tmp_path / "run").exists()
    table = run("probe", ckpts[0], "--spec", SPEC, "--dry-run")
    assert table.exit_code == 0 and "planned cost per probe" in table.stdout and "spectrum" in table.stdout


def test_quiet_shows_no_plan_progress_or_notes(tmp_path, ckpts):
    result = run("probe", ckpts[0], "--spec", SPEC, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_progress_inside_a_probe_on_a_terminal():
    import io

    from rich.console import Console

    from geomprobe.cli.commands_probe import _Progress
    from geomprobe.probe.progress import ProgressEvent

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with _Progress(console, 1) as progress:
        progress.event(ProgressEvent("start", 5, "spectrum", 0, 51, False))
        for done in (1, 2, 3):
            progress.event(ProgressEvent("advance", 5, "spectrum", done, 51, False))
        task = progress.bar.tasks[progress.metric_task]
        assert (task.completed, task.total, task.visible) == (3, 51, True)
        assert "spectrum HVPs (planned <=51)" in task.description
        progress.event(ProgressEvent("end", 5, "spectrum", 3, 51, False))
        assert not progress.bar.tasks[progress.metric_task].visible
        # a view's bar follows its forward passes, the bulk of its time
        progress.event(ProgressEvent("start", 5, "view_line", 0, 1, True, planned_forwards=82))
        progress.event(ProgressEvent("advance", 5, "view_line", 1, 1, True, forwards=0, planned_forwards=82))
        progress.event(ProgressEvent("advance", 5, "view_line", 1, 1, True, forwards=4, planned_forwards=82))
        task = progress.bar.tasks[progress.metric_task]
        assert (task.completed, task.total) == (4, 82)
        assert "view_line forward passes (planned 82; HVPs 1)" in task.description
    quiet = _Progress(Console(file=io.StringIO(), force_terminal=True), 1, quiet=True)
    assert quiet.bar is None


def test_an_out_path_through_a_file_is_an_error_not_a_success(tmp_path, ckpts):
    (tmp_path / "afile").write_text("")
    res = run("probe", ckpts[0], "--spec", SPEC, "--metric", "spectrum", "--out", tmp_path / "afile" / "run")
    assert res.exit_code == 1 and "could not be written" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "afile" / "run"), "--budget", "10", "--probes", "1"])
    assert res.exit_code == 1 and "Not a directory" in res.output and "Traceback" not in res.output


def test_summary_prints_one_line_per_checkpoint_on_stderr(tmp_path, ckpts):
    """--summary: the line GeometryProbe(summary=True) prints, once per checkpoint as it is recorded, on stderr
    (stdout keeps its one JSON document); without it (the default) no such line, with or without --quiet."""
    from geomprobe.probe.summary import summary_line

    out = tmp_path / "run"
    result = run("probe", *ckpts, "--spec", SPEC, "--metric", "spectrum", "--metric", "rmed", "--out", out,
                 "--quiet", "--summary", "--json")
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == [10, 20, 30]
    records = RunReader(out).records
    assert result.stderr.splitlines() == [summary_line(r) for r in records]
    assert all(f"geomprobe step {s}: loss " in line and "lambda_max" in line and "R_med" in line
               for s, line in zip((10, 20, 30), result.stderr.splitlines()))
    plain = run("probe", ckpts[0], "--spec", SPEC, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert "geomprobe step" not in plain.stderr and "[1/1]" in plain.stderr


def test_dry_run_plans_a_views_forward_passes(tmp_path, ckpts):
    result = run("probe", ckpts[0], "--spec", SPEC, "--metric", "spectrum", "--metric",
                 "view_line:direction=gradient,points=5", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["cost_plan"]
    assert plan["view_line"]["forwards"] == 5 and plan["spectrum"]["forwards"] == 0  # one probe batch
    table = run("probe", ckpts[0], "--spec", SPEC, "--metric", "view_line:direction=gradient,points=5", "--dry-run")
    assert table.exit_code == 0, table.output
    header = next(line for line in table.stdout.splitlines() if "metric" in line and "HVPs" in line)
    assert "forwards" in header
    row = next(line for line in table.stdout.splitlines() if "view_line" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")][1:3] == ["1", "5"]
    plain = run("probe", ckpts[0], "--spec", SPEC, "--dry-run")  # no view: no column
    assert "forwards" not in plain.stdout
