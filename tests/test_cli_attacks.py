"""Bad CLI input found by attack (issue 18, item 12): each gets one line and the right exit code, through click's
runner and through the installed ``geomprobe`` script, and loses nothing already written."""

import os
import subprocess
import sysconfig
from pathlib import Path

import probe_specs
import pytest
import torch
from click.testing import CliRunner
from probe_specs import BNDropNet, TinyNet, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from safetensors.torch import save_file

import geomprobe as gp
from geomprobe.cli.main import cli
from geomprobe.errors import ConfigurationError
from geomprobe.load.checkpoints import load_checkpoint, plan_checkpoints
from geomprobe.load.formats import read_source
from geomprobe.load.spec import load_spec
from geomprobe.runs.reader import RunReader

SPEC = "probe_specs:mlp_spec"
LONG = "n" * 300  # longer than any common file system's 255-byte limit on one name


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def script(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (``args`` may be bytes: names that are not UTF-8)."""
    found = Path(sysconfig.get_path("scripts")) / "geomprobe"
    exe = str(found) if found.exists() else "geomprobe"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(probe_specs.SPEC_FILE).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([exe, *args], check=False, capture_output=True, env=env, timeout=120, cwd=cwd)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc


def script_error(proc) -> str:
    lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-10.pt"
    torch.save(TinyNet().state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------ seeds


@pytest.mark.parametrize("command", [["probe", "{ckpt}", "--spec", SPEC], ["doctor", "--spec", SPEC], ["demo"]])
@pytest.mark.parametrize("seed", [str(2**64), "-1", str(2**32)])
def test_a_seed_out_of_range_is_refused_up_front_not_blamed_on_the_spec(tmp_path, ckpt, command, seed):
    argv = [a.format(ckpt=ckpt) for a in command] + ["--seed", seed]
    result = run(*argv, *(["--out", tmp_path / "out"] if command[0] != "doctor" else []))
    assert result.exit_code == 2
    line = error_line(result)
    assert "Invalid value for '--seed'" in line and "0<=x<=4294967295" in line and "spec" not in line
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_runs_and_the_script_refuses_2_to_the_64(tmp_path, ckpt):
    assert run("probe", ckpt, "--spec", SPEC, "--seed", 2**32 - 1, "--dry-run").exit_code == 0
    assert run("probe", ckpt, "--spec", SPEC, "--seed", 2**32 - 1, "--metric", "trace", "--out", tmp_path / "a",
               "-q").exit_code == 0
    proc = script("probe", str(ckpt), "--spec", SPEC, "--seed", str(2**64), "--out", "b", cwd=tmp_path)
    assert proc.returncode == 2 and "Invalid value for '--seed'" in script_error(proc)


def test_library_seeds_out_of_range_are_configuration_errors():
    with pytest.raises(ConfigurationError, match=r"seed must be between 0 and 4294967295 \(2\*\*32 - 1\), got -1"):
        gp.GeometryProbe(TinyNet(), torch.nn.CrossEntropyLoss(), probe_specs.data(), seed=-1)
    with pytest.raises(ConfigurationError, match="outside the range of torch's random generator"):
        load_spec(SPEC, seed=2**64)


# ------------------------------------------------------------------------------------------ names too long


def test_an_out_name_too_long_is_refused_before_anything_runs(tmp_path, ckpt):
    result = run("probe", ckpt, "--spec", SPEC, "--out", tmp_path / LONG)
    assert result.exit_code == 1
    assert "a name in it is 300 bytes long, more than the 255 the file system allows" in error_line(result)
    assert "probed checkpoints" not in result.stdout  # refused before the first probe, not after the last
    proc = script("probe", str(ckpt), "--spec", SPEC, "--out", LONG, cwd=tmp_path)
    assert proc.returncode == 1 and "300 bytes long" in script_error(proc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, code", [
    (["probe", "{tmp}/" + LONG + ".pt", "--spec", SPEC, "--out", "{tmp}/run"], 1),
    (["probe", "{tmp}/" + LONG + "-*.pt", "--spec", SPEC, "--out", "{tmp}/run"], 1),
    (["report", "{tmp}/" + LONG], 1),
    (["compare", "{tmp}/" + LONG, "{tmp}/" + LONG + "2"], 1),
    (["demo", "--out", "{tmp}/" + LONG], 2),
])
def test_names_too_long_anywhere_are_one_line(tmp_path, argv, code):
    result = run(*[a.format(tmp=tmp_path) for a in argv])
    assert result.exit_code == code, result.output
    line = error_line(result)
    assert "bytes long, more than the 255 the file system allows" in line and "does not exist" not in line
    assert len(line) < 400  # the path is shortened, not printed whole


# ------------------------------------------------------------------------------------------ --force pre-flight


def test_force_with_a_broken_loss_leaves_the_good_run_untouched(tmp_path, ckpt):
    out = tmp_path / "run"
    assert run("probe", ckpt, "--spec", SPEC, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("probe", ckpt, "--spec", "probe_specs:broken_loss_spec", "--out", out, "--force")
    assert result.exit_code == 1
    line = error_line(result)
    assert "the spec's loss cannot be computed" in line and "AttributeError" in line and "unsqueze" in line
    assert "nothing was probed or written" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    proc = script("probe", str(ckpt), "--spec", "probe_specs:broken_loss_spec", "--out", str(out), "--force",
                  cwd=tmp_path)
    assert proc.returncode == 1 and "loss cannot be computed" in script_error(proc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [r["step"] for r in RunReader(out).records] == [10]
    dry = run("probe", ckpt, "--spec", "probe_specs:broken_loss_spec", "--dry-run")
    assert dry.exit_code == 1 and "loss cannot be computed" in error_line(dry)


def test_a_probe_failure_past_the_pre_flight_still_leaves_the_run_under_force(tmp_path, ckpt):
    """The pre-flight refuses a loss that cannot run; a model without double backward passes it and fails in
    the probe: --force replaces a run only with one that measured something, so the good run stays as it was.
    Into a fresh folder the failure is recorded, as before."""
    out = tmp_path / "run"
    assert run("probe", ckpt, "--spec", SPEC, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("probe", ckpt, "--spec", "probe_specs:first_order_spec", "--out", out, "--force")
    assert result.exit_code == 1
    line = error_line(result)
    assert "no checkpoint was measured (1 of 1 probes failed; step 10, landscape:" in line
    assert f"so the run in {out} was left as it was: fix the spec's model or loss_fn" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fresh = run("probe", ckpt, "--spec", "probe_specs:first_order_spec", "--out", tmp_path / "fresh")
    assert fresh.exit_code == 1 and "1 of 1 probes recorded errors" in error_line(fresh)
    assert "once_differentiable" in RunReader(tmp_path / "fresh").records[0]["errors"]["landscape"]


# ------------------------------------------------------------------------------------------ integer tensors


def _state(model, **dtypes):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key, dtype in dtypes.items():
        state[key.replace("_", ".")] = (state[key.replace("_", ".")] * 10).to(dtype)
    return state


@pytest.mark.parametrize("dtype, shown", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.bool, "BOOL")])
def test_integer_parameters_in_safetensors_are_refused(tmp_path, dtype, shown):
    path = tmp_path / "int-5.safetensors"
    save_file(_state(TinyNet(), fc1_weight=dtype), str(path))
    result = run("probe", path, "--spec", SPEC, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert f"stores the model's parameter 'fc1.weight' as {shown}: trainable parameters are floating point" \
        in error_line(result)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigurationError, match="'fc1.weight' as"):
        load_checkpoint(path, TinyNet())


def test_integer_parameters_in_torch_files_are_refused_and_counted(tmp_path):
    path = tmp_path / "int-5.pt"
    torch.save(_state(TinyNet(), fc1_weight=torch.int64, fc2_bias=torch.int16), path)
    with pytest.raises(ConfigurationError, match=r"'fc1\.weight' as int64 \(and 1 more\)"):
        plan_checkpoints([path], model=TinyNet())


def test_integer_buffers_load_as_torch_loads_them(tmp_path):
    model = BNDropNet()
    model.bn.num_batches_tracked += 7
    path = tmp_path / "bn-3.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = BNDropNet()
    load_checkpoint(path, fresh)
    assert fresh.bn.num_batches_tracked.dtype == torch.int64 and int(fresh.bn.num_batches_tracked) == 7
    result = run("probe", path, "--spec", "probe_specs:bn_dropout_spec", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ non-UTF-8 names


def test_a_checkpoint_name_that_is_not_utf8_is_named_as_such_not_corrupt(tmp_path, ckpt):
    raw = os.fsencode(tmp_path) + b"/ckpt-\xff-3.pt"
    with open(raw, "wb") as f:
        f.write(ckpt.read_bytes())
    with pytest.raises(ConfigurationError, match=r"ckpt-\\xff-3.pt'.*not valid UTF-8 \(byte 0xff at byte \d+\)"):
        read_source(raw)
    result = run("probe", os.fsdecode(raw), "--spec", SPEC, "--out", tmp_path / "run")
    assert result.exit_code == 1
    line = error_line(result)
    assert "not valid UTF-8" in line and "corrupt" not in line
    proc = script(b"probe", raw, b"--spec", SPEC.encode(), b"--out", b"run", cwd=tmp_path)
    assert proc.returncode == 1 and "its name is not valid UTF-8 (byte 0xff" in script_error(proc)
    proc = script(b"probe", os.fsencode(tmp_path) + b"/ckpt-*.pt", b"--spec", SPEC.encode(), b"--out", b"run",
                  cwd=tmp_path)  # a glob that finds the file
    assert proc.returncode == 1 and "not valid UTF-8" in script_error(proc)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ dict inputs


def test_a_model_taking_its_input_dict_whole_is_probed(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dict-4.pt"
    torch.save(probe_specs.DictNet().state_dict(), path)
    result = run("probe", path, "--spec", "probe_specs:dict_forward_spec", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert not RunReader(tmp_path / "run").records[0].get("errors")


class _Core(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


class _Whole(_Core):
    def forward(self, batch, train=False):
        return self.net(batch["x"] * batch["scale"])


class _Keywords(_Core):
    def forward(self, x, scale):
        return self.net(x * scale)


class _Plain(_Core):
    def forward(self, x):
        return self.net(x)


class _Mismatch(_Core):
    def forward(self, x, mask=None):
        return self.net(x)


def test_dict_inputs_reach_forward_whole_or_by_keyword_and_give_the_reference_hessian():
    from reference import dense_hessian

    from geomprobe.engine.landscape import Landscape

    X, y = probe_specs.data()
    X, scale = X.double(), torch.full((len(X), 1), 0.5, dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    models = [_Whole().double(), _Keywords().double(), _Plain().double()]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    H_ref = dense_hessian(models[2], loss_fn, [(X * scale, y)])
    for model in models[:2]:
        land = Landscape(model, loss_fn, ({"x": X, "scale": scale}, y))
        H = land.hvp(torch.eye(land.dim, dtype=torch.float64))
        assert torch.allclose(H, H_ref, atol=1e-10, rtol=0), type(model).__name__


def test_a_dict_forward_cannot_take_is_refused_naming_keys_and_parameters():
    from geomprobe.engine.landscape import Landscape

    X, y = probe_specs.data()
    with pytest.raises(ConfigurationError, match=r"keys x, labels, but _Mismatch\.forward takes \(x, mask\)"):
        Landscape(_Mismatch(), torch.nn.CrossEntropyLoss(), ({"x": X, "labels": y}, y))
