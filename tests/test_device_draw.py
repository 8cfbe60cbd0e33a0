"""Host vectors drawn on an accelerator (linalg/device_draw.py) and the Lanczos start that takes them
(krylov_start.start_basis): the pieces reproduce the device's own stream, a unit vector is one, the draw lands
in the basis's first row, and the run is the run of that start. On the CPU the draw device is the CPU itself
(the same code, without page-locked staging); the GPU test draws on CUDA."""

from __future__ import annotations

import pytest
import torch

from geomprobe.linalg import krylov_start
from geomprobe.linalg.device_draw import drawn_on_device, draws_elsewhere
from geomprobe.linalg.krylov_start import start_basis
from geomprobe.linalg.lanczos import lanczos
from geomprobe.linalg.space import VectorSpace
from geomprobe.linalg.vectors import device_generator


def _expected(dim: int, seed: int, piece: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """The stream drawn_on_device promises: one device generator from the caller's seed, pieces of ``piece``."""
    g0 = device_generator(torch.Generator().manual_seed(seed), device)
    g = torch.Generator(device=device).manual_seed(g0.initial_seed())
    draw = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    parts = [torch.randn(min(piece, dim - s), generator=g, dtype=draw, device=device).to(dtype)
             for s in range(0, dim, piece)]
    return torch.cat(parts).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pieces_are_the_device_stream(dtype):
    dim, piece = 1000, 96  # pieces that do not divide the vector
    x = drawn_on_device(dim, torch.Generator().manual_seed(3), dtype, "cpu", piece=piece)
    assert x.device.type == "cpu" and x.dtype == dtype and x.shape == (dim,)
    assert torch.equal(x, _expected(dim, 3, piece, dtype))
    again = drawn_on_device(dim, torch.Generator().manual_seed(3), dtype, "cpu", piece=piece)
    other = drawn_on_device(dim, torch.Generator().manual_seed(4), dtype, "cpu", piece=piece)
    assert torch.equal(x, again) and not torch.equal(x, other)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14), (torch.bfloat16, 1e-2)])
def test_unit_vector(dtype, tol):
    dim, piece = 5000, 777
    raw = drawn_on_device(dim, torch.Generator().manual_seed(0), dtype, "cpu", piece=piece)
    unit = drawn_on_device(dim, torch.Generator().manual_seed(0), dtype, "cpu", piece=piece, unit=True)
    norm = float(unit.double().norm())
    assert abs(norm - 1) < tol
    # the same direction: each entry the raw one over the raw vector's norm, to one rounding of dtype and the
    # norm's own rounding (a sum of 5000 squares, pairwise in pieces)
    ref = raw.double() / raw.double().norm()
    eps = torch.finfo(dtype).eps
    assert float((unit.double() - ref).abs().max()) <= 8 * eps * float(ref.abs().max())


