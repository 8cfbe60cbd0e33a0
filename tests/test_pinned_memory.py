"""Exact-size page-locked blocks and their pool (geomprobe/linalg/pinned_memory.py).

On a host without CUDA the driver's registration is replaced by a recorder, so the pool's logic (exact sizes,
reuse by size, the cap, release, refusals, the callers' fallbacks) is checked against real mappings; the GPU test
checks that the blocks are page-locked for the driver and carry asynchronous copies."""

import gc

import pytest
import torch
from reference import TanhMLP

import geomprobe as gp
from geomprobe.linalg import krylov_basis, pinned_memory
from geomprobe.linalg.size_pool import physical_bytes
from geomprobe.probe import geometry_probe

PAGE = 4096


@pytest.fixture
def fake_driver(monkeypatch):
    """Registration recorded instead of done; the pool and its counts start empty and are emptied after."""
    calls = {"register": [], "unregister": [], "refuse": False}

    def register(addr, nbytes):
        calls["register"].append((addr, nbytes))
        return not calls["refuse"]

    monkeypatch.setattr(pinned_memory, "_usable", lambda: True)
    monkeypatch.setattr(pinned_memory, "_register", register)
    monkeypatch.setattr(pinned_memory, "_unregister", lambda addr: calls["unregister"].append(addr))
    monkeypatch.setattr(pinned_memory, "_event", lambda: None)
    monkeypatch.setattr(pinned_memory, "EXACT_FROM_BYTES", PAGE)
    pinned_memory.release_pool()  # empty (no CUDA here); its counts start at zero
    monkeypatch.setattr(pinned_memory, "_stats", {k: 0 for k in pinned_memory._stats})
    yield calls
    gc.collect()
    pinned_memory.release_pool()


def test_a_block_takes_exactly_its_bytes_and_holds_what_is_written(fake_driver):
    t = pinned_memory.pinned_empty((3, 5000), torch.float32)
    assert t.shape == (3, 5000) and t.dtype == torch.float32
    assert t.untyped_storage().nbytes() == 3 * 5000 * 4  # torch's pinned allocator would take 2^16 bytes
    assert fake_driver["register"] == [(t.data_ptr(), 60000)]
    t.copy_(torch.arange(15000, dtype=torch.float32).view(3, 5000))
    assert float(t[2, 4999]) == 14999.0
    assert pinned_memory.pool_stats()["live_bytes"] == 60000


def test_a_dead_block_is_reused_for_the_same_size_without_a_new_registration(fake_driver):
    t = pinned_memory.pinned_empty((20000,), torch.float32)
    addr = t.data_ptr()
    view = t[100:]
    del t
    gc.collect()
    assert pinned_memory.pool_stats()["pooled_bytes"] == 0  # a view still holds it
    del view
    gc.collect()
    assert pinned_memory.pool_stats()["pooled_bytes"] == 80000
    other = pinned_memory.pinned_empty((10000,), torch.float64)  # same bytes, another type: the same block
    assert other.data_ptr() == addr and len(fake_driver["register"]) == 1
    assert pinned_memory.pool_stats()["reused"] == 1
    third = pinned_memory.pinned_empty((30000,), torch.float32)  # another size: a new block
    assert third.data_ptr() != addr and len(fake_driver["register"]) == 2


def test_past_the_cap_a_dead_block_is_released_and_release_pool_empties_the_pool(fake_driver, monkeypatch):
    a = pinned_memory.pinned_empty((20000,), torch.float32)
    b = pinned_memory.pinned_empty((20000,), torch.float32)
    addr_a, addr_b = a.data_ptr(), b.data_ptr()
    host = physical_bytes()
    monkeypatch.setattr(pinned_memory, "POOL_FRACTION", 100000 / host)  # room for one block of 80 kB
    del a
    gc.collect()
    del b
    gc.collect()
    assert pinned_memory.pool_stats()["pooled_bytes"] == 80000
    assert fake_driver["unregister"] == [addr_b]  # the second did not fit: unregistered (and unmapped)
    assert pinned_memory.release_pool() == 80000
    assert fake_driver["unregister"] == [addr_b, addr_a]
    assert pinned_memory.pool_stats()["pooled_bytes"] == 0 and pinned_memory.release_pool() == 0


