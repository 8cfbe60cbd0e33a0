"""HVPs of block-sparse vectors leave the first-order gradients with a zero part out of the double backward
(geomprobe.engine.pruned_outputs): same products as the unpruned route and as dense float64 Hessians, and
the nodes only those gradients reach are never visited."""

import pytest
import torch
from reference import dense_hessian, make_case
from tolerances import FLOAT64_EXACT
from torch import nn

import geomprobe as gp
import geomprobe.engine.landscape as landscape_module
from geomprobe.engine import pruned_outputs
from geomprobe.engine.pruned_outputs import MIN_ROWS, dense_at_starts, kept_outputs, nonzero_parts, part_mask
from geomprobe.metrics._columns import top_aligned

_DENSE: dict = {}


def _case(name):
    model, loss, batches, mode = make_case(name)
    if name not in _DENSE:
        _DENSE[name] = dense_hessian(model, loss, batches, mode=mode)
    return model, loss, batches, mode, _DENSE[name]


def _columns(dim, idx, dtype=torch.float64):
    E = torch.zeros(len(idx), dim, dtype=dtype)
    E[torch.arange(len(idx)), torch.as_tensor(idx)] = 1
    return E


def _unpruned(monkeypatch):
    """The route before pruning: every output kept (what ``part_mask`` returning None means)."""
    monkeypatch.setattr(landscape_module, "part_mask", lambda land, V: None)


def _chunks(land):
    """Block-sparse chunks of every kind the reads make: columns of one block, columns across neighbouring
    blocks, a block-sparse random block, and one column per block."""
    b, g = land.blocks, torch.Generator().manual_seed(3)
    top, low = b[-2], b[0]
    sparse = torch.zeros(5, land.dim, dtype=torch.float64)
    sparse[:, top.start : top.stop] = torch.randn(5, top.size, generator=g, dtype=torch.float64)
    sparse[2, b[1].start : b[1].stop] = torch.randn(b[1].size, generator=g, dtype=torch.float64)
    return {
        "one block": _columns(land.dim, range(top.start, top.start + min(6, top.size))),
        "neighbours": _columns(land.dim, range(b[-3].stop - 3, b[-3].stop + 3)),
        "lowest": _columns(land.dim, range(low.start, low.start + 4)),
        "sparse random": sparse,
        "one per block": _columns(land.dim, [blk.start for blk in b]),
    }


@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_bn", "transformer"])
def test_block_sparse_chunks_equal_the_unpruned_route_and_the_dense_hessian(name, monkeypatch):
    model, loss, batches, mode, H = _case(name)
    land = gp.Landscape(model, loss, batches, mode=mode)
    pruned = {k: land.hvp(V) for k, V in _chunks(land).items()}
    _unpruned(monkeypatch)
    full = {k: land.hvp(V) for k, V in _chunks(land).items()}
    scale = max(1.0, H.abs().max().item())
    for k, V in _chunks(land).items():
        # the same sums with exact zeros left out: bit-identical here, stated to float64 rounding
        assert torch.allclose(pruned[k], full[k], rtol=0, atol=FLOAT64_EXACT * scale), k
        assert torch.allclose(pruned[k], V @ H, rtol=0, atol=FLOAT64_EXACT * scale), k


def _hooked(land, batch=0):
    """Counts of each first-order gradient's node running in a double backward of probe batch ``batch``."""
    calls = [0] * len(land.params)
    handles = []
    for j, g in enumerate(land._graphs[batch]):
        def count(_grads, j=j):
            calls[j] += 1
        handles.append(g.grad_fn.register_prehook(count))
    return calls, handles


