"""Partial sums of a streamed double backward (engine/partial_sums.py): a parameter's sum is handed on once its
counted producers have sent their contributions, waits on the device within its byte budget and in reused host
buffers beyond it, and comes out exactly as autograd's own sum; the host-vector HVPs with sums waiting (and
spilled) equal the device mode's; a contribution after a parameter's reduce-scatter is refused clearly."""

import pytest
import torch
from reference import make_case
from test_host_stream import _close, _vectors

import geomprobe as gp
from geomprobe.engine.partial_sums import HostIO, PartialSums
from geomprobe.engine.sharded_stream import ScatterSchedule, _Held
from geomprobe.errors import GeomprobeError


def _contributions(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (3, 4), 1: (5,), 2: (2, 2)}
    parts = {i: [torch.randn(s, dtype=torch.float64, generator=g) for _ in range(k)]
             for (i, s), k in zip(shapes.items(), (2, 3, 1))}
    return parts


@pytest.mark.parametrize("device_bytes", [0, 3 * 8 * 4, float("inf")], ids=["all-spill", "some", "none-spill"])
def test_sums_complete_at_their_count_and_equal_the_whole_sum(device_bytes):
    parts = _contributions()
    got: dict[int, list[torch.Tensor]] = {}
    io = HostIO(pin=False)
    sums = PartialSums({0: 2, 1: 3, 2: 1}, lambda i, t: got.setdefault(i, []).append(t.clone()), torch.device("cpu"),
                       device_bytes=device_bytes, io=io, spill=True)
    order = [(0, 0), (1, 0), (1, 1), (2, 0), (0, 1), (1, 2)]  # interleaved as a backward would send them
    done_after = {}
    for step, (i, k) in enumerate(order):
        sums.add(i, parts[i][k])
        for j in got:
            done_after.setdefault(j, step)
    assert done_after == {2: 3, 0: 4, 1: 5}  # each handed on at its last contribution, not at the end
    for i, xs in parts.items():
        assert len(got[i]) == 1 and torch.allclose(got[i][0], sum(xs), rtol=0, atol=1e-15)
    assert list(sums.drain()) == [] and sums.completed == 3
    if device_bytes == 0:
        assert sums.spilled == 3 and sums.peak_device_bytes == 0  # 0 and 1 (twice) waited on the host
    elif device_bytes == float("inf"):
        assert sums.spilled == 0 and sums.peak_device_bytes == (12 + 5) * 8
    else:
        assert 0 < sums.spilled < 3 and sums.peak_device_bytes <= device_bytes
    # the host buffers are kept for the next pass, one per parameter that waited there
    before = io.nbytes()
    sums2 = PartialSums({0: 2}, lambda i, t: None, torch.device("cpu"), device_bytes=device_bytes, io=io, spill=True)
    sums2.add(0, parts[0][0])
    sums2.add(0, parts[0][1])
    assert io.nbytes() == before


def test_unknown_counts_and_silent_producers_wait_for_the_drain():
    parts = _contributions(1)
    got: dict[int, torch.Tensor] = {}
    sums = PartialSums({1: 4}, lambda i, t: got.__setitem__(i, t), torch.device("cpu"), io=HostIO(pin=False), spill=True)
    for i, xs in parts.items():
        for x in xs:
            sums.add(i, x)
    assert got == {}  # parameter 1 expected a fourth contribution; 0 and 2 have no count
    drained = dict(sums.drain())
    assert sorted(drained) == [0, 1, 2]
    for i, xs in parts.items():
        assert torch.allclose(drained[i], sum(xs), rtol=0, atol=1e-15)
    assert list(sums.drain()) == []


def test_a_contribution_after_the_count_is_handed_on_again():
    parts = _contributions(2)
    got: list[tuple[int, torch.Tensor]] = []
    sums = PartialSums({2: 1}, lambda i, t: got.append((i, t.clone())), torch.device("cpu"))
    sums.add(2, parts[2][0])
    sums.add(2, 2 * parts[2][0])  # more than counted: waits, then drained for the caller to add
    drained = list(sums.drain())
    assert [i for i, _ in got] == [2] and [i for i, _ in drained] == [2]
    assert torch.equal(got[0][1] + drained[0][1], 3 * parts[2][0])


