"""A spectrum whose basis lies in host memory forms its Ritz vectors only when something reads them
(``metrics.ritz_vectors.LazyRitzPair``): a probe that keeps no warm start and asks for no direction never pays the
pass over the basis; one that does gets the vectors the eager pass gives, formed once for both ends."""

from __future__ import annotations

import importlib

import pytest
import torch
from reference import make_case

import geomprobe as gp
from geomprobe.linalg.ritz import LanczosResult
from geomprobe.metrics import spectrum
from geomprobe.metrics.ritz_vectors import extreme_ritz
from geomprobe.probe.warm_start import WarmStart

spectrum_module = importlib.import_module("geomprobe.metrics.spectrum")
geometry_probe_module = importlib.import_module("geomprobe.probe.geometry_probe")


@pytest.fixture
def passes(monkeypatch):
    seen = []
    real = LanczosResult.take_ritz_vectors

    def counted(self, *a, **k):
        seen.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(LanczosResult, "take_ritz_vectors", counted)
    return seen


def _land(vector_device):
    model, loss, batches, _ = make_case("tanh_mlp")
    return gp.Landscape(model, loss, batches, vector_device=vector_device)


def test_a_host_basis_forms_its_ritz_vectors_only_when_read_and_as_the_eager_pass_would(passes, monkeypatch):
    # as for a model on an accelerator with its basis in host memory (forms_later below): here on the CPU
    monkeypatch.setattr(spectrum_module, "forms_later", lambda land, r: True)
    land = _land("cpu")
    warm = WarmStart(certified=False)  # a certified run starts cold: nothing is kept for the next probe
    out = spectrum(land, tol=1e-8, k=2, warm=warm, risk=1e-2)
    assert passes == [] and warm.top is None  # neither the warm start nor a later metric read them
    top = extreme_ritz(land, "top", k=2)  # the direction metric's and the views' read: the pass runs now, once
    bottom = extreme_ritz(land, "bottom", k=2)
    assert passes == [1]
    assert top.values[0] == pytest.approx(out["lambda_max"], rel=1e-12)
    # the eager pass's vectors: a warm start that keeps them forms them at once
    eager = _land("cpu")
    kept = WarmStart(certified=True)
    spectrum(eager, tol=1e-8, k=2, warm=kept, risk=1e-2)
    assert passes == [1, 1]
    assert torch.allclose(top.vectors, kept.top[:2], atol=1e-12)
    assert torch.allclose(bottom.vectors, kept.bottom[:2], atol=1e-12)
    H = land.hvp(torch.eye(land.dim, dtype=land.dtype))
    y = top.vectors[0]
    assert float(torch.linalg.vector_norm(H @ y - top.values[0] * y)) <= top.errs[0] + 1e-10


def test_dropping_an_unread_pair_releases_the_basis_also_from_the_cached_run(passes, monkeypatch):
    # the seeded cold run stays in the Landscape's cache for other metrics (its values): the dropped pair must take
    # the basis from it, as the pass would have, or the rows would stay for the Landscape's life
    from geomprobe.metrics import ritz_vectors
    monkeypatch.setattr(spectrum_module, "forms_later", lambda land, r: True)
    results = []
    real_init = ritz_vectors.LazyRitzPair.__init__

    def spy(self, result, *a, **k):
        results.append(result)
        real_init(self, result, *a, **k)

    monkeypatch.setattr(ritz_vectors.LazyRitzPair, "__init__", spy)
    land = _land("cpu")
    spectrum(land, tol=1e-8, k=1, warm=WarmStart(certified=False), risk=1e-2)
    assert len(results) == 1 and results[0].basis_blocks is not None and passes == []
    assert ritz_vectors.drop_unformed(land) == 2
    assert results[0].basis_blocks is None and passes == []
    assert ritz_vectors.drop_unformed(land) == 0


def test_a_model_on_the_cpu_forms_them_at_once(passes):
    land = _land("cpu")  # its basis in host memory would hold what the next metric plans with
    spectrum(land, tol=1e-8, k=1, warm=WarmStart(certified=False), risk=1e-2)
    assert passes == [1]
    extreme_ritz(land, "top")
    assert passes == [1]


class _Fake:
    def __init__(self, device, blocks):
        self.device, self.basis_blocks = torch.device(device), blocks


def test_forms_later_only_for_an_accelerator_model_whose_basis_is_in_host_memory():
    host, meta = [torch.zeros(2, 3)], [torch.zeros(2, 3, device="meta")]
    assert spectrum_module.forms_later(_Fake("cuda", None), _Fake("cuda", host))
    assert not spectrum_module.forms_later(_Fake("cpu", None), _Fake("cpu", host))
    assert not spectrum_module.forms_later(_Fake("cuda", None), _Fake("cuda", meta))  # a basis on the device
    assert not spectrum_module.forms_later(_Fake("cuda", None), _Fake("cuda", None))  # spent already


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_host_vector_spectrum_forms_its_ritz_vectors_when_the_direction_reads_them(passes):
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).cuda()
    x, y = torch.randn(32, 256, device="cuda"), torch.randn(32, 256, device="cuda")
    land = gp.Landscape(model, nn.MSELoss(), (x, y), vector_device="cpu")
    out = spectrum(land, tol=1e-4, max_iter=40, warm=WarmStart(certified=False), risk=1e-2)
    assert passes == []
    ritz = extreme_ritz(land, "top")
    assert passes == [1] and ritz.vectors.device.type == "cpu"
    assert ritz.values[0] == pytest.approx(out["lambda_max"], rel=1e-12)


def test_a_probe_drops_an_unread_basis_once_no_remaining_metric_reads_ritz_vectors(monkeypatch, passes):
    # spectrum then trace: after the spectrum nothing reads its Ritz vectors, so its basis goes before trace runs;
    # spectrum then direction: the direction reads them (one pass) and needs no Lanczos of its own
    from torch import nn

    from geomprobe.metrics import ritz_vectors
    monkeypatch.setattr(spectrum_module, "forms_later", lambda land, r: True)
    dropped = []
    real = ritz_vectors.drop_unformed
    monkeypatch.setattr(geometry_probe_module, "drop_unformed", lambda land: dropped.append(real(land)) or dropped[-1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    for metrics, reads in ((["spectrum", "trace"], False), (["spectrum", "direction"], True)):
        dropped.clear()
        passes.clear()
        probe = gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), metrics=metrics)
        record = probe.probe(0)
        probe.close()
        assert "spectrum" in record and not record.get("errors"), record.get("errors")
        assert passes == ([1] if reads else [])
        assert sum(dropped) == (0 if reads else 2)  # both ends of the unread pair, dropped before trace ran
