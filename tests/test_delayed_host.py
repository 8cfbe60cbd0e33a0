"""The delayed Lanczos loop on host vectors (linalg/delayed_host.py): the projection on a CPU thread beside the
matvec, the product corrected through the Lanczos relation, and its fused host passes (linalg/host_fused.py).
Checked against the ordinary loop (same tridiagonal to rounding), known spectra (bounds cover the truth), an
exhausted Krylov space, the hand-back, dense formulas for the kernels, and that the projection really runs
while the matvec does."""

from __future__ import annotations

import importlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from lanczos_helpers import assert_agrees_on_bf16_hvps, assert_matches_ordinary_run, known_spectrum, tiny_gpt2_landscape

from geomprobe.linalg import delayed_host, host_fused
from geomprobe.linalg.krylov_basis import LanczosBasis
from geomprobe.linalg.space import ShardedSpace
from geomprobe.metrics._common import delayed_fits

lanczos_module = importlib.import_module("geomprobe.linalg.lanczos")


_known = known_spectrum


def _run(mv, d, dtype, **kw):
    return lanczos_module.lanczos(mv, d, dtype=dtype, generator=torch.Generator().manual_seed(0), keep_basis=True,
                                  **kw)


def test_the_host_loop_gives_the_ordinary_runs_tridiagonal_and_bounds_that_cover_the_spectrum():
    mv, ev = _known(1500, torch.float64)
    plain = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full", delayed=False)
    late = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full", delayed="host")
    start = delayed_host.DELAYED_HOST_FROM_STEP + 1
    assert f"passes beside the products from step {start}" in late.reorth_regime
    assert "beside" not in plain.reorth_regime
    assert_matches_ordinary_run(late, plain, ev)


def test_a_long_float32_host_run_stays_orthogonal_and_matches_the_ordinary_run():
    mv, _ = _known(2000, torch.float32)
    plain = _run(mv, 2000, torch.float32, tol=0.0, max_iter=200, reorth="full")
    late = _run(mv, 2000, torch.float32, tol=1e-12, max_iter=200, reorth="full", delayed="host")
    assert late.steps == 200 and late.matvecs == 201
    V = late.basis.double()
    assert float((V @ V.T - torch.eye(200, dtype=torch.float64)).abs().max()) < 2e-6
    torch.testing.assert_close(late.ritz_values[-3:], plain.ritz_values[-3:], rtol=1e-6, atol=0)
    torch.testing.assert_close(late.ritz_values[:3], plain.ritz_values[:3], rtol=0, atol=1e-5)


def test_bf16_host_vectors_keep_the_ordinary_runs_accuracy():
    # half-precision rows: the passes convert chunks into float32 scratch and round each result once
    mv, ev = _known(1500, torch.bfloat16)
    plain = _run(mv, 1500, torch.bfloat16, tol=1e-4, reorth="full", delayed=False)
    late = _run(mv, 1500, torch.bfloat16, tol=1e-4, reorth="full", delayed="host")
    assert "beside the products" in late.reorth_regime and late.steps == plain.steps
    for r in (plain, late):
        V = r.basis.float()
        assert float((V @ V.T - torch.eye(V.shape[0])).abs().max()) < 2e-3  # bf16 storage of each row
    # the matrix itself is rounded to bf16 (2^-9 of 40 per entry): both runs find its extremes to that
    assert abs(float(late.ritz_values[-1]) - 40.0) < 2e-2 and abs(float(late.ritz_values[0]) + 6.0) < 2e-2
    torch.testing.assert_close(late.ritz_values[-1], plain.ritz_values[-1], rtol=1e-4, atol=0)


def test_an_exhausted_krylov_space_ends_the_host_loop_with_every_eigenvalue():
    mv, ev = _known(600, torch.float64, distinct=24)
    r = _run(mv, 600, torch.float64, tol=1e-12, reorth="full", delayed="host")
    assert r.converged and r.steps == 24 and "beside" in r.reorth_regime
    torch.testing.assert_close(r.ritz_values, torch.unique(ev), rtol=0, atol=1e-10)