def test_columns_of_the_top_layer_never_visit_the_nodes_of_lower_gradients():
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode)
    calls, handles = _hooked(land)
    top = land.blocks[4]  # net.4.weight, the layer next to the loss
    land.hvp(_columns(land.dim, range(top.start, top.start + 8)))
    # only the top weight's own gradient node runs: net.0 and net.2's (and net.4.bias's) are pruned away;
    # before pruning every one of them ran once per probe batch
    assert calls == [0, 0, 0, 0, 1, 0]
    calls[:] = [0] * len(calls)
    land.hvp(torch.randn(4, land.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert calls == [1] * 6  # a dense block needs them all
    calls[:] = [0] * len(calls)
    land.hvp(torch.randn(land.dim, dtype=torch.float64))
    assert calls == [1] * 6  # a single vector is never inspected, and needs them all too
    for h in handles:
        h.remove()


def test_pruning_saves_work_that_the_unpruned_route_does(monkeypatch):
    """The counter above fails on the route that keeps every output (the code before pruning)."""
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode)
    _unpruned(monkeypatch)
    calls, handles = _hooked(land)
    top = land.blocks[4]
    land.hvp(_columns(land.dim, range(top.start, top.start + 8)))
    assert calls == [1] * 6
    for h in handles:
        h.remove()


def test_an_all_zero_block_gives_zeros_without_a_double_backward():
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode)
    calls, handles = _hooked(land)
    out = torch.full((3, land.dim), float("nan"), dtype=torch.float64)  # overwritten, not added to
    got = land.hvp(torch.zeros(3, land.dim, dtype=torch.float64), out=out)
    assert got is out and torch.equal(out, torch.zeros_like(out))
    assert calls == [0] * 6 and land.hvps == 3
    for h in handles:
        h.remove()


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.unused = nn.Linear(3, 3)  # in the parameter space, never in the graph: its gradient is None
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_model_with_an_unused_parameter():
    torch.manual_seed(0)
    model = _WithUnused().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64))]
    land = gp.Landscape(model, nn.MSELoss(), batches)
    H = dense_hessian(model, nn.MSELoss(), batches)
    unused = next(b for b in land.blocks if b.name == "unused.weight")
    scale = max(1.0, H.abs().max().item())
    for idx in (range(unused.start, unused.start + 4),               # only the unused block: zero columns
                range(unused.start - 2, unused.start + 2),            # across a.bias and unused.weight
                [0, unused.start + 1, land.dim - 1]):                 # lowest, unused, top
        V = _columns(land.dim, list(idx))
        assert torch.allclose(land.hvp(V), V @ H, rtol=0, atol=FLOAT64_EXACT * scale)
    assert torch.equal(land.hvp(_columns(land.dim, range(unused.start, unused.start + 4))),
                       torch.zeros(4, land.dim, dtype=torch.float64))


def test_micro_batches_and_rebuilt_graphs_take_the_same_pruned_products():
    model, loss, batches, mode, H = _case("tanh_mlp")
    # pieces of 5 samples; no graph kept beyond the first, so the others are rebuilt for every chunk; chunks of
    # 3 rows, so the blocks of 4-6 rows below go in pieces, each with its rows' slice of the block's mask
    land = gp.Landscape(model, loss, batches, mode=mode, micro_batch_size=5, graph_budget_bytes=0, memory=None,
                        chunk_size=3)
    assert len(land.batches) > 2
    scale = max(1.0, H.abs().max().item())
    for k, V in _chunks(land).items():
        assert torch.allclose(land.hvp(V), V @ H, rtol=0, atol=FLOAT64_EXACT * scale), k
    assert land.graph_rebuilds >= (len(land.batches) - 1) * sum(-(-len(V) // 3) for V in _chunks(land).values())


def test_the_one_vector_fallback_prunes_each_row_on_its_own(monkeypatch):
    model, loss, batches, mode, H = _case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode)
    real = torch.autograd.grad

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::made_up_op")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    calls, handles = _hooked(land)
    top = land.blocks[4]
    idx = [top.start, top.start + 1, top.start + 2, land.blocks[0].start]  # three top columns, one lowest
    V = _columns(land.dim, idx)
    with pytest.warns(RuntimeWarning, match="falling back to one vector at a time"):
        got = land.hvp(V)
    assert not land.batched_hvp
    assert torch.allclose(got, V @ H, rtol=0, atol=FLOAT64_EXACT * max(1.0, H.abs().max().item()))
    # each row's own outputs: net.4.weight's node for the three top rows, net.0.weight's for the last only
    assert calls == [1, 0, 0, 0, 3, 0]
    for h in handles:
        h.remove()


def test_a_missing_double_backward_is_still_refused_on_the_pruned_route(monkeypatch):
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode)
    real = torch.autograd.grad

    def missing(*args, **kwargs):
        if kwargs.get("retain_graph"):  # the HVP's double backward, not a build
            raise RuntimeError("the derivative for aten::made_up_op is not implemented")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", missing)
    top = land.blocks[4]
    with pytest.raises(gp.UnsupportedOperationError, match="made_up_op.*finite-difference"):
        land.hvp(_columns(land.dim, range(top.start, top.start + 4)))
    assert land.batched_hvp  # a refusal is no reason to give up batching