class _Recorder:
    """A layout whose reduce-scatter records what it issued (one rank)."""

    def __init__(self):
        self.issued = []

    def scatter_param_add(self, j, g, out, device=None, io=None):
        self.issued.append(j)
        if g is not None:
            out.add_(g)


def test_the_schedule_adds_a_second_value_and_refuses_one_after_its_collective():
    layout, outs = _Recorder(), [torch.zeros(2), torch.zeros(2)]
    sched = ScatterSchedule(layout, outs, [1, 0], torch.device("cpu"), _Held())
    sched.stage(0, torch.ones(2))
    sched.stage(0, torch.full((2,), 2.0))  # waiting for its turn: summed
    sched.flush()
    assert layout.issued == []  # parameter 1 goes first
    sched.stage(1, torch.ones(2))
    sched.flush()
    assert layout.issued == [1, 0] and torch.equal(outs[0], torch.full((2,), 3.0))
    with pytest.raises(GeomprobeError, match="after its reduce-scatter"):
        sched.stage(1, torch.ones(2))


def test_host_io_reuses_its_buffers_and_copies_exactly():
    io = HostIO(pin=False)
    dst = torch.arange(6.0).view(2, 3)
    io.add_to_host(dst, torch.ones(2, 3))
    assert torch.equal(dst, torch.arange(6.0).view(2, 3) + 1)
    io.copy_to_host(dst, torch.zeros(2, 3))
    assert torch.equal(dst, torch.zeros(2, 3))
    v = torch.randn(10)
    assert io.input(v) is v  # nothing to page-lock without CUDA
    a = io.spill_buffer(3, torch.zeros(4, 2))
    b = io.spill_buffer(3, torch.zeros(4, 2))
    assert a.data_ptr() == b.data_ptr() and a.shape == (4, 2)
    assert io.nbytes() == 8 * 4
    io.clear()
    assert io.nbytes() == 0


@pytest.mark.parametrize("name", ["tanh_mlp", "transformer", "cnn_bn"])
@pytest.mark.parametrize("device_bytes", [0, 2000, float("inf")], ids=["spill", "some", "device"])
def test_host_hvps_with_waiting_sums_equal_device_hvps(name, device_bytes):
    # on a CPU model contributions go straight into the output; here they wait as on a GPU: counted, summed,
    # spilled to the host buffers beyond the budget and brought back for their next contribution
    model, loss, batches, mode = make_case(name)
    device = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=1)
    host = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=1, vector_device="cpu")
    host.host.direct, host.host.spill_partials, host.host.partials_device_bytes = False, True, device_bytes
    V = _vectors(device, 2)
    assert _close(host.hvp(V), device.hvp(V))
    st = host.host.stats
    assert st["partials_completed_early"] > 0
    if device_bytes == 0:
        assert st["partials_spilled"] > 0 and st["partials_peak_device_bytes"] == 0
    elif device_bytes == float("inf"):
        assert st["partials_spilled"] == 0 and st["partials_peak_device_bytes"] > 0
    else:
        assert st["partials_peak_device_bytes"] <= device_bytes


def test_a_pass_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model, loss, batches, mode = make_case("tanh_mlp")
    host = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=1, vector_device="cpu")
    host.host.direct, host.host.spill_partials = False, True
    seen = []
    from geomprobe.engine import host_stream

    real_init = host_stream.HostStreamPass.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(weakref.ref(self))

    host_stream.HostStreamPass.__init__ = init
    gc.disable()
    try:
        out = host.hvp(_vectors(host, 1)[0])
        assert seen and all(r() is None for r in seen)  # no cycle (pass -> sums -> bound method -> pass) keeps it
    finally:
        gc.enable()
        host_stream.HostStreamPass.__init__ = real_init
    assert out.shape == (host.dim,)


def test_close_releases_the_host_buffers():
    model, loss, batches, mode = make_case("tanh_mlp")
    host = gp.Landscape(model, loss, batches, mode=mode, graph_budget_bytes=1, vector_device="cpu")
    host.host.direct, host.host.spill_partials = False, True
    host.hvp(_vectors(host, 1)[0])
    io = host.host.io
    assert io.nbytes() > 0  # the spilled sums' buffers, kept for the next product
    host.close()
    assert io.nbytes() == 0
