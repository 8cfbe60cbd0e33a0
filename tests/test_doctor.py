"""`geomprobe doctor`: each check's verdict on models built to pass or fail it, and the command's exit codes."""

import json

import probe_specs
import pytest
import torch
from click.testing import CliRunner
from probe_specs import one_thread  # noqa: F401  (autouse fixture)

from geomprobe.cli.main import cli
from geomprobe.doctor import STATUSES, diagnose
from geomprobe.load.spec import load_spec


def verdicts(spec_name, **kwargs):
    checks = diagnose(load_spec(f"probe_specs:{spec_name}"), **kwargs)
    assert all(c.status in STATUSES for c in checks)
    return {c.name: c for c in checks}


def doctor(*args):
    result = CliRunner().invoke(cli, ["doctor", *args])
    assert "Traceback" not in result.output
    return result


def test_a_plain_mlp_passes_everything_and_exits_0(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = doctor("--spec", "probe_specs:mlp_spec", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    names = [c["name"] for c in doc["checks"]]
    for name in ("parameters", "loss", "double backward", "attention", "BatchNorm", "dropout",
                 "per-example gradients", "optimizer", "threads"):
        assert name in names
    assert {c["status"] for c in doc["checks"]} == {"OK"}
    assert "Adam" in next(c["detail"] for c in doc["checks"] if c["name"] == "optimizer")


def test_the_table_says_what_to_do():
    result = doctor("--spec", "probe_specs:bn_dropout_spec", "--mode", "train")
    assert result.exit_code == 0, result.output
    for text in ("BatchNorm", "WARN", "what to do", "thinned"):
        assert text in result.stdout


def test_batchnorm_and_dropout_depend_on_the_mode():
    eval_ = verdicts("bn_dropout_spec", mode="eval")
    assert eval_["BatchNorm"].status == "WARN" and "running statistics" in eval_["BatchNorm"].detail
    assert eval_["dropout"].status == "OK" and "off in eval mode" in eval_["dropout"].detail
    train = verdicts("bn_dropout_spec", mode="train")
    assert train["BatchNorm"].status == "WARN" and "batch statistics" in train["BatchNorm"].detail
    assert train["dropout"].status == "WARN"
    # A train-mode BatchNorm cannot normalize one example: no per-example gradients, the noise metric
    # needs minibatches (noise_data)
    assert train["per-example gradients"].status == "WARN"
    assert "BatchNorm in train mode" in train["per-example gradients"].detail
    assert "noise_data" in train["per-example gradients"].advice
    assert train["double backward"].status == "OK"


def test_vmap_over_dropout_falls_back_to_micro_batches():
    checks = verdicts("dropout_spec", mode="train")
    assert checks["per-example gradients"].status == "WARN"
    assert "micro-batches of one example" in checks["per-example gradients"].detail


def test_missing_double_backward_fails_with_advice_and_exit_1():
    checks = verdicts("first_order_spec")
    assert checks["double backward"].status == "FAIL"
    assert "once_differentiable" in checks["double backward"].detail
    assert "finite-difference" in checks["double backward"].advice
    result = doctor("--spec", "probe_specs:first_order_spec")
    assert result.exit_code == 1
    assert "1 check(s) failed: double backward" in result.stderr


def test_attention_is_found_and_runs_with_the_math_kernel():
    checks = verdicts("attention_spec")
    assert checks["attention"].status == "OK"
    assert "attention" in checks["attention"].detail and "math kernel" in checks["attention"].detail
    assert checks["double backward"].status == "OK"


def test_flash_attention_implementation_fails():
    checks = verdicts("flash_attention_spec")
    assert checks["attention"].status == "FAIL"
    assert "attn_implementation='sdpa'" in checks["attention"].advice


def test_a_loss_that_is_not_a_scalar_fails_and_skips_what_depends_on_it():
    checks = verdicts("vector_loss_spec")
    assert checks["loss"].status == "FAIL" and "scalar" in checks["loss"].detail
    assert checks["double backward"].status == "SKIP"
    assert checks["per-example gradients"].status == "SKIP"
    assert checks["BatchNorm"].status == "OK"


def test_parameters_in_half_precision_or_frozen():
    spec = load_spec("probe_specs:mlp_spec")
    spec.model.requires_grad_(False)
    assert {c.name: c.status for c in diagnose(spec)}["parameters"] == "FAIL"
    spec = load_spec("probe_specs:mlp_spec")
    spec.model.to(torch.bfloat16)
    spec.probe_data = (spec.probe_data[0].to(torch.bfloat16), spec.probe_data[1])
    parameters = {c.name: c for c in diagnose(spec)}["parameters"]
    assert parameters.status == "WARN" and "bfloat16" in parameters.detail


def test_a_hugging_face_model_with_sdpa():
    pytest.importorskip("transformers")
    checks = verdicts("bert_spec")
    assert checks["attention"].status == "OK" and "scaled_dot_product_attention" in checks["attention"].detail
    assert checks["double backward"].status == "OK"
    assert checks["dropout"].status == "OK"


@pytest.mark.parametrize(
    "args, code, message",
    [(["--spec", "probe_specs:nothing_here"], 1, "has no attribute"),
     (["--spec", "probe_specs:mlp_spec", "--mode", "sideways"], 2, "Invalid value for '--mode'"),
     ([], 2, "Missing option '--spec'")],
)
def test_bad_input(args, code, message):
    result = doctor(*args)
    assert result.exit_code == code
    assert message in result.stderr and result.stdout == ""


def test_the_model_comes_back_unchanged():
    spec = load_spec("probe_specs:bn_dropout_spec")
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    diagnose(spec, mode="train")
    assert all(torch.equal(before[k], v) for k, v in spec.model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert spec.model.training  # a fresh module's flag, as found
    assert probe_specs.SPEC_FILE.endswith("probe_specs.py")


@pytest.mark.parametrize("env, cores, load, status, text", [
    ({}, 2, 0.1, "WARN", "OMP_NUM_THREADS is unset"),
    ({}, 64, 50.0, "WARN", "under a load of 50.0"),
    ({}, 64, 1.0, "OK", "unset; 64 cores"),
    ({"OMP_NUM_THREADS": "1"}, 2, 9.0, "OK", "OMP_NUM_THREADS=1"),
    ({"OMP_NUM_THREADS": "8"}, 2, 0.0, "WARN", "more than the 2 core(s)"),
    ({"OMP_NUM_THREADS": "lots"}, 2, 0.0, "WARN", "not a positive integer"),
])
def test_threads_check(env, cores, load, status, text):
    from geomprobe.doctor import threads_check

    check = threads_check(env, cores=cores, load=load)
    assert check.status == status and text in check.detail
    assert (status == "OK") == (check.advice == "") and ("OMP_NUM_THREADS=1" in check.advice or status == "OK")


def test_doctor_warns_without_omp_num_threads_on_few_cores(monkeypatch):
    import geomprobe.doctor as doctor_module

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(doctor_module, "_cores", lambda: 2)
    result = doctor("--spec", "probe_specs:mlp_spec", "--json")
    assert result.exit_code == 0, result.output  # a warning, not a failure
    threads = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "threads")
    assert threads["status"] == "WARN" and "export OMP_NUM_THREADS=1" in threads["advice"]


def test_installed_script_checks_threads(tmp_path):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from geomprobe.doctor import FEW_CORES, _cores, threads_check

    exe = shutil.which("geomprobe")
    if exe is None:
        pytest.skip("the geomprobe console script is not installed")
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = f"{tests.parent}{os.pathsep}{tests}"
    out = subprocess.run([exe, "doctor", "--spec", "probe_specs:mlp_spec", "--json"], capture_output=True, text=True,
                         env=env, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    threads = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "threads")
    if _cores() <= FEW_CORES:  # few cores and the variable unset: a warning whatever the load
        assert threads["status"] == "WARN" and "export OMP_NUM_THREADS=1" in threads["advice"]
    else:  # many cores: the verdict follows the load, which moves between two readings
        assert threads["status"] in ("OK", "WARN") and threads_check({}, load=0.0).status == "OK"