def test_a_step_the_host_loop_cannot_project_in_one_pass_goes_back_to_the_ordinary_loop(monkeypatch):
    mv, _ = _known(1500, torch.float64)
    plain = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full", delayed=False)
    monkeypatch.setattr(delayed_host, "REPASS", 1.5)  # every delayed step handed back
    back = _run(mv, 1500, torch.float64, tol=1e-10, reorth="full", delayed="host")
    handed = back.steps - delayed_host.DELAYED_HOST_FROM_STEP  # each later step's product taken twice
    assert back.matvecs == plain.matvecs + handed and back.steps == plain.steps
    torch.testing.assert_close(back.alpha, plain.alpha, rtol=0, atol=1e-11 * 40)
    torch.testing.assert_close(back.beta, plain.beta, rtol=0, atol=1e-11 * 40)


def test_the_partial_runs_whole_basis_regime_takes_the_host_loop_on_a_transformers_bf16_hvps():
    land = tiny_gpt2_landscape(torch.bfloat16)
    kw = {"tol": 1e-3, "max_iter": 120, "risk": None}
    plain = _run(land.hvp, land.dim, torch.bfloat16, delayed=False, **kw)
    late = _run(land.hvp, land.dim, torch.bfloat16, delayed="host", **kw)
    assert_agrees_on_bf16_hvps(late, plain)


def test_the_projection_runs_on_its_own_thread_while_the_matvec_runs(monkeypatch):
    mv, _ = _known(800, torch.float64)
    spans: dict[str, list[tuple[float, float]]] = {"matvec": [], "project": []}
    threads = set()

    def slow(v):
        t0 = time.perf_counter()
        time.sleep(0.02)
        out = mv(v)
        spans["matvec"].append((t0, time.perf_counter()))
        return out

    inner = host_fused.host_project

    def timed(*a, **kw):
        threads.add(threading.current_thread().name)
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        spans["project"].append((t0, time.perf_counter()))
        return out

    monkeypatch.setattr(delayed_host, "host_project", timed)
    r = _run(slow, 800, torch.float64, tol=1e-10, reorth="full", delayed="host")
    assert r.converged and spans["project"]
    assert threads and all(name.startswith("lanczos-projection") for name in threads)
    # every projection lies inside some product's span (both started together; the product sleeps 20 ms)
    inside = sum(any(a <= p0 and p1 <= b + 0.05 for a, b in spans["matvec"]) for p0, p1 in spans["project"])
    assert inside == len(spans["project"])


def test_a_non_finite_product_in_the_host_loop_names_its_step_and_a_failing_matvec_propagates():
    mv, _ = _known(500, torch.float64)
    calls = {"n": 0}

    def bad(v):
        calls["n"] += 1
        out = mv(v)
        if calls["n"] == 7:
            out[3] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match="Lanczos step 7"):
        _run(bad, 500, torch.float64, tol=1e-12, reorth="full", delayed="host")
    calls["n"] = 0

    def broken(v):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("device lost")
        return mv(v)

    with pytest.raises(RuntimeError, match="device lost"):
        _run(broken, 500, torch.float64, tol=1e-12, reorth="full", delayed="host")


def test_the_host_loop_runs_only_where_asked_for_host_bases_and_never_sharded():
    host = LanczosBasis(10, torch.float32, "cpu")
    start = delayed_host.DELAYED_HOST_FROM_STEP
    assert delayed_host.delayed_host_due(host, True, start)
    assert not delayed_host.delayed_host_due(host, True, start - 1)
    assert not delayed_host.delayed_host_due(host, False, 50)  # passes only where the estimate asks
    sharded = SimpleNamespace(on_host=True, space=ShardedSpace(20, [(0, 10)]))
    assert not delayed_host.delayed_host_due(sharded, True, 50)
    # delayed=True (the default) keeps a CPU run's passes between the products: its matvec shares the cores
    mv, _ = _known(400, torch.float64)
    assert "beside" not in _run(mv, 400, torch.float64, tol=1e-10, reorth="full").reorth_regime
    # the metrics do not ask for it (opt-in: measured slower on the 1B model, module docstring): a host-vector
    # plan counts no delayed work, so they keep the passes between the products
    host_plan = SimpleNamespace(budget_bytes=7 * 10**9, items={"delayed_work": 0})
    assert delayed_fits(SimpleNamespace(host=object(), device=torch.device("cuda", 0), plan=host_plan)) is False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 4])
