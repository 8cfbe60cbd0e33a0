"""rmed's Bekas screen on an accelerator is parked in host memory between uses and brought back for each
(geomprobe.metrics._screen.Screen): its 16 bytes per parameter do not stay on the device while the reads are
kept for other metrics."""

import pytest
import torch

from geomprobe.metrics._screen import Screen

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_host_screen_stays_where_it_is():
    mean, se = torch.randn(10, dtype=torch.float64), torch.rand(10, dtype=torch.float64)
    s = Screen(mean, se)
    assert s.device.type == "cpu" and s.mean is mean and s.se is se
    with s.resident() as r:
        assert r.mean is mean


@cuda
def test_a_device_screen_is_parked_on_the_host_and_resident_only_inside_its_uses():
    d = 2**22
    mean = torch.randn(d, dtype=torch.float64, device="cuda")
    se = torch.rand(d, dtype=torch.float64, device="cuda")
    expect = (mean.abs() + 2.0 * se).cpu()
    s = Screen(mean, se)
    del mean, se
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert s.device.type == "cuda" and s.mean.device.type == "cpu"
    with s.resident():
        assert s.mean.device.type == "cuda"
        assert torch.cuda.memory_allocated() >= before + 2 * d * 8
        with s.resident():  # nested: one copy
            assert torch.cuda.memory_allocated() < before + 3 * d * 8
        got = s.bound(0, d, 2.0).cpu()
    assert torch.cuda.memory_allocated() <= before
    assert torch.equal(got, expect)
