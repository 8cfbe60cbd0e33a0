"""The float64 problems of the 2-rank FSDP2 checks (tests/test_fsdp.py, tests/fsdp_worker.py): the models,
their data shards, the sharding, and a log of the largest tensor created inside a block of code."""

from __future__ import annotations

import torch
from torch import nn

N_SAMPLES = 23
SHARDS = ([(0, 8), (8, 13)], [(13, 23)])
HVP_VECTORS = 3
PROBE_STEPS = 4
SEQ, WIDTH, CLASSES = 4, 8, 3


class Block(nn.Module):
    """A pre-norm transformer block (2 heads, causal-free softmax attention, GELU MLP) and a linear head on the
    mean over positions: the layers of a language model, small enough for a dense float64 Hessian."""

    def __init__(self, width: int = WIDTH, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, CLASSES)
        self.register_buffer("scale", torch.tensor(1.0))  # a buffer the state check watches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, w))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1) * self.scale)


def make_problem(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The float64 model (``"mlp"`` or ``"block"``), its loss and the full probe data, identical in every process."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        X = torch.randn(N_SAMPLES, 5, dtype=torch.float64, generator=g)
    else:
        model = Block().double()
        X = torch.randn(N_SAMPLES, SEQ, WIDTH, dtype=torch.float64, generator=g)
    y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def shard_model(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in (model if isinstance(model, nn.Sequential) else [model.qkv, model.proj, model.mlp, model.head]):
        if any(True for _ in m.parameters()):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def hvp_vectors(dim: int) -> torch.Tensor:
    return torch.randn(HVP_VECTORS, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


class Gated(nn.Module):
    """An MLP with an extra head used only on batches whose first feature is positive: on a rank whose data
    has none, that head's parameters get no gradient at all (a data-dependent graph)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if bool((x[:, 0] > 0).all()):
            out = out + torch.tanh(self.aux(h))
        return out


def gated_problem() -> tuple[nn.Module, object, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The gated model, its loss ``loss_fn(model, batch)`` and the three probe batches of SHARDS: rank 0's
    use the extra head, rank 1's does not."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = Gated().double()
    X = torch.randn(N_SAMPLES, 5, dtype=torch.float64, generator=g)
    X[:, 0] = torch.where(torch.arange(N_SAMPLES) < SHARDS[1][0][0], 1.0, -1.0).double() * (1 + X[:, 0].abs())
    y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=g)

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return model, loss_fn, [(X[a:b], y[a:b]) for shard in SHARDS for a, b in shard]


class AllocationLog:
    """The largest tensor (elements) any operation creates inside, and the operations seen (a dispatch mode,
    so the double backward's operations are seen as well as the collectives' buffers)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        log.largest = max(log.largest, t.numel())
                log.ops.add(str(func))
                return out

        self.largest, self.ops, self._mode = 0, set(), Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def sharded_case(kind: str, mesh, rank: int) -> tuple[nn.Module, object, list]:
    """``make_problem(kind)`` sharded over ``mesh`` with this rank's batches, or for ``"gated"`` the model whose
    head gets no gradient on one rank (its body and root sharded, rank 0 two batches, rank 1 the rest)."""
    if kind == "gated":
        from torch.distributed.fsdp import fully_shard

        model, loss_fn, batches = gated_problem()
        fully_shard(model.body, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, loss_fn, batches[:2] if rank == 0 else batches[2:]
    model, loss_fn, X, y = make_problem(kind)
    return shard_model(model, mesh), loss_fn, [(X[a:b], y[a:b]) for a, b in SHARDS[rank]]


def end_worker() -> None:
    """A two-rank worker's last step: wait for the other rank, leave the process group, and exit without the
    interpreter's teardown (the results are saved; static destructors of the communication threads are not
    what the tests are about, and some sandboxes abort in them)."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
