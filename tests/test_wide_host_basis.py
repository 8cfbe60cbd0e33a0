"""A half-precision model's Lanczos basis kept in float32 (linalg/lanczos.py ``basis_dtype``, LanczosBasis
``round_to``, the host-vector Landscape's float32 products): every stored row holds exactly the half-precision
vector the product reads; a run on a bf16 product finds the same extremes as the bf16 basis, bounds covering the
truth; host products of float32 vectors are at least as accurate as bf16 ones. An option of the kernel, not
of the metrics' plan."""

from __future__ import annotations

import copy

import torch
from lanczos_helpers import known_spectrum
from reference import make_case

import geomprobe as gp
from geomprobe.errors import ConfigurationError
from geomprobe.linalg.krylov_basis import LanczosBasis
from geomprobe.linalg.lanczos import lanczos
from geomprobe.metrics import spectrum
from geomprobe.metrics._common import plan_options


def _bf16_product(d: int, seed: int = 1):
    """A known spectrum's matvec that reads its input in bf16 and answers in bf16, as a bf16 HVP does (the input
    rounded to the product's type first: a row that is not bf16-exact would be read as another vector)."""
    H, ev = known_spectrum(d, torch.float64, seed=seed)
    seen = []

    def mv(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.dtype)
        return H(v.to(torch.bfloat16).double()).to(torch.bfloat16).to(v.dtype)

    return mv, ev, seen


def test_rows_hold_exactly_the_half_precision_values_the_product_reads():
    basis = LanczosBasis(1000, torch.float32, torch.device("cpu"), round_to=torch.bfloat16)
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    row = basis.append_normalized(w.clone(), 3.0)
    assert row.dtype == torch.float32
    assert torch.equal(row, row.to(torch.bfloat16).float())  # bf16-exact
    assert torch.equal(row, (w / 3.0).to(torch.bfloat16).float())  # the nearest bf16 values, not truncated
    again = basis.append(w.clone())
    assert torch.equal(again, w.to(torch.bfloat16).float())
    # a basis of the product's own type rounds nothing
    same = LanczosBasis(1000, torch.float32, torch.device("cpu"), round_to=torch.float32)
    assert torch.equal(same.append(w.clone()), w)


def test_a_float32_basis_on_a_bf16_product_finds_the_same_extremes_more_orthogonally():
    d = 600
    mv, ev, seen = _bf16_product(d)
    narrow = lanczos(mv, d, k=1, tol=1e-3, dtype=torch.bfloat16, device="cpu", keep_basis=True,
                     generator=torch.Generator().manual_seed(3))
    mv2, _, seen2 = _bf16_product(d)
    wide = lanczos(mv2, d, k=1, tol=1e-3, dtype=torch.bfloat16, basis_dtype=torch.float32, device="cpu",
                   keep_basis=True, generator=torch.Generator().manual_seed(3))
    assert set(seen2) == {torch.float32} and set(seen) == {torch.bfloat16}
    V = wide.basis
    assert V.dtype == torch.float32 and torch.equal(V, V.to(torch.bfloat16).float())
    assert wide.converged and narrow.converged
    scale = float(ev.abs().max())
    for r in (wide, narrow):
        # each extreme within its bound of an eigenvalue, up to the bf16 product's own error (2^-8 ||H||)
        for theta, b in ((r.ritz_values[-1], r.bounds[-1]), (r.ritz_values[0], r.bounds[0])):
            assert float((ev - theta).abs().min()) <= float(b) + 2**-8 * scale
    assert abs(float(wide.ritz_values[-1]) - 40.0) < 2**-7 * scale
    assert abs(float(wide.ritz_values[0]) + 6.0) < 2**-7 * scale
    # orthogonality: the bf16 rows' own rounding (2^-8) bounds the narrow basis; the wide one is orthonormal
    # to the bf16 values it stores, at least as well
    eye = torch.eye(V.shape[0])
    wide_defect = float((V @ V.T - eye).abs().max())
    Vn = narrow.basis.float()
    narrow_defect = float((Vn @ Vn.T - torch.eye(Vn.shape[0])).abs().max())
    assert wide_defect < 2e-2 and wide_defect <= narrow_defect * 1.5 + 1e-3