def test_a_refused_registration_answers_none_after_emptying_the_pool(fake_driver):
    t = pinned_memory.pinned_empty((20000,), torch.float32)
    del t
    gc.collect()
    fake_driver["refuse"] = True
    assert pinned_memory.pinned_empty((30000,), torch.float32) is None
    s = pinned_memory.pool_stats()
    assert s["refused"] == 1 and s["pooled_bytes"] == 0 and s["live_bytes"] == 0
    assert len(fake_driver["register"]) == 3  # the new block, then once more after the pool was emptied
    assert len(fake_driver["unregister"]) == 1  # the pooled block


def test_small_blocks_and_hosts_without_cuda_take_torchs_route(fake_driver, monkeypatch):
    assert pinned_memory.pinned_empty((100,), torch.float32) is None  # below EXACT_FROM_BYTES
    monkeypatch.setattr(pinned_memory, "_usable", lambda: False)
    assert pinned_memory.pinned_empty((20000,), torch.float32) is None
    assert fake_driver["register"] == []


def test_the_basis_work_vector_comes_from_the_pool_where_it_answers(fake_driver, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    v = krylov_basis.host_vector(50000, torch.float32)
    assert v.untyped_storage().nbytes() == 200000 and fake_driver["register"] == [(v.data_ptr(), 200000)]


def test_closing_a_probe_releases_the_pool(monkeypatch):
    released = []
    monkeypatch.setattr(geometry_probe, "release_pool", lambda: released.append(1) or 0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    model = TanhMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.GeometryProbe(model, torch.nn.CrossEntropyLoss(), (X, y), optimizer=opt, schedule=gp.every(1),
                             metrics={"spectrum": {"max_iter": 5}})
    probe.probe(0)
    probe.close()
    probe.close()  # idempotent: released once
    assert released == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_an_exact_block_is_page_locked_and_carries_asynchronous_copies():
    torch.cuda.init()
    pinned_memory.release_pool()
    n = (96 << 20) // 4 + 3  # not a power of two: torch would lock 128 MiB
    t = pinned_memory.pinned_empty((n,), torch.float32)
    assert t is not None and t.is_pinned() and t.untyped_storage().nbytes() == 4 * n
    x = torch.randn(n, device="cuda")
    t.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    back = t.to("cuda", non_blocking=True)
    assert torch.equal(back, x)
    addr = t.data_ptr()
    del t
    gc.collect()
    again = pinned_memory.pinned_empty((n,), torch.float32)
    assert again.data_ptr() == addr and again.is_pinned()
    del again
    gc.collect()
    assert pinned_memory.release_pool() == 4 * n


def test_the_host_memory_a_plan_reads_counts_the_pooled_blocks(fake_driver, monkeypatch):
    from geomprobe.engine import memory_readings

    monkeypatch.setattr(memory_readings, "_os_available_bytes", lambda: 10**9)
    assert memory_readings.host_available_bytes() == 10**9
    t = pinned_memory.pinned_empty((20000,), torch.float32)
    del t
    gc.collect()
    assert memory_readings.host_available_bytes() == 10**9 + 80000  # the next probe takes it back first
    monkeypatch.setattr(memory_readings, "kept_bytes", lambda: 5)  # and the basis mappings kept (host_blocks.py)
    assert memory_readings.host_available_bytes() == 10**9 + 80005
    monkeypatch.setattr(memory_readings, "_os_available_bytes", lambda: None)
    assert memory_readings.host_available_bytes() is None


def test_a_warmed_block_waits_in_the_pool_and_the_next_request_of_its_size_takes_it(fake_driver, monkeypatch):
    import threading
    gate = threading.Event()
    register = pinned_memory._register

    def slow(addr, nbytes):  # the driver still pinning when the request comes
        gate.wait(5)
        return register(addr, nbytes)

    monkeypatch.setattr(pinned_memory, "_register", slow)
    assert pinned_memory.warm(80000)
    assert not pinned_memory.warm(80000)  # warming already
    threading.Timer(0.2, gate.set).start()
    t = pinned_memory.pinned_empty((20000,), torch.float32)  # waits for the warming block, maps no second one
    stats = pinned_memory.pool_stats()
    assert len(fake_driver["register"]) == 1 and fake_driver["register"][0][0] == t.data_ptr()
    assert stats["warmed"] == 1 and stats["mapped"] == 1 and stats["reused"] == 1 and stats["pooled_bytes"] == 0
    del t
    gc.collect()
    assert not pinned_memory.warm(80000)  # pooled already
    assert not pinned_memory.warm(100)  # below the exact-size threshold: torch's allocator serves it
    monkeypatch.setattr(pinned_memory, "_usable", lambda: False)
    assert not pinned_memory.warm(160000)


def test_a_lean_plan_warms_its_first_row_block_before_the_graph_is_built(monkeypatch):
    # the Landscape asks for the block a lean basis's first rows take (one row per block past PIN_BLOCK_BYTES)
    from geomprobe.engine import landscape as landscape_module
    from geomprobe.engine.memory_plan import MemoryBudget
    asked = []
    monkeypatch.setattr(krylov_basis, "warm", lambda nbytes: asked.append(nbytes) or True)
    monkeypatch.setattr(landscape_module, "warm_lean_rows", krylov_basis.warm_lean_rows)
    model = TanhMLP().double()
    X, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    budget = MemoryBudget(warn=False, gradient_samples=False, overrides={"working_vectors": ("device", "user")})
    land = gp.Landscape(model, torch.nn.CrossEntropyLoss(), (X, y), memory=budget, vector_device="cpu")
    assert land.plan.working_vectors == "device" and asked == []  # a CPU model: no page-locked rows
    row = land.dim * 8
    assert krylov_basis.warm_lean_rows(land.dim, torch.float64)
    assert asked == [min(krylov_basis.LanczosBasis.BLOCK, krylov_basis.LanczosBasis.PIN_BLOCK_BYTES // row) * row]
    big = 2**29  # 4 GiB float64 rows: one row a block
    assert krylov_basis.warm_lean_rows(big, torch.float64) and asked[-1] == big * 8


def test_a_runs_first_sketch_store_is_the_block_mapped_while_the_landscape_built(fake_driver, monkeypatch):
    # a half-precision run on an accelerator keeps its sketches page-locked: the store's first block is mapped
    # ahead (warm_store, beside the Landscape's build) and taken from the pool, no registration on the run's thread
    from geomprobe.linalg import sketched_gram

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dim = 1 << 20
    size = sketched_gram.sketch_size(dim)
    nbytes = sketched_gram.STORE_ROWS * 2 * size * 4
    assert not sketched_gram.warm_store(dim, torch.float32)  # float32 runs keep no sketches
    assert sketched_gram.warm_store(dim, torch.bfloat16)
    pinned_memory._wait_warming(nbytes)
    assert [n for _, n in fake_driver["register"]] == [nbytes]
    addr = fake_driver["register"][0][0]
    gram = sketched_gram.SketchedGram(dim)
    gram._room(pin=True)
    assert gram._rows.data_ptr() == addr and gram._rows.shape == (sketched_gram.STORE_ROWS, 2, size)
    assert len(fake_driver["register"]) == 1 and pinned_memory.pool_stats()["reused"] == 1
    monkeypatch.setattr(sketched_gram, "POOLED", False)  # torch's allocator instead (here: no CUDA, plain memory)
    assert not sketched_gram.warm_store(dim, torch.bfloat16)
    other = sketched_gram.SketchedGram(dim)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    other._room(pin=True)
    assert other._rows.shape == (sketched_gram.STORE_ROWS, 2, size) and len(fake_driver["register"]) == 1


def test_huge_pages_for_a_page_locked_block_are_asked_before_its_pages_exist(fake_driver, monkeypatch):
    from geomprobe.linalg import host_blocks

    order = []
    monkeypatch.setattr(host_blocks, "advise_huge_range", lambda addr, n, mode=None: order.append(("advise", n)))
    monkeypatch.setattr(pinned_memory, "_populate", lambda addr, n: order.append(("populate", n)))
    monkeypatch.setattr(pinned_memory, "HUGE_PAGES", True)
    t = pinned_memory.pinned_empty((1 << 20,), torch.float32)
    assert t is not None and order == [("advise", 4 << 20), ("populate", 4 << 20)]
    monkeypatch.setattr(pinned_memory, "HUGE_PAGES", False)  # the default: the kernel's own choice
    order.clear()
    assert pinned_memory.pinned_empty((1 << 19,), torch.float32) is not None
    assert order == [("populate", 2 << 20)]
