"""The probe must not leak autograd graphs: rebuilt micro-batch graphs and closed Landscapes free their memory.

Live tensors are counted with the garbage collector; a leaked graph keeps its activations alive (each rebuilt
micro-batch graph used to leak through a reference cycle between a saved output and its own grad_fn, which
the collector cannot see because it runs through C++).
"""

import gc
import warnings

import torch
from torch import nn

import geomprobe as gp


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # some of torch's deprecated objects warn when type-checked
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    g = torch.Generator().manual_seed(1)
    return model, nn.CrossEntropyLoss(), torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_rebuilt_micro_batch_graphs_are_freed_after_each_hvp():
    model, loss_fn, x, y = _problem()
    land = gp.Landscape(model, loss_fn, (x, y), micro_batch_size=8, graph_budget_bytes=1)
    v = torch.randn(land.dim, generator=torch.Generator().manual_seed(2))
    land.hvp(v)
    before = _live_tensors()
    for _ in range(5):
        land.hvp(v)
    assert land.info()["graph_rebuilds"] == 6 * 4  # a budget below one graph: all four micro-batches rebuilt per HVP
    assert _live_tensors() == before


def test_closing_a_landscape_frees_its_graph():
    model, loss_fn, x, y = _problem()
    gp.Landscape(model, loss_fn, (x, y)).close()  # first-call caches (dispatcher, RNG) out of the way
    before = _live_tensors()
    land = gp.Landscape(model, loss_fn, (x, y))
    land.hvp(torch.ones(land.dim))
    land.close()
    del land
    assert _live_tensors() == before
