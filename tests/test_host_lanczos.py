"""The chunked host-memory (CPU) Krylov arithmetic of :mod:`geomprobe.linalg.host_arith`: dots, updates, norms,
the fused passes of a Lanczos step, the rotation of a basis and the Ritz vectors, against float64 references
with stated tolerances, at column counts that chunks do not divide, with empty and one-row bases; and whole
host-mode Lanczos runs on known spectra against the truth and against the unfused step."""

from __future__ import annotations

import pytest
import torch
from tolerances import BF16_REL, FLOAT64_EXACT

from geomprobe.linalg import host_arith as HA
from geomprobe.linalg import krylov_basis as KB
from geomprobe.linalg import vectors as V
from geomprobe.linalg.krylov_basis import LanczosBasis, krylov_step
from geomprobe.linalg.lanczos import lanczos

U32 = 2.0**-24  # float32 unit roundoff: the accumulation type of the half and float32 passes
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
ACC_U = {torch.bfloat16: U32, torch.float16: U32, torch.float32: U32, torch.float64: 2.0**-53}
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
D = 1001  # a prime number of columns: no chunk width below divides it


@pytest.fixture(params=["matrix-vector", "elementwise"])
def products(request, monkeypatch):
    """Both forms of a chunk's products: BLAS matrix-vector products (one or two threads) and the elementwise
    products with row sums that every thread shares (forced here whatever the thread count)."""
    monkeypatch.setattr(HA, "PARALLEL_PRODUCTS_FROM_THREADS", 10**6 if request.param == "matrix-vector" else 1)
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(n: int, dtype: torch.dtype, seed: int = 0, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)


def dot_bound(B: torch.Tensor, w: torch.Tensor, width: int) -> torch.Tensor:
    # a float sum of at most ``width`` products per chunk (chunks added in float64): width * u * sum |B_ij w_j|
    return width * ACC_U[w.dtype] * (B.double().abs() @ w.double().abs()) * 1.01 + 1e-300


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("width", [77, 1000, None])
def test_dots_and_norms_equal_the_float64_reference(dtype, rows, width, products):
    B, w = data(rows, dtype, seed=rows)
    got = HA.host_dots(B, w, width=width)
    ref = B.double() @ w.double()
    cols = width or D
    assert got.dtype == torch.float64 and got.shape == (rows,)
    assert bool(((got - ref).abs() <= dot_bound(B, w, cols)).all())
    nsq = HA.host_norm_sq(w, width=width)
    ref_n = w.double().square().sum()
    assert abs(float(nsq - ref_n)) <= cols * ACC_U[dtype] * float(ref_n) * 1.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 6, 17])
