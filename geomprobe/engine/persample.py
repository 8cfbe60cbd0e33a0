"""Gradient samples at a frozen iterate: per-example gradients and per-minibatch gradients.

The noise metrics (docs/metrics.md#noise, docs/metrics.md#isotropy) need many stochastic gradients ``g_1..g_P``
at the same parameters. Two
sources give them, each an iterable of row blocks ``(c, d)`` in the Landscape's flat layout, which can be
iterated again (a second pass recomputes the same rows):

- :class:`PerExampleGradients`: one row per example of the probe batches, by ``torch.func``
  (``functional_call`` + ``vmap(grad)``) over chunks of examples, so memory is ``chunk_size x d`` plus one
  chunk's activations; chunks shrink to fit a byte budget (the Landscape's memory plan gives one), so at
  100M+ parameters the rows stream into the statistics a few at a time. The per-example loss is ``loss_fn`` on a batch of one, which is the right thing
  when the batch loss is the **mean** of per-example losses (torch's default ``reduction="mean"``): then
  the mean of the rows is the Landscape's gradient. Where ``vmap`` cannot run (BatchNorm in train mode
  writes its running statistics in place, dropout draws random numbers, the ``loss_fn(model, batch)`` form
  has no per-example split) it falls back to micro-batches of one example, and says so in ``method``.
- :class:`MinibatchGradients`: one row per minibatch of an iterable of batches of the training batch size
  (:func:`sample_minibatches` draws such batches from tensors with a local generator).
- :class:`GatheredGradients`: under data-parallel probing, the union of every rank's samples of either
  kind, in rank order, on every rank.

Every forward runs inside ``Landscape.frozen``: the model comes back exactly as found and the global RNG is
not moved. Cost: one gradient per example (or minibatch) per pass; no HVPs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..errors import ConfigurationError, UnsupportedOperationError
from .batches import batch_size as _batch_size
from .batches import resolve_batches
from .memory_plan import persample_row_bytes

__all__ = ["PerExampleGradients", "MinibatchGradients", "GatheredGradients", "sample_minibatches",
           "PER_EXAMPLE_METHODS"]

PER_EXAMPLE_METHODS = ("auto", "vmap", "microbatch")


def _take(obj: Any, index: torch.Tensor | slice, n: int) -> Any:
    """The examples ``index`` of a batch: every tensor whose leading dimension is the batch size ``n``."""
    if isinstance(obj, torch.Tensor):
        return obj[index] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        parts = [_take(o, index, n) for o in obj]
        return type(obj)(*parts) if hasattr(obj, "_fields") else type(obj)(parts)
    if isinstance(obj, dict):
        return type(obj)((k, _take(v, index, n)) for k, v in obj.items())
    return obj


def _flat_rows(land: Any, grads: Sequence[torch.Tensor | None], rows: int) -> torch.Tensor:
    if all(g is None for g in grads):
        return torch.zeros(rows, land.dim, dtype=land.dtype, device=land.device)
    return land.space.flatten(grads, batch_dims=1).reshape(rows, land.dim)


class PerExampleGradients:
    """Per-example gradients of ``land``'s loss on its probe batches (or on ``batches``), ``chunk_size`` at a time.

    Args:
        land: the :class:`~geomprobe.Landscape` (its model, loss, parameter selection and mode policy).
        batches: examples to use instead of the Landscape's probe batches.
        chunk_size: examples per ``vmap`` call at most; memory grows with it.
        max_bytes: bytes a chunk may take while its rows stream into the statistics, ``rows x``
            :func:`~geomprobe.engine.memory_plan.persample_row_bytes` (the rows in the model's dtype, their
            flattening, the statistics' float64 copies, each example's forward and backward); the chunk is cut
            to fit, down to one example. ``None``: the Landscape's memory plan's ``persample_bytes``, if any.
        method: ``"auto"`` (``vmap``, falling back to micro-batches when it cannot run), ``"vmap"`` or
            ``"microbatch"``.
        max_samples: use only the first ``max_samples`` examples.

    Iterating yields detached ``(c, d)`` blocks in the Landscape's dtype and flat layout. After the first
    block, :attr:`method` says which route ran and :attr:`fallback_reason` why ``vmap`` was abandoned.

    >>> import torch
    >>> from torch import nn
    >>> from geomprobe import Landscape
    >>> X = torch.eye(3, dtype=torch.float64)
    >>> model = nn.Linear(3, 1, bias=False).double()
    >>> _ = nn.init.zeros_(model.weight)
    >>> land = Landscape(model, nn.MSELoss(), (X, torch.ones(3, 1, dtype=torch.float64)))
    >>> src = PerExampleGradients(land)
    >>> G = src.matrix()                       # w = 0: each example's gradient is -2 y x = -2 e_i
    >>> G.tolist(), src.method
    ([[-2.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, -2.0]], 'vmap')
    >>> torch.allclose(G.mean(0), land.grad)   # a mean loss: the rows average to the gradient
    True
    """

    source = "per-example"
    batch_size = 1

    def __init__(
        self,
        land: Any,
        batches: Any = None,
        *,
        chunk_size: int = 32,
        method: str = "auto",
        max_samples: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if method not in PER_EXAMPLE_METHODS:
            raise ConfigurationError(f"method must be one of {PER_EXAMPLE_METHODS}, got {method!r}")
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be >= 1, got {chunk_size}")
        self.land = land
        self.batches = land.batches if batches is None else resolve_batches(batches)
        self.sizes = [_batch_size(b) for b in self.batches]
        plan = getattr(land, "plan", None)
        if max_bytes is None and plan is not None:
            max_bytes = plan.persample_bytes
        if max_bytes is not None and max_bytes < 1:
            raise ConfigurationError(f"max_bytes must be >= 1, got {max_bytes}")
        # per-example gradients run torch's attention, whichever attention the Landscape's graphs use
        per_sample = (getattr(land, "graph_figures", None) or {}).get("math") or getattr(land, "graph_bytes_per_sample", None)
        if per_sample is None and plan is not None:
            per_sample = plan.graph_bytes_per_sample
        #: modelled bytes of one row in flight (see ``max_bytes``)
        self.row_bytes = persample_row_bytes(land.dim, land.dtype.itemsize, per_sample)
        self.max_bytes = max_bytes
        fit = chunk_size if max_bytes is None else max(1, max_bytes // self.row_bytes)
        self.chunk_size = int(min(chunk_size, fit))
        total = sum(self.sizes)
        self.count = total if max_samples is None else min(total, int(max_samples))
        self.fallback_reason: str | None = None
        if land.loss_form == "model" and method != "microbatch":
            if method == "vmap":
                raise ConfigurationError(
                    "vmap per-example gradients need loss_fn(outputs, targets); a loss_fn(model, batch) has "
                    "no per-example split. Use method='microbatch' or 'auto'"
                )
            method = "microbatch"
            self.fallback_reason = "loss_fn(model, batch) form: examples are split by slicing the batch"
        self.method: str | None = None if method == "auto" else method
        self._requested = method

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        left = self.count
        for b, (batch, n) in enumerate(zip(self.batches, self.sizes)):
            for s in range(0, n, self.chunk_size):
                if left <= 0:
                    return
                c = min(self.chunk_size, n - s, left)
                yield self._chunk(b, batch, n, slice(s, s + c), c)
                left -= c

    def matrix(self) -> torch.Tensor:
        """All rows at once, ``(P, d)``: for small models and tests (memory ``P x d``)."""
        return torch.cat(list(self), dim=0)

    # ------------------------------------------------------------------ the two routes
    def _chunk(self, b: int, batch: Any, n: int, rows: slice, c: int) -> torch.Tensor:
        if self.method in (None, "vmap"):
            try:
                out = self._vmap_chunk(b, batch, n, rows, c)
                self.method = "vmap"
                return out
            except Exception as e:  # any failure inside vmap means: try one example at a time
                if self.method == "vmap" and self._requested == "vmap":
                    raise UnsupportedOperationError(
                        f"vmap per-example gradients failed on this model ({_first_line(e)}); "
                        "use method='microbatch' or 'auto'"
                    ) from e
                self.method = "microbatch"
                self.fallback_reason = _first_line(e)
        return self._microbatch_chunk(b, batch, n, rows, c)

    def _vmap_chunk(self, b: int, batch: Any, n: int, rows: slice, c: int) -> torch.Tensor:
        land = self.land
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigurationError("loss_fn(outputs, targets) needs (inputs, targets) batches")
        inputs, targets = _take(batch[0], rows, n), _take(batch[1], rows, n)
        params = {name: p.detach() for name, p in zip(land.param_names, land.params)}

        def loss_one(pdict: dict, x: Any, y: Any) -> torch.Tensor:
            # Inside vmap each example has lost its batch dimension; give it back as a batch of one.
            x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)
            y1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y)
            if isinstance(x1, dict):
                out = functional_call(land.model, pdict, (), x1)
            elif isinstance(x1, (tuple, list)):
                out = functional_call(land.model, pdict, tuple(x1))
            else:
                out = functional_call(land.model, pdict, (x1,))
            return land.loss_fn(out, y1).reshape(())

        with land.frozen(b):
            g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, inputs, targets)
        return _flat_rows(land, [g[name] for name in land.param_names], c).detach()

    def _microbatch_chunk(self, b: int, batch: Any, n: int, rows: slice, c: int) -> torch.Tensor:
        land = self.land
        out = torch.empty(c, land.dim, dtype=land.dtype, device=land.device)
        with land.frozen(b):
            for k, i in enumerate(range(rows.start, rows.stop)):
                one = _take(batch, slice(i, i + 1), n)
                try:
                    loss = land.loss_on(one)
                except ValueError as e:
                    if "more than 1 value per channel" in str(e):
                        raise UnsupportedOperationError(
                            "per-example gradients need a forward pass on one example, and a BatchNorm in train "
                            f"mode cannot normalize a single value per channel ({_first_line(e)}); use "
                            "mode='eval', or minibatch noise through noise_data="
                        ) from e
                    raise
                grads = torch.autograd.grad(loss, land.params, allow_unused=True)
                out[k] = _flat_rows(land, [None if x is None else x.unsqueeze(0) for x in grads], 1)[0]
        return out


class MinibatchGradients:
    """One gradient per minibatch of ``batches`` at ``land``'s parameters (loss, selection and mode of ``land``).

    ``batches`` is a list or any iterable of batches of the training batch size, read once and kept (they
    are small beside the gradients). All must have the same size: a smaller last batch (a DataLoader without
    ``drop_last=True``) would have a different noise covariance. Iterating yields ``(1, d)`` rows.
    """

    source = "minibatch"
    method = "minibatch"
    fallback_reason = None

    def __init__(self, land: Any, batches: Any) -> None:
        self.land = land
        self.batches = [b for b in resolve_batches(batches)]
        sizes = sorted({_batch_size(b) for b in self.batches})
        if len(sizes) > 1:
            raise ConfigurationError(
                f"noise batches must all have the training batch size, got sizes {sizes}; drop the odd ones "
                "(DataLoader(..., drop_last=True))"
            )
        self.batch_size = sizes[0]
        self.count = len(self.batches)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        land = self.land
        for p, batch in enumerate(self.batches):
            batch = _to(batch, land.device)
            with land.frozen(p):
                grads = torch.autograd.grad(land.loss_on(batch), land.params, allow_unused=True)
            yield _flat_rows(land, [None if x is None else x.unsqueeze(0) for x in grads], 1)


class GatheredGradients:
    """The union over ranks of each rank's gradient samples ``local``, on every rank, in rank order.

    Rank 0's rows come first, then rank 1's, and so on: the order one process would read the union of the
    shards in, so every statistic (tail indices split values into consecutive partitions, the jackknife
    groups are consecutive samples) equals the single-process one on the union, and every rank holds the
    same bits. ``max_samples`` caps the union as one process would cap it (the first samples in that order).

    Each block of rows is broadcast by the rank that computed it while the others wait, so memory stays one
    block beyond what the statistics hold (as for a local source), at the price of the ranks computing
    their gradients in turn rather than at once. Iterating again recomputes and re-broadcasts the rows (the
    second pass of :func:`~geomprobe.stats.gradient_noise.collect_noise`). Every rank must iterate in lock-step; they
    do, since each consumes the same rows.
    """

    def __init__(self, local: Any, reducer: Any, *, max_samples: int | None = None) -> None:
        self.local = local
        self.reducer = reducer
        self.source = local.source
        sizes = reducer.gather_ints(local.batch_size)
        if len(set(sizes)) > 1:  # every rank sees the same sizes, so every rank raises
            raise ConfigurationError(
                f"noise batches must have the same training batch size on every rank, got {sizes} by rank"
            )
        self.batch_size = sizes[0]
        left = None if max_samples is None else int(max_samples)
        self.counts: list[int] = []
        for n in reducer.gather_ints(len(local)):
            take = n if left is None else max(0, min(n, left))
            self.counts.append(take)
            left = None if left is None else left - take
        self.count = sum(self.counts)

    @property
    def method(self) -> str | None:
        return self.local.method

    @property
    def fallback_reason(self) -> str | None:
        return self.local.fallback_reason

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        land = self.local.land
        empty = torch.empty(0, land.dim, dtype=land.dtype, device=land.device)
        for r, n in enumerate(self.counts):
            if n == 0:
                continue
            if r == self.reducer.rank:
                left = n
                for rows in self.local:
                    rows = rows.detach()[:left].to(empty)
                    if rows.shape[0] == 0:
                        continue  # an empty block would read as "this rank is done" on the others
                    yield self.reducer.broadcast_rows(rows, r)
                    left -= rows.shape[0]
                    if left == 0:
                        break
                if left > 0:
                    # The local source came up short: an empty block tells the others, so that every rank
                    # ends the pass together and the statistics report the shortfall on every rank.
                    self.reducer.broadcast_rows(empty, r)
                    return
            else:
                got = 0
                while got < n:
                    rows = self.reducer.broadcast_rows(empty, r)
                    if rows.shape[0] == 0:
                        return
                    got += rows.shape[0]
                    yield rows


def sample_minibatches(
    data: Any,
    batch_size: int,
    num_batches: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> list[Any]:
    """``num_batches`` minibatches of ``batch_size`` examples drawn from ``data``, independently of each other.

    ``data`` is a batch holding the whole data set (an ``(inputs, targets)`` pair of tensors, or any nest of
    tensors sharing the leading dimension ``N``). Each minibatch takes ``batch_size`` distinct examples
    uniformly at random (without replacement inside a minibatch, independently across minibatches), from a
    local CPU generator: the global RNG does not move.

    >>> X, Y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    >>> bs = sample_minibatches((X, Y), 4, 3, seed=0)
    >>> len(bs), tuple(bs[0][0].shape), bool((bs[0][0][:, 0].long() == bs[0][1]).all())
    (3, (4, 1), True)
    """
    n = _batch_size(data)
    if not 1 <= batch_size <= n:
        raise ConfigurationError(f"batch_size must lie in [1, {n}] (the data size), got {batch_size}")
    if num_batches < 1:
        raise ConfigurationError(f"num_batches must be >= 1, got {num_batches}")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        out.append(_take(data, idx.to(_device_of(data)), n))
    return out


def _device_of(data: Any) -> torch.device:
    found: list[torch.device] = []
    tree_map(lambda t: found.append(t.device) if isinstance(t, torch.Tensor) else None, data)
    return found[0] if found else torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"
