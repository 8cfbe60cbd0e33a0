"""The README tells the truth: its python snippets run as written, and its quick start names real commands."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(index, tmp_path):
    code = SNIPPETS[index]
    for framework in ("lightning", "transformers"):
        if f"integrations.{framework}" in code and importlib.util.find_spec(framework) is None:
            pytest.skip(f"the snippet needs {framework}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, f"README snippet {index} failed:\n{code}\n{result.stderr[-3000:]}"


def test_import_geomprobe_loads_no_framework_until_an_integration_is_named():
    code = ("import sys, geomprobe as gp\n"
            "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert 'geomprobe.integrations' not in sys.modules\n"
            "gp.integrations\n"
            "assert 'lightning' not in sys.modules, 'the package alone must not import a framework'\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_a_missing_framework_is_one_clear_error():
    code = ("import sys\n"
            "sys.modules['lightning'] = None  # as if lightning were not installed\n"
            "import geomprobe as gp\n"
            "try:\n"
            "    gp.integrations.lightning\n"
            "except ImportError as e:\n"
            "    print(e)\n"
            "for name in ('keras', None):\n"
            "    try:\n"
            "        getattr(gp.integrations, name) if name else gp.nope\n"
            "    except AttributeError as e:\n"
            "        print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "needs lightning, which is not installed" in lines[0] and "geomprobe[lightning]" in lines[0]
    assert "the integrations are lightning, transformers" in lines[1] and "has no attribute 'nope'" in lines[2]


def test_the_quick_start_is_two_command_lines_that_exist():
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README, flags=re.DOTALL).group(1).strip().splitlines()
    assert len(block) == 2 and "geomprobe demo" in block[0] and block[1].strip() == "pytest"
    extras = re.findall(r"\.\[([a-z,]+)\]", block[0])[0].split(",")
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared)