def test_out_is_written_and_bad_input_refused():
    out = torch.full((300,), 7.0)
    got = drawn_on_device(300, torch.Generator().manual_seed(1), torch.float32, "cpu", out=out, piece=64)
    assert got is out and torch.equal(out, _expected(300, 1, 64, torch.float32))
    with pytest.raises(ValueError, match="out must be"):
        drawn_on_device(300, torch.Generator(), torch.float32, "cpu", out=torch.empty(299))
    with pytest.raises(ValueError, match="out must be"):
        drawn_on_device(300, torch.Generator(), torch.float32, "cpu", out=torch.empty(300, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim must be positive"):
        drawn_on_device(0, torch.Generator(), torch.float32, "cpu")


def test_draws_elsewhere_only_for_host_vectors_and_an_accelerator(monkeypatch):
    assert not draws_elsewhere("cpu", None)
    assert not draws_elsewhere("cpu", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert draws_elsewhere("cpu", "cuda") and draws_elsewhere(None, torch.device("cuda", 0))
    assert not draws_elsewhere("cuda", "cuda")  # device vectors draw where they live
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not draws_elsewhere("cpu", "cuda")


def _draw_here(monkeypatch):
    """start_basis as on a machine with an accelerator, whose part the CPU plays (draw_device="cpu")."""
    monkeypatch.setattr(krylov_start, "draws_elsewhere", lambda device, draw_device: draw_device is not None)


def test_start_lands_in_the_first_row(monkeypatch):
    _draw_here(monkeypatch)
    dim = 4000
    basis, cur = start_basis(VectorSpace(dim), None, torch.Generator().manual_seed(5), torch.float32, "cpu",
                             draw_device="cpu")
    assert basis.n == 1 and basis.on_host
    row = next(iter(basis._filled()))[0]
    assert cur.data_ptr() == row.data_ptr()  # written once, into the row: no second host vector
    expected = drawn_on_device(dim, torch.Generator().manual_seed(5), torch.float32, "cpu", unit=True)
    assert torch.equal(cur, expected)
    # a wider basis (float32 rows of a bf16 run) stores the bf16 start, rounded as the matvec reads it
    basis, cur = start_basis(VectorSpace(dim), None, torch.Generator().manual_seed(5), torch.bfloat16, "cpu",
                             basis_dtype=torch.float32, draw_device="cpu")
    assert cur.dtype == torch.float32
    bf = drawn_on_device(dim, torch.Generator().manual_seed(5), torch.bfloat16, "cpu", unit=True)
    assert torch.equal(cur, bf.float())


def test_without_a_draw_device_the_start_is_unchanged(monkeypatch):
    dim = 3000
    _, plain = start_basis(VectorSpace(dim), None, torch.Generator().manual_seed(2), torch.float64, "cpu")
    q = VectorSpace(dim).gaussian(torch.Generator().manual_seed(2), torch.float64, "cpu")
    assert torch.allclose(plain, q / q.norm(), rtol=0, atol=1e-15)
    _draw_here(monkeypatch)
    v0 = torch.ones(dim, dtype=torch.float64)  # a given start is never drawn
    _, given = start_basis(VectorSpace(dim), v0, None, torch.float64, "cpu", draw_device="cpu")
    assert torch.allclose(given, v0 / v0.norm(), rtol=0, atol=1e-15)


def test_lanczos_from_the_device_drawn_start(monkeypatch):
    """The run from the drawn start finds the known extremes of a diagonal matrix, and its first Lanczos vector
    is the drawn one (the same seed drawn by drawn_on_device)."""
    _draw_here(monkeypatch)
    d = 2000
    diag = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    diag[-1], diag[0] = 10.0, -5.0
    r = lanczos(lambda v: diag * v, d, tol=1e-8, generator=torch.Generator().manual_seed(9), dtype=torch.float64,
                device="cpu", keep_basis=True, draw_device="cpu", max_iter=200)
    assert r.converged
    assert abs(r.top(1)[0][0] - 10.0) < 1e-6 and abs(r.bottom(1)[0][0] + 5.0) < 1e-6
    q0 = drawn_on_device(d, torch.Generator().manual_seed(9), torch.float64, "cpu", unit=True)
    assert torch.equal(r.basis_blocks[0][0], q0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draw_through_page_locked_staging():
    dim, piece = 3_000_001, 1 << 20
    x = drawn_on_device(dim, torch.Generator().manual_seed(11), torch.float32, "cuda", piece=piece)
    assert x.device.type == "cpu"
    assert torch.equal(x, _expected(dim, 11, piece, torch.float32, "cuda"))
    u = drawn_on_device(dim, torch.Generator().manual_seed(11), torch.bfloat16, "cuda", piece=piece, unit=True)
    assert abs(float(u.double().norm()) - 1) < 1e-2


def test_refused_page_locked_staging_falls_back_to_pageable(monkeypatch):
    from geomprobe.linalg import device_draw

    real_empty = torch.empty

    def refusing(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refusing)
    bufs, pinned = device_draw._staging(64, torch.float32, True)
    assert not pinned and len(bufs) == 2 and all(b.shape == (64,) and not b.is_pinned() for b in bufs)
    monkeypatch.setattr(torch, "empty", real_empty)
    bufs, pinned = device_draw._staging(64, torch.float32, False)
    assert not pinned


def test_the_probes_spectrum_draws_its_cold_start_there_too(monkeypatch):
    """spectrum with a WarmStart (the probe's route) and no kept vectors yet starts cold: from the start drawn
    on the accelerator, the CPU playing it; the same run as spectrum without a WarmStart."""
    from torch import nn

    import geomprobe as gp
    from geomprobe.metrics import spectrum
    from geomprobe.probe import WarmStart

    drawn = []

    def counted(*a, **k):
        drawn.append(a[0])
        return drawn_on_device(*a, **k)

    monkeypatch.setattr(krylov_start, "draws_elsewhere", lambda device, draw_device: draw_device is not None)
    monkeypatch.setattr(krylov_start, "drawn_on_device", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    data = (torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64))
    land = gp.Landscape(model, nn.MSELoss(), data)
    warm = spectrum(land, k=1, tol=1e-8, warm=WarmStart())
    assert drawn == [land.dim]
    cold = spectrum(gp.Landscape(model, nn.MSELoss(), data), k=1, tol=1e-8)
    assert drawn == [land.dim, land.dim]
    assert warm["lambda_max"] == pytest.approx(cold["lambda_max"], rel=1e-12)
    exact = float(torch.linalg.eigvalsh(_dense(land)).max())  # the dense float64 Hessian, column by column
    assert abs(warm["lambda_max"] - exact) <= max(warm["lambda_max_err"], 1e-8 * abs(exact))


def _dense(land) -> torch.Tensor:
    eye = torch.eye(land.dim, dtype=torch.float64)
    return torch.stack([land.hvp(e) for e in eye])
