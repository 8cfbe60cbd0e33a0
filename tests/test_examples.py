"""The examples/ scripts run as users run them (a subprocess, the worktree's code) and write the run they say."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import geomprobe as gp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {  # script: (the framework it needs, the run folder inside its argument, the last step trained)
    "plain_loop.py": (None, ".", 100),
    "lightning_loop.py": ("lightning", ".", 50),
    "hf_trainer.py": ("transformers", ".", 12),
    "checkpoint_probing.py": (None, "run", 60),
}


def run_script(path: Path, *args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


# The plain loop runs in the default suite; the others take 9-12 s each (the frameworks' imports, a checkpoint run)
# and their integrations have fast tests of their own (test_integrations.py, test_cli_probe.py): `-m slow`.
SLOW_EXAMPLES = {"lightning_loop.py", "hf_trainer.py", "checkpoint_probing.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_EXAMPLES else s
                                    for s in sorted(EXAMPLES)])
def test_example_runs_and_writes_its_run(script, tmp_path):
    needs, sub, last = EXAMPLES[script]
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{script} needs {needs}")
    out = tmp_path / "out"
    result = run_script(ROOT / "examples" / script, str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run = gp.RunReader(out / sub)
    records = [r for r in run.records if r.get("kind") != "schedule"]
    assert len(records) >= 2 and all("errors" not in r for r in records), records[0].get("errors")
    lam = [r["spectrum"]["lambda_max"] for r in records]
    assert all(x > 0 for x in lam)  # a classifier's loss has positive curvature along its top direction
    assert "Traceback" not in result.stderr
    assert records[-1]["step"] == last  # the end of training is measured, by the schedule or the final probe


def test_examples_are_all_tested():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")
               if not p.name.startswith(("study_", "probe_spec_example"))}
    assert scripts == set(EXAMPLES), "a new example needs a line in EXAMPLES"