def test_a_capped_float32_basis_restarts_and_still_covers_the_extremes():
    d = 600
    mv, ev, _ = _bf16_product(d, seed=2)
    r = lanczos(mv, d, k=2, tol=1e-4, max_basis=10, dtype=torch.bfloat16, basis_dtype=torch.float32,
                device="cpu", generator=torch.Generator().manual_seed(5))
    assert r.restarts > 0 and r.basis_peak <= 10
    scale = float(ev.abs().max())
    assert abs(float(r.ritz_values[-1]) - 40.0) <= float(r.bounds[-1]) + 2**-8 * scale
    assert abs(float(r.ritz_values[0]) + 6.0) <= float(r.bounds[0]) + 2**-8 * scale


def _bf16_case():
    model, loss, batches, _ = make_case("tanh_mlp")
    exact = gp.Landscape(model, loss, batches)  # float64: the reference
    model = copy.deepcopy(model).to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    return exact, gp.Landscape(model, loss, batches, vector_device="cpu"), gp.Landscape(model, loss, batches)


def test_host_products_of_float32_vectors_are_bf16_products_summed_in_float32():
    exact, host, device = _bf16_case()
    V = torch.randn(2, host.dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = exact.hvp(V.double())
    err = lambda H: float((H.double() - ref).norm() / ref.norm())  # noqa: E731
    wide = host.hvp(V.float())
    assert wide.dtype == torch.float32 and wide.device.type == "cpu"
    narrow = host.hvp(V)
    assert narrow.dtype == torch.bfloat16
    # the same bf16 inputs; the float32 sums round once at the end where the bf16 ones round at every addition
    assert err(wide) <= err(narrow) + 2**-9 and err(wide) < 0.05
    assert float((wide - narrow.float()).norm() / narrow.float().norm()) < 2**-6
    out = torch.empty(host.dim, dtype=torch.float32)
    assert host.hvp(V[0].float(), out=out) is out and torch.equal(out, wide[0])
    # a float32 vector that is not bf16-exact is read as its bf16 rounding
    x = torch.randn(host.dim, generator=torch.Generator().manual_seed(2))
    assert torch.equal(host.hvp(x), host.hvp(x.to(torch.bfloat16).float()))
    # an out of the wrong width is refused before any work, saying what the result is
    before = host.hvps
    try:
        host.hvp(V[0], out=torch.empty(host.dim, dtype=torch.float32))
    except ConfigurationError as e:
        assert "dtype torch.float32" in str(e) and "bfloat16" in str(e)
    else:
        raise AssertionError("a float32 out for a bf16 vector was accepted")
    assert host.hvps == before
    # the device mode keeps its own type: a float32 vector is converted, as before
    assert device.hvp(V[0].float()).dtype == torch.bfloat16


def test_lanczos_on_a_host_landscapes_float32_vectors_finds_its_extremes():
    exact, host, _ = _bf16_case()
    ref = spectrum(exact, tol=1e-6)
    r = lanczos(host.hvp, host.dim, k=1, tol=1e-3, dtype=torch.bfloat16, basis_dtype=torch.float32, device="cpu",
                generator=torch.Generator().manual_seed(0))
    assert r.converged
    scale = max(abs(ref["lambda_max"]), abs(ref["lambda_min"]))
    # within its bound plus the bf16 model's own distance from the float64 one (weights and products rounded)
    assert abs(float(r.ritz_values[-1]) - ref["lambda_max"]) <= float(r.bounds[-1]) + 0.05 * scale
    assert abs(float(r.ritz_values[0]) - ref["lambda_min"]) <= float(r.bounds[0]) + 0.05 * scale
    # not a default: measured slower on the 1B Llama's host-vector plan (benchmarks/RESULTS.md section 6)
    assert set(plan_options(host)) == {"delayed", "selective"}


def test_a_basis_narrower_than_the_product_is_refused():
    mv, _, _ = _bf16_product(50)
    for bad in (torch.bfloat16, torch.int32):
        try:
            lanczos(mv, 50, dtype=torch.float32, basis_dtype=bad, device="cpu")
        except ConfigurationError as e:
            assert "basis_dtype" in str(e) and "at least as precise" in str(e)
        else:
            raise AssertionError(f"basis_dtype={bad} was accepted for a float32 product")