def test_the_fused_host_passes_match_dense_formulas(dtype, threads):
    g = torch.Generator().manual_seed(5)
    d, n = 1003, 7
    B = torch.randn(n, d, generator=g, dtype=torch.float64)
    x, y, v = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))
    c, t = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    Bt, xt, yt, vt = B.to(dtype), x.to(dtype), y.to(dtype), v.to(dtype)
    groups = [Bt[:3], Bt[3:]]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # the per-row (parallel) and matrix-vector forms of the chunk products
    try:
        z, u = torch.empty(d, dtype=dtype), torch.empty(d, dtype=dtype)
        nsq = host_fused.host_project(xt, groups, c, t, z, u, width=100)  # chunks that do not divide d
        ref_z = xt.double() - c @ Bt.double()
        torch.testing.assert_close(z.double(), ref_z, rtol=0, atol=tol * 10)
        torch.testing.assert_close(u.double(), -(t @ Bt.double()), rtol=0, atol=tol * 10)
        assert abs(nsq - float(z.double().square().sum())) <= 1e-5 * nsq
        out = yt.clone()
        dots = host_fused.host_combine(out, [(out, 0.5), (vt, -2.0), (xt, 1.25)], before=[(0, 1), (2, 2)],
                                       after=[-1, 1], width=128)
        ref = 0.5 * yt.double() - 2.0 * vt.double() + 1.25 * xt.double()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * 10)
        want = [yt.double() @ vt.double(), xt.double() @ xt.double(), out.double() @ out.double(),
                out.double() @ vt.double()]
        torch.testing.assert_close(dots, torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol * d)
    finally:
        torch.set_num_threads(old)


def test_the_fused_host_passes_refuse_bad_input():
    d = 50
    x = torch.zeros(d)
    with pytest.raises(ValueError, match="one per row"):
        host_fused.host_project(x, [torch.zeros(3, d)], torch.zeros(2), torch.zeros(3), x.clone(), x.clone())
    with pytest.raises(ValueError, match="overwrites"):
        host_fused.host_combine(x, [(x, 1.0)], after=[0])
    with pytest.raises(ValueError, match="shape of out"):
        host_fused.host_combine(x, [(torch.zeros(d + 1), 1.0)])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="host"):
            host_fused.host_combine(x.cuda(), [(x.cuda(), 1.0)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_host_vector_hvps_take_the_host_loop_and_give_the_ordinary_runs_values():
    transformers = pytest.importorskip("transformers")
    from geomprobe import Landscape

    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=256,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).cuda()
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    land = Landscape(model, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
                     [{"input_ids": tokens}], mode="eval", vector_device="cpu")
    assert land.host is not None
    kw = {"tol": 1e-6, "dtype": torch.float32, "device": "cpu", "reorth": "full", "risk": None}
    late = lanczos_module.lanczos(land.hvp, land.dim, generator=torch.Generator().manual_seed(0),
                                  delayed="host", **kw)
    plain = lanczos_module.lanczos(land.hvp, land.dim, generator=torch.Generator().manual_seed(0), delayed=False,
                                   **kw)
    assert "beside the products" in late.reorth_regime and late.matvecs == plain.matvecs + 1
    torch.testing.assert_close(late.ritz_values[-1], plain.ritz_values[-1], rtol=1e-5, atol=0)
    scale = float(plain.ritz_values.abs().max())
    torch.testing.assert_close(late.ritz_values[0], plain.ritz_values[0], rtol=0, atol=1e-5 * scale)


def test_a_capped_host_run_hands_its_residual_to_the_restarted_loop(monkeypatch):
    # a dense bulk's top edge at tol 1e-6 needs more than 30 vectors: the host loop stops at the cap and the
    # thick restart continues from its residual (the loop's buffer), the bounds covering the truth
    g = torch.Generator().manual_seed(4)
    ev = torch.rand(1200, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(1200, 1200, generator=g, dtype=torch.float64))
    H = (Q * ev) @ Q.T
    stops = []
    inner = lanczos_module.run_delayed_host
    monkeypatch.setattr(lanczos_module, "run_delayed_host", lambda *a: stops.append(inner(*a)) or stops[-1])
    r = lanczos_module.lanczos(lambda v: H @ v, 1200, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                               tol=1e-6, max_basis=30, max_iter=3000, which="largest", k=2, delayed="host",
                               reorth="full")
    assert len(stops) == 1 and stops[0].stop and not stops[0].exhausted
    assert r.restarts >= 1 and r.converged and r.basis_peak <= 30
    top = torch.sort(ev, descending=True).values[:2]
    for (theta, b), want in zip(zip(*r.top(2)), top.tolist()):
        assert abs(theta - want) <= b + 1e-9
