"""Time goes to HVPs: a spectrum probe on an MLP Landscape spends a small share of its wall time outside the
HVPs (random start vector, orthogonalization, the stopping test). Measured on the CPU, one thread, shared
machine, before the kernel drew its vectors in the model's dtype, dropped the float64 copies and synchronized
once per step, and after: 0.33M parameters, batch 512, 25 steps: 24-25 % outside before, 11-14 % after;
3.2M parameters, batch 1024, to convergence (54-85 steps): 26-31 % before, 11-14 % after. What is left is
the orthogonalization against the stored basis, two passes over it per step, bound by memory bandwidth."""

import time
from itertools import pairwise

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe.metrics.spectrum import spectrum

# the share of a probe's wall time allowed outside its HVPs on the CPU (the GPU target is 10 %);
# the code before the change fails it on both models
OUTSIDE_SHARE_CPU = 0.18


def _timed_landscape(widths, batch):
    torch.manual_seed(0)
    layers = []
    for a, b in pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    X = torch.randn(batch, widths[0])
    y = torch.randint(0, widths[-1], (batch,))
    land = gp.Landscape(model, nn.CrossEntropyLoss(), (X, y))
    hvp, spent = land.hvp, [0.0]

    def timed(v):
        t = time.perf_counter()
        out = hvp(v)
        spent[0] += time.perf_counter() - t
        return out

    land.hvp = timed
    land.hvp(torch.zeros(land.dim))  # first-call costs belong to neither side
    return land, spent


def _outside_share(land, spent, **kw):
    spent[0] = 0.0
    t = time.perf_counter()
    out = spectrum(land, **kw)
    total = time.perf_counter() - t
    return (total - spent[0]) / total, out


def test_spectrum_time_goes_to_hvps():
    land, spent = _timed_landscape([128, 512, 512, 10], batch=512)
    # a second run only if the first fails: the machine is shared, and a stall elsewhere lands on either
    # side at random
    shares = []
    for seed in (1, 2):
        shares.append(_outside_share(land, spent, tol=1e-3, max_iter=25, seed=seed)[0])
        if shares[-1] <= OUTSIDE_SHARE_CPU:
            break
    print("share of wall time outside HVPs:", shares)
    assert min(shares) <= OUTSIDE_SHARE_CPU, shares


@pytest.mark.slow
def test_spectrum_time_goes_to_hvps_at_three_million_parameters():
    land, spent = _timed_landscape([512, 2048, 1024, 10], batch=1024)
    share, out = _outside_share(land, spent, tol=1e-3, max_iter=150, seed=1)
    assert out["converged"]
    assert share <= OUTSIDE_SHARE_CPU, (share, out["hvps"])


def test_the_tridiagonal_solver_is_imported_beside_the_first_product():
    # a fresh process: scipy.linalg (~0.2 s to import) is loaded on a thread started before the first product,
    # which here waits until the import has finished, and the run's own import finds it loaded
    import subprocess
    import sys

    code = (
        "import sys, threading, torch\n"
        "from geomprobe.linalg import lanczos\n"
        "assert 'scipy.linalg' not in sys.modules\n"
        "names = []\n"
        "def mv(v):\n"
        "    if not names:\n"
        "        names.extend(t.name for t in threading.enumerate())\n"
        "        [t.join() for t in threading.enumerate() if t.name == 'geomprobe-import-scipy']\n"
        "        assert 'scipy.linalg' in sys.modules\n"
        "    return v * torch.arange(1.0, 51.0, dtype=torch.float64)\n"
        "r = lanczos(mv, 50, tol=1e-8)\n"
        "assert 'geomprobe-import-scipy' in names and r.converged, names\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_geometry_probe_loads_the_solver_when_built_not_in_its_first_probe():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import geomprobe as gp\n"
        "assert 'scipy.linalg' not in sys.modules\n"
        "m = nn.Linear(3, 1)\n"
        "gp.GeometryProbe(m, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 1)), metrics=['spectrum'],\n"
        "                 schedule=gp.manual(), run_dir=None)\n"
        "assert 'scipy.linalg' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
