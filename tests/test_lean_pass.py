"""A lean run's whole-basis step reads each stored row once (``linalg.lean_pass``): the three-term part's newest
and previous rows come with the pass instead of before it. Checked against the resident run's values (float64,
known spectra, every step a pass with ``reorth="full"``, and a matvec whose own asymmetry forces the passes) and by
counting the rows that reach the compute device at each step."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from test_lean_lanczos import Product, _matrix, _spectrum

from geomprobe.linalg import krylov_basis
from geomprobe.linalg.krylov_basis import LanczosBasis
from geomprobe.linalg.lean_vectors import LeanVectors

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


@pytest.mark.parametrize("mode", ["device", "streamed"])
def test_a_whole_basis_step_reads_each_stored_row_once_and_keeps_the_resident_values(mode, monkeypatch):
    ev = _spectrum(400, 1)
    H = _matrix(ev, 1)
    reads: list[int] = []
    per_step: list[tuple[int, int]] = []  # (rows stored at the step, rows brought to the device during it)
    on_compute = LanczosBasis._on_compute
    step = krylov_basis.krylov_step

    def counted(self, rows, device):
        reads.append(rows.shape[0])
        return on_compute(self, rows, device)

    def spy(matvec, basis, cur, dim, dtype, j, prev=None, *a, **k):
        before, n = len(reads), basis.n
        out = step(matvec, basis, cur, dim, dtype, j, prev, *a, **k)
        if prev is not None:
            per_step.append((n, sum(reads[before:])))
        return out

    refills = []
    refill = LeanVectors.refill
    monkeypatch.setattr(LeanVectors, "refill", lambda self, v, row: refills.append(1) or refill(self, v, row))
    monkeypatch.setattr(LanczosBasis, "_on_compute", counted)
    monkeypatch.setattr(lanczos_module, "krylov_step", spy)
    kw = {"dtype": torch.float64, "tol": 1e-8, "k": 2, "reorth": "full", "max_iter": 200}
    lean = lanczos_module.lanczos(Product(H), 400, generator=torch.Generator().manual_seed(2), lean=mode,
                                  basis_device="cpu", **kw)
    monkeypatch.setattr(lanczos_module, "krylov_step", step)
    res = lanczos_module.lanczos(lambda v: H @ v, 400, generator=torch.Generator().manual_seed(2), **kw)
    assert lean.converged and lean.matvecs == res.matvecs
    assert np.allclose(lean.ritz_values.numpy(), res.ritz_values.numpy(), rtol=0, atol=1e-10)
    for theta, b in zip(lean.ritz_values.tolist(), lean.bounds.tolist()):
        assert float((ev - theta).abs().min()) <= b + 1e-12
    # each stored row once (the newest one too where the product read it from the host), no repass here
    assert per_step and all(got == (n if mode == "streamed" else n - 1) for n, got in per_step), per_step
    assert refills == []  # the newest row is not brought back before the pass, which brings it


def test_an_asymmetric_matvec_still_shows_through_the_previous_rows_coefficient():
    # the previous row's coefficient after beta_{j-1} v_{j-1} is the matvec's asymmetry, as the local pass measured
    # it: a product off by an antisymmetric part sends the run to whole-basis steps and reports that asymmetry
    n = 300
    H = _matrix(_spectrum(n, 4), 4)
    E = torch.randn(n, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1e-5
    noisy = H + (E - E.T)
    kw = {"dtype": torch.float64, "tol": 1e-8, "k": 1, "generator": None}
    lean = lanczos_module.lanczos(Product(noisy), n, lean="streamed", basis_device="cpu",
                                  **{**kw, "generator": torch.Generator().manual_seed(6)})
    plain = lanczos_module.lanczos(lambda v: noisy @ v, n, **{**kw, "generator": torch.Generator().manual_seed(6)})
    assert "the matvec's asymmetry" in lean.reorth_regime and lean.reorth_regime == plain.reorth_regime
    assert lean.asymmetry == pytest.approx(plain.asymmetry, rel=1e-6)
    assert abs(lean.top(1)[0][0] - plain.top(1)[0][0]) < 1e-9 and lean.matvecs == plain.matvecs
