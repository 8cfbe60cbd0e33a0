"""The public API: unique names, each importable, none private; and what `import geomprobe` may pull in."""

import subprocess
import sys

import geomprobe as gp


def test_public_names_unique_importable_and_public():
    names = gp.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert not name.startswith("_")
        assert getattr(gp, name) is not None


def test_every_metric_module_is_registered_and_documented():
    for name in gp.metrics.available():
        metric = gp.metrics.get(name)
        assert metric.fn.__doc__ and metric.cost, name


def test_import_loads_no_plotting_no_optional_integrations():
    code = (
        "import sys, geomprobe, geomprobe.report, geomprobe.trajectory\n"
        "bad = [m for m in ('matplotlib', 'lightning', 'transformers', 'pandas', 'sklearn') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