def test_nonzero_parts_reads_each_slice_exactly():
    offsets = [0, 3, 3, 7, 8]  # an empty slice among them
    V = torch.zeros(4, 8, dtype=torch.float64)
    V[0, 1] = 1e-300          # tiny is nonzero
    V[1, 7] = float("nan")    # a NaN part still poisons its product: kept
    V[2, 4] = -0.0            # a negative zero contributes nothing
    V[3, 5] = -2.0            # negative entries (the max alone would miss them)
    want = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(nonzero_parts(V, offsets), want)
    V[0, 1] = 1e-30           # bfloat16's range ends near 1e-38 (1e-300 would round to zero there)
    assert torch.equal(nonzero_parts(V.to(torch.bfloat16), offsets), want)
    assert nonzero_parts(V, [0]).shape == (4, 0)


def test_kept_outputs_needs_a_nonzero_part_in_some_row_and_a_graph():
    g = [torch.ones(2, requires_grad=True) * 1 for _ in range(4)]
    g[1] = None                                  # an unused parameter
    g[3] = torch.ones(2)                         # a gradient without graph (a parameter the loss is linear in)
    parts = [torch.zeros(3, 2) for _ in range(4)]
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert [j for j, _, _ in kept_outputs(g, parts, mask)] == [0, 2]
    assert [j for j, _, _ in kept_outputs(g, parts, mask[:2])] == [0]
    assert [j for j, _, _ in kept_outputs(g, parts, None)] == [0, 2]


def test_dense_at_starts_decides_dense_blocks_from_one_entry_per_part():
    offsets = [0, 3, 3, 7, 8]
    V = torch.zeros(2, 8)
    V[0, 0], V[1, 3], V[0, 7] = 1.0, -1.0, 2.0  # the first coordinate of every nonempty slice, in some row
    assert dense_at_starts(V, offsets)
    V[1, 3], V[1, 4] = 0.0, 5.0                 # slice [3, 7) nonzero, but not at its start: scan it
    assert not dense_at_starts(V, offsets)
    assert not dense_at_starts(V, [0, 0])


def test_only_blocks_on_the_exact_device_route_are_inspected(monkeypatch):
    model, loss, batches, mode = make_case("tanh_mlp")
    land = gp.Landscape(model, loss, batches, mode=mode)
    V = _columns(land.dim, range(MIN_ROWS))
    assert part_mask(land, V[:1]) is None  # a lone vector pays nothing
    assert part_mask(land, V).shape == (MIN_ROWS, len(land.params))
    scans = []
    monkeypatch.setattr(pruned_outputs, "nonzero_parts", lambda *a: scans.append(1))
    dense = torch.randn(4, land.dim, dtype=torch.float64)
    assert part_mask(land, dense) is None and not scans  # nothing to leave out, found without a scan
    fd = gp.Landscape(model, loss, batches, mode=mode, hvp_method="finite-difference")
    assert part_mask(fd, V) is None
    host = gp.Landscape(model, loss, batches, mode=mode, vector_device="cpu")
    assert host.host is not None and part_mask(host, V) is None


