"""Random vectors: drawn on the target device in its dtype, reproducible per seed, the CPU generator's stream
advancing by one number per draw, and half-precision inner products accumulated in float32."""

import pytest
import torch
from tolerances import HALF_ACCUMULATION_REL, SIGMAS

from geomprobe.linalg import vectors
from geomprobe.linalg.vectors import device_generator, gaussian, rademacher, row_dots, sub_rows, vector_norm

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("draw", [gaussian, rademacher])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_seed_same_vectors_in_the_target_dtype(draw, dtype):
    a = draw((3, 1000), gen(7), dtype, "cpu")
    b = draw((3, 1000), gen(7), dtype, "cpu")
    assert a.dtype == dtype and a.device.type == "cpu" and a.shape == (3, 1000)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw((3, 1000), gen(8), dtype, "cpu"))


@pytest.mark.parametrize("draw", [gaussian, rademacher])
def test_a_draw_advances_the_cpu_generator_by_one_number(draw):
    # whatever the size of the vector, so later draws of a kernel stay reproducible
    g, ref = gen(3), gen(3)
    draw(10_000, g, torch.float32, None)
    torch.randint(0, 2**63 - 1, (1,), generator=ref)
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=ref))
    # successive draws from one generator differ
    assert not torch.equal(draw(100, g, torch.float32, None), draw(100, g, torch.float32, None))


def test_device_generator_per_seed_gives_identical_streams():
    # two ranks seeding from the same CPU generator state draw the same vectors
    x = torch.randn(4096, generator=device_generator(gen(11), "cpu"))
    y = torch.randn(4096, generator=device_generator(gen(11), "cpu"))
    z = torch.randn(4096, generator=device_generator(gen(12), "cpu"))
    assert torch.equal(x, y) and not torch.equal(x, z)


def test_half_types_are_roundings_of_the_float32_draw(monkeypatch):
    # a small slice size, so the half path draws in several float32 slices
    monkeypatch.setattr(vectors, "HALF_CHUNK_ELEMENTS", 1000)
    dg = device_generator(gen(5), "cpu")
    ref = torch.cat([torch.randn(min(1000, 4500 - s), generator=dg) for s in range(0, 4500, 1000)])
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(gaussian(4500, gen(5), dt, None), ref.to(dt))


def test_distributions():
    n = 200_000
    z = rademacher(n, gen(1), torch.float32, None)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) <= SIGMAS / n**0.5
    x = gaussian(n, gen(2), torch.float64, None)
    assert abs(float(x.mean())) <= SIGMAS / n**0.5
    assert abs(float(x.var()) - 1.0) <= SIGMAS * (2 / n) ** 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_products_accumulate_in_float32(monkeypatch, dtype):
    monkeypatch.setattr(vectors, "HALF_CHUNK_ELEMENTS", 4096)  # many slices
    B = torch.randn(3, 50_000, generator=gen(0)).to(dtype)
    w = torch.randn(50_000, generator=gen(1)).to(dtype)
    exact = B.double() @ w.double()
    got = row_dots(B, w)
    assert got.dtype == torch.float32
    # float32 sums of exact products; a result rounded to a half type would be off by ~1e-3 of the scale
    scale = B.double().abs() @ w.double().abs()
    assert bool(((got.double() - exact).abs() <= HALF_ACCUMULATION_REL * scale).all())
    assert float(vector_norm(w)) == pytest.approx(float(w.double().norm()), rel=HALF_ACCUMULATION_REL)
    c = torch.tensor([0.5, -1.0, 2.0])
    want = (w.float() - c @ B.float()).to(dtype)
    out = sub_rows(w.clone(), c, B)
    assert out.dtype == dtype and torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_vectors_are_drawn_on_the_device_and_reproducible(dtype):
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    draws = [gaussian(1 << 20, gen(9), dtype, dev) for dev in devices]
    assert all(d.device == dev and d.dtype == dtype for d, dev in zip(draws, devices))
    assert torch.equal(draws[0], gaussian(1 << 20, gen(9), dtype, devices[0]))
    # every device of one kind (every rank of a job) draws the same vector for the same seed
    assert all(torch.equal(draws[0].cpu(), d.cpu()) for d in draws[1:])
    z = rademacher(1 << 20, gen(9), dtype, devices[0])
    assert z.device == devices[0] and torch.equal(z, rademacher(1 << 20, gen(9), dtype, devices[0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_products_over_column_slices_equal_whole_products(monkeypatch, dtype):
    # BLAS sizes are 32-bit: past PRODUCT_COLUMNS entries (a 7B shard has 3e9) the products go slice by slice.
    # With the slice cut to 7 columns, every kernel must give the whole product to rounding.
    from geomprobe.linalg import vectors as V

    g = torch.Generator().manual_seed(3)
    B = torch.randn(4, 1001, generator=g, dtype=torch.float64)
    w = torch.randn(1001, generator=g, dtype=torch.float64)
    c = torch.randn(4, generator=g, dtype=torch.float64).to(vectors.accumulation_dtype(dtype))  # as Lanczos has it
    Bd, wd = B.to(dtype), w.to(dtype)
    whole = (V.row_dots(Bd, wd), V.vector_norm(wd), V.sub_rows(wd.clone(), c, Bd))
    monkeypatch.setattr(V, "PRODUCT_COLUMNS", 7)
    sliced = (V.row_dots(Bd, wd), V.vector_norm(wd), V.sub_rows(wd.clone(), c, Bd))
    # rows too far apart for BLAS's 32-bit leading dimension: one row at a time
    monkeypatch.setattr(V, "LD_LIMIT", 100)
    by_rows = (V.row_dots(Bd, wd), V.vector_norm(wd), V.sub_rows(wd.clone(), c, Bd))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    ref = (Bd.double() @ wd.double(), wd.double().norm(), wd.double() - c.to(dtype).double() @ Bd.double())
    for a, b, e, r in zip(whole, sliced, by_rows, ref):
        for x in (a, b, e):
            assert torch.allclose(x.double(), r, atol=tol * float(r.abs().max()), rtol=0)
