"""Helpers of the Lanczos tests (tests/test_partial_reorth.py, tests/test_delayed_lanczos.py,
tests/test_delayed_host.py, tests/test_selective_room.py): the Landscape of a tiny GPT-2 language model, whose
HVPs round inside a chain of layers as a network's do, a dense matrix with a known spectrum, and a run that goes
selective."""

from __future__ import annotations

import functools
import sys

import pytest
import torch


def tiny_gpt2_landscape(dtype: torch.dtype = torch.float32):
    """A 2-layer, width-64 GPT-2 (random init, seed 0, no dropout) in ``dtype`` on 4 x 32 random tokens, as an
    eval-mode Landscape. Skips the test where transformers is missing."""
    transformers = pytest.importorskip("transformers")
    from geomprobe import Landscape

    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=256,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).to(dtype)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return Landscape(model, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
                     [{"input_ids": tokens}], mode="eval")


def known_spectrum(d: int, dtype: torch.dtype, seed: int = 1, distinct: int | None = None):
    """A dense symmetric ``d x d`` matrix's matvec in ``dtype`` and its float64 eigenvalues: two outliers (40,
    25), a bulk in [-1, 1] and -6 at the bottom, in a random orthonormal basis; with ``distinct``, that many
    values each repeated ``d // distinct`` times (an invariant subspace of dimension ``distinct`` holds any
    start vector's Krylov space)."""
    g = torch.Generator().manual_seed(seed)
    if distinct is None:
        ev = torch.cat([torch.tensor([40.0, 25.0]), torch.rand(d - 3, generator=g, dtype=torch.float64) * 2 - 1,
                        torch.tensor([-6.0])]).double()
    else:
        ev = torch.linspace(-3.0, 9.0, distinct, dtype=torch.float64).repeat_interleave(d // distinct)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Hd = ((Q * ev) @ Q.T).to(dtype)
    return (lambda v: Hd @ v), ev


def assert_matches_ordinary_run(late, plain, ev: torch.Tensor, scale: float = 40.0) -> None:
    """A float64 run of another loop against the ordinary run on :func:`known_spectrum`'s matrix: the same
    steps (one product more), the same tridiagonal to 1e-11 ``||T||``, an orthonormal basis, every bound
    covering an eigenvalue, and both ends found."""
    assert late.steps == plain.steps and late.matvecs == plain.matvecs + 1  # the last step's product, unused
    torch.testing.assert_close(late.alpha, plain.alpha, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(late.beta, plain.beta, rtol=0, atol=1e-11 * scale)
    V = late.basis
    assert float((V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs().max()) < 1e-13
    for theta, b in zip(late.ritz_values.tolist(), late.bounds.tolist()):
        assert float((ev - theta).abs().min()) <= b + 1e-12 * scale
    assert late.converged and abs(late.ritz_values[-1] - 40.0) < 1e-9 and abs(late.ritz_values[0] + 6.0) < 1e-9


def assert_agrees_on_bf16_hvps(late, plain) -> None:
    """A run of another loop against the ordinary run on :func:`tiny_gpt2_landscape`'s bf16 HVPs: two bf16 runs
    agree only to the product's own error (their products differ in rounding), 5e-3 of ``||T||``, at both ends;
    the basis orthonormal to its rows' bf16 storage (2^-8)."""
    assert "the matvec's asymmetry" in late.reorth_regime and "passes beside the products" in late.reorth_regime
    assert late.converged and abs(late.steps - plain.steps) <= 3
    scale = float(plain.ritz_values.abs().max())
    assert abs(float(late.ritz_values[-1] - plain.ritz_values[-1])) < 5e-3 * scale
    assert abs(float(late.ritz_values[0] - plain.ritz_values[0])) < 5e-3 * scale
    V = late.basis.float()
    assert float((V @ V.T - torch.eye(V.shape[0])).abs().max()) < 2e-2


@functools.lru_cache(maxsize=1)
def _outlier_matrix(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    # built once per session: its QR takes seconds and every run reads it only
    eigs = torch.cat([torch.linspace(-1, 1, d - 1, dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64)])
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return eigs, (Q @ torch.diag(eigs) @ Q.T).to(torch.float32)  # as test_partial_reorth.sym_with_spectrum


def outlier_run(monkeypatch, reorth: str = "partial", selective: bool = True):
    """Float32 Lanczos (tol 1e-4, seed 0) on a 3000 x 3000 matrix with one eigenvalue 100x its bulk in [-1, 1]:
    once the outlier converges, orthogonality leaks along its Ritz vector at every step, and a partial run goes
    selective. Returns ``(eigenvalues, result, kept)``, ``kept`` the number of Ritz vectors held after each
    time the run kept one (``_keep_ritz``, spied on through ``monkeypatch``)."""
    d = 3000
    eigs, A = _outlier_matrix(d)
    lz = sys.modules["geomprobe.linalg.lanczos"]
    kept: list[int] = []
    keep = lz._keep_ritz

    def spy(basis, Uk, vectors, w):
        out = keep(basis, Uk, vectors, w)
        kept.append(len(vectors))
        return out

    monkeypatch.setattr(lz, "_keep_ritz", spy)
    r = lz.lanczos(lambda v: v @ A, d, tol=1e-4, max_iter=400, dtype=torch.float32, reorth=reorth, keep_basis=True,
                   generator=torch.Generator().manual_seed(0), selective=selective)
    return eigs, r, kept