@pytest.mark.parametrize("width", [64, 333, None])
def test_sub_rows_rounds_once_from_the_float_accumulation(dtype, rows, width, products):
    B, w = data(rows, dtype, seed=10 + rows)
    c = torch.randn(rows, generator=gen(rows), dtype=torch.float64)
    ref = w.double() - c @ B.double()
    out = HA.host_sub(w.clone(), c, B, width=width)
    # one rounding to w's type of a float32 (float64) sum of rows + 1 terms, the coefficients rounded to it too
    acc = (rows + 2) * ACC_U[dtype] * (w.double().abs() + c.abs() @ B.double().abs())
    assert bool(((out.double() - ref).abs() <= UNIT[dtype] * ref.abs() + acc * 1.01 + 1e-300).all())
    if dtype in (torch.bfloat16, torch.float16) and rows > 1:
        # the one rounding is what makes it exact to the type: a per-row update in the half type is not
        seq = w.clone()
        for i in range(rows):
            seq.sub_(B[i], alpha=float(c[i]))
        assert (out.double() - ref).abs().sum() < (seq.double() - ref).abs().sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_public_kernels_take_the_host_path_for_half_types(dtype, monkeypatch):
    monkeypatch.setattr(HA, "HOST_CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(HA, "MIN_COLUMNS", 16)
    B, w = data(5, dtype, seed=3)
    cols = HA.columns(5)
    assert D % cols != 0  # chunks that do not divide the columns
    got = V.row_dots(B, w)
    assert got.dtype == torch.float32
    ref = B.double() @ w.double()
    assert bool(((got.double() - ref).abs() <= dot_bound(B, w, cols) + 2 * U32 * ref.abs()).all())
    n = V.vector_norm(w)
    assert n.dtype == torch.float32
    assert float(n) == pytest.approx(float(w.double().norm()), rel=4 * U32 + HA.columns(0) * U32)
    c = torch.randn(5, generator=gen(1))
    out = V.sub_rows(w.clone(), c, B)
    assert torch.equal(out, HA.host_sub(w.clone(), c, B))


def test_empty_and_one_row_bases(products):
    for dtype in DTYPES:
        B, w = data(3, dtype)
        assert HA.host_dots(B[:0], w).shape == (0,)
        assert V.row_dots(B[:0], w).shape == (0,)
        kept = w.clone()
        assert torch.equal(HA.host_sub(w, torch.zeros(0), B[:0]), kept)
        assert torch.equal(V.sub_rows(w, torch.zeros(0), B[:0]), kept)
        assert HA.lanczos_pass(w, [], dots=True)[0].shape == (0,)
        one = HA.host_dots(B[:1], w, width=10)
        assert abs(float(one[0]) - float(B[0].double() @ w.double())) <= float(dot_bound(B[:1], w, 10)[0])


def test_strided_rows_and_rows_past_the_32_bit_leading_dimension(monkeypatch):
    # rows farther apart than BLAS's 32-bit leading dimension go through the scratch even in float32
    B, w = data(4, torch.float32, d=2 * D)
    Bs, ws = B[:, ::2], w[::2]  # column stride 2: not contiguous
    ref = Bs.double() @ ws.double()
    assert bool(((HA.host_dots(Bs, ws, width=100) - ref).abs() <= dot_bound(Bs, ws, 100)).all())
    monkeypatch.setattr(HA, "LD_LIMIT", 100)
    B, w = data(4, torch.float32)
    ref = B.double() @ w.double()
    assert bool(((HA.host_dots(B, w, width=100) - ref).abs() <= dot_bound(B, w, 100)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_pass_equals_its_steps(dtype, products):
    # three-term step, then the products of the stored (rounded) vector and its norm, from one pass; the same
    # with the second three-term vector in another group (read on its own)
    B, w = data(6, dtype, seed=5)
    beta, alpha = 0.75, -1.25
    for groups, prev in (([B], B[4]), ([B[:5], B[5:]], B[4])):
        x = w.clone()
        dots, nsq = HA.lanczos_pass(x, groups, pre=[(prev, beta), (B[5], alpha)], dots=True, norm=True, width=100)
        want = w.double() - beta * B[4].double() - alpha * B[5].double()
        acc = 3 * ACC_U[dtype] * (w.double().abs() + beta * B[4].double().abs() + abs(alpha) * B[5].double().abs())
        assert bool(((x.double() - want).abs() <= UNIT[dtype] * want.abs() + acc * 1.01).all())
        ref = B.double() @ x.double()  # the stored vector's products, not the unrounded one's
        assert bool(((dots - ref).abs() <= dot_bound(B, x, 100)).all())
        assert abs(float(nsq - x.double().square().sum())) <= 100 * U32 * float(x.double().square().sum())
    with pytest.raises(ValueError, match="single row group"):
        HA.lanczos_pass(w, [B[:3], B[3:]], sub=torch.zeros(6), dots=True)
    with pytest.raises(ValueError, match="host"):
        HA.lanczos_pass(w.to("meta"), [B.to("meta")], dots=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_rotation_in_place_and_ritz_vectors(dtype, products):
    g = gen(9)
    basis = LanczosBasis(D, dtype, "cpu", capacity=20)
    assert basis.on_host
    Q, _ = torch.linalg.qr(torch.randn(D, 20, dtype=torch.float64, generator=g))
    for i in range(20):  # 20 rows: two blocks of 16 and 4
        basis.append(Q[:, i].to(dtype))
    before = torch.cat(list(basis._filled())).double()
    Y = torch.linalg.qr(torch.randn(20, 7, dtype=torch.float64, generator=g))[0]
    basis.rotate(Y)
    got = torch.cat(list(basis._filled())).double()
    want = Y.T @ before
    acc = 20 * ACC_U[dtype] * (Y.T.abs() @ before.abs())
    assert basis.n == 7 and bool(((got - want).abs() <= UNIT[dtype] * want.abs() + acc * 1.01).all())
    # Ritz vectors of a blocked host basis: unit rows along V u_i
    from geomprobe.linalg.ritz import LanczosResult

    blocks = [b.clone() for b in (before[:16], before[16:])]
    blocks = [b.to(dtype) for b in blocks]
    stored = torch.cat(blocks).double()
    U = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=g))[0]
    r = LanczosResult(ritz_values=torch.arange(20.0, dtype=torch.float64), bounds=torch.zeros(20), steps=20,
                      converged=True, matvecs=20, alpha=torch.zeros(20), beta=torch.zeros(19), U=U,
                      basis_blocks=blocks)
    X = r.ritz_vectors([19, 0, 5])
    assert X.dtype == dtype and X.shape == (3, D)
    for row, i in zip(X, (19, 0, 5)):
        ref = U[:, i] @ stored
        ref = ref / ref.norm()
        # two roundings (the product, then the quotient) besides float32 sums of 20 products
        tol = 2 * UNIT[dtype] * ref.abs() + 21 * ACC_U[dtype] * (U[:, i].abs() @ stored.abs()) * 1.01 / ref.norm()
        assert bool(((row.double() - ref).abs() <= tol + 1e-300).all())


def test_append_normalized_writes_the_quotient_into_the_basis():
    basis = LanczosBasis(D, torch.bfloat16, "cpu", capacity=2)
    w = data(1, torch.bfloat16)[1]
    kept = w.clone()
    row = basis.append_normalized(w, 3.0)
    assert torch.equal(row, kept / 3.0) and torch.equal(w, kept)  # the same operation; w left as it was
    assert row.untyped_storage().data_ptr() == basis.blocks[0].untyped_storage().data_ptr()
    assert basis.n == basis.peak == 1
    basis.append_normalized(w, 2.0)
    with pytest.raises(RuntimeError, match="full"):
        basis.append_normalized(w, 2.0)


def test_gaussian_draws_through_one_buffer_give_the_same_values(monkeypatch):
    monkeypatch.setattr(V, "HALF_CHUNK_ELEMENTS", 1000)
    got = V.gaussian(3500, V.default_generator(3), torch.bfloat16)
    g = V.device_generator(V.default_generator(3))
    ref = torch.cat([torch.randn(n, generator=g) for n in (1000, 1000, 1000, 500)]).to(torch.bfloat16)
    assert torch.equal(got, ref)


def _step_pair(dtype, prev_given, repass=False):
    """The fused host step and the generic step (forced) from the same basis and matvec output."""
    g = gen(21)
    d = 3000
    Q, _ = torch.linalg.qr(torch.randn(d, 6, dtype=torch.float64, generator=g))
    out = []
    for fused in (True, False):
        basis = LanczosBasis(d, dtype, "cpu", capacity=8)
        for i in range(6):
            basis.append(Q[:, i].to(dtype))
        cur, prev = basis.blocks[0][5], basis.blocks[0][4] if prev_given else None
        # H v: mostly along the basis (alpha, beta_prev large) plus a small new direction; with ``repass``
        # nearly all of it in the span, so the DGKS test sends it through a second pass
        small = 1e-6 if repass else 0.3
        hv = (torch.randn(6, dtype=torch.float64, generator=gen(4)) @ Q.T + small * torch.randn(d, generator=gen(5),
              dtype=torch.float64)).to(dtype)
        if not fused:
            KB_forced = KB.forced_kernels
            KB.forced_kernels = lambda: True
        try:
            beta_prev = 0.5 if prev_given else 0.0
            out.append(krylov_step(lambda v, hv=hv: hv.clone(), basis, cur, d, dtype, 1, prev, beta_prev))
        finally:
            if not fused:
                KB.forced_kernels = KB_forced
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prev_given", [True, False])
def test_the_fused_step_equals_the_generic_step(dtype, prev_given, monkeypatch, products):
    # CGS2 and the three-term step, and the DGKS repass; the coefficients and beta as the unfused step gives
    # them, to the accumulation's rounding (float64: to FLOAT64_EXACT)
    monkeypatch.setattr(HA, "HOST_CHUNK_ELEMENTS", 700)
    monkeypatch.setattr(HA, "MIN_COLUMNS", 64)
    calls = []
    orig = HA.lanczos_pass
    monkeypatch.setattr(KB, "lanczos_pass", lambda *a, **k: calls.append(k) or orig(*a, **k))
    for repass in (False, True) if prev_given else (False,):
        calls.clear()
        (w1, c1, b1), (w2, c2, b2) = _step_pair(dtype, prev_given, repass)
        tol = FLOAT64_EXACT if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 4 * BF16_REL)
        scale = float(c2.abs().max())
        assert float((c1 - c2).abs().max()) <= tol * scale
        assert b1 == pytest.approx(b2, rel=tol * scale / max(b2, 1e-300))
        assert float((w1.double() - w2.double()).abs().max()) <= tol * scale
        # passes over the basis: CGS2 three (not four); three-term two plus the alpha dot; the repass two more
        over_basis = sum(1 for k in calls if k.get("dots") or k.get("sub") is not None) - (1 if prev_given else 0)
        assert over_basis == (3 if not prev_given else 2 + 2 * repass)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("max_basis", [8, None])
def test_host_lanczos_on_a_known_spectrum_as_before(dtype, max_basis, monkeypatch, products):
    # a diagonal with outliers at both ends and a bulk: the host run (chunks that do not divide d) finds the
    # extremes within its bounds (plus the matvec's own rounding) and agrees with the unfused step's run
    monkeypatch.setattr(HA, "HOST_CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(HA, "MIN_COLUMNS", 256)
    d = 20_011
    diag = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    diag[-2:] = torch.tensor([4.0, 6.0], dtype=torch.float64)
    diag[:1] = -3.0
    hd = diag.to(dtype)

    def run(fused):
        if not fused:
            monkeypatch.setattr(KB, "forced_kernels", lambda: True)
        r = lanczos(lambda v: hd * v, d, k=1, tol=1e-3, max_iter=200, dtype=dtype, device="cpu",
                    generator=gen(2), max_basis=max_basis)
        monkeypatch.setattr(KB, "forced_kernels", V.forced_kernels)
        return r

    new, old = run(True), run(False)
    slack = 0 if dtype == torch.float32 else 6 * UNIT[dtype]  # the bf16 matvec rounds its product
    for r in (new, old):
        assert r.converged and (max_basis is None or (r.restarts > 0 and r.basis_peak <= max_basis))
        (top,), (top_err,) = r.top(1)
        (bottom,), (bottom_err,) = r.bottom(1)
        assert abs(top - 6.0) <= top_err + 1e-3 * 6 + slack * 6
        assert abs(bottom + 3.0) <= bottom_err + 1e-3 * 3 + slack * 3
    rel = 1e-5 if dtype == torch.float32 else BF16_REL
    assert new.top(1)[0][0] == pytest.approx(old.top(1)[0][0], rel=rel)
    assert new.bottom(1)[0][0] == pytest.approx(old.bottom(1)[0][0], rel=rel)
    assert abs(new.matvecs - old.matvecs) <= max(2, old.matvecs // 5)


def test_host_passes_allocate_nothing_of_the_vectors_length(monkeypatch):
    # after the scratch has grown once, a whole bf16 Lanczos step allocates nothing near d elements (the
    # float32 copies of slices and the norm's whole-vector conversion before did)
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(HA, "HOST_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(HA, "MIN_COLUMNS", 256)
    monkeypatch.setattr(V, "HALF_CHUNK_ELEMENTS", 1 << 12)  # the start vector's float32 draws, once per run
    d = 1 << 15  # large next to the 4096-element chunks, small enough to profile every operation quickly
    diag = torch.linspace(-1.0, 1.0, d).to(torch.bfloat16)
    out = torch.empty(d, dtype=torch.bfloat16)
    mv = lambda v: torch.mul(diag, v, out=out)
    lanczos(mv, d, k=1, tol=1e-12, max_iter=12, dtype=torch.bfloat16, device="cpu", max_basis=6)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        lanczos(mv, d, k=1, tol=1e-12, max_iter=12, dtype=torch.bfloat16, device="cpu", max_basis=6,
                generator=gen(1))
    basis_and_start = {6 * d * 2, d * 2}  # the basis block and the start vector are the run's own storage
    big = [e.cpu_memory_usage for e in p.events()
           if e.cpu_memory_usage >= d and e.cpu_memory_usage not in basis_and_start]
    assert big == []


def test_a_sharded_draw_by_threads_equals_the_serial_draw(monkeypatch):
    # the pieces of a sharded random vector drawn by a pool of threads: the serial draw's values, for ranges
    # that split pieces, share pieces between neighbouring ranges and end mid-piece
    from geomprobe.linalg import space as S

    monkeypatch.setattr(S, "RANDOM_CHUNK", 1000)
    monkeypatch.setattr(S, "_SERIAL_COPY", 300)
    space = S.ShardedSpace(50_000, [(5, 700), (701, 2500), (2500, 2501), (9_000, 31_234)])
    drawn = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        drawn.append(space.gaussian(V.default_generator(4), torch.bfloat16))
    assert torch.equal(drawn[0], drawn[1]) and drawn[0].shape == (space.local_dim,)
    whole = S.ShardedSpace(50_000, [(0, 50_000)]).gaussian(V.default_generator(4), torch.bfloat16)
    assert torch.equal(drawn[1], torch.cat([whole[5:700], whole[701:2501], whole[9_000:31_234]]))