# ------------------------------------------------------------------------------ how column chunks are formed
def test_top_aligned_sorts_and_puts_the_short_piece_at_the_bottom():
    idx = [40, 3, 17, 9, 30, 22, 1, 35, 11, 5]
    assert top_aligned(idx, 4) == [[1, 3], [5, 9, 11, 17, 22, 30, 35, 40]]
    assert top_aligned(idx[:8], 4) == [sorted(idx[:8])]  # divides: one piece
    assert top_aligned([], 16) == []
    assert top_aligned([7, 2], 16) == [[2, 7]]


def _deep_mlp():
    torch.manual_seed(0)
    layers = [nn.Linear(6, 9)]
    for _ in range(4):
        layers += [nn.Tanh(), nn.Linear(9, 9)]
    model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(9, 3)).double()
    g = torch.Generator().manual_seed(0)
    return model, (torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))


def test_column_reads_come_in_sorted_chunks_of_neighbouring_blocks_aligned_to_the_top():
    from geomprobe.metrics.diagshare import diagshare
    from geomprobe.metrics.precond import precond

    model, data = _deep_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.CrossEntropyLoss()(model(data[0]), data[1]).backward()
    opt.step()  # the preconditioner's state; the Landscape is built at the new parameters
    opt.zero_grad()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), data, chunk_size=8)
    inner, chunks = land.hvp, []

    def recording(v, out=None):
        V = v.reshape(-1, land.dim)
        if V.shape[0] > 1 and bool((V.count_nonzero(1) == 1).all()) and bool((V.sum(1) == 1).all()):
            chunks.append(V.argmax(1).tolist())  # a chunk of columns e_j
        return inner(v) if out is None else inner(v, out=out)

    land.hvp = recording
    options = {"exact_threshold": 0, "k": 7, "top": 3, "screen_samples": 4, "bootstrap": 20}
    precond(land, optimizer=opt, rmed_options=options, max_iter=8)  # rmed's reads, then the scaled candidates
    diagshare(land, exact_threshold=0, k=11, hvps=200, bootstrap=20, rel_tol=0)  # tops up rmed's columns
    assert len(chunks) >= 6
    passes = [[chunks[0]]]
    for c in chunks[1:]:  # a pass is a run of chunks each above the last
        (passes[-1].append(c) if c[0] > passes[-1][-1][-1] else passes.append([c]))
    assert len(passes) >= 3  # rmed's sample, its candidates, precond's scaled candidates (diagshare's top-up)
    for p in passes:
        # sorted within and across chunks: a chunk holds the columns of a run of blocks that the pass reads
        assert all(c == sorted(c) for c in p)
        # every chunk but the lowest is full: the short one, where there is one, is the dearest (lowest) place
        assert all(len(c) == land.chunk_size for c in p[1:]), [len(c) for c in p]
    assert any(len(p[0]) < land.chunk_size for p in passes)  # the alignment was put to the test


@pytest.mark.parametrize("name", ["causal", "gqa bool mask"])
def test_the_recomputing_attention_takes_pruned_chunks_exactly(name):
    # its double backward is a Function that receives zero or missing gradients where outputs were left out
    from test_attndouble import _case as attention_case

    model, loss_fn, x, y = attention_case(name)
    H = dense_hessian(model, loss_fn, [(x, y)])
    land = gp.Landscape(model, loss_fn, (x, y), recompute_attention=True)
    assert land.recompute_attention
    scale = max(1.0, H.abs().max().item())
    for blk in land.blocks:  # the columns of each block alone: q, k and v's gradients apart
        V = _columns(land.dim, range(blk.start, min(blk.stop, blk.start + 5)))
        assert torch.allclose(land.hvp(V), V @ H, rtol=0, atol=FLOAT64_EXACT * scale), blk.name
