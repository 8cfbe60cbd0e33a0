"""Per-example and per-minibatch gradients: equal to a plain loop, vmap's fallback, state left as found."""

import copy

import pytest
import torch
from tolerances import FLOAT64_EXACT
from torch import nn

import geomprobe as gp
from geomprobe.engine.persample import MinibatchGradients, PerExampleGradients, sample_minibatches


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class _BNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def _batches(n_sizes=(7, 5), d_in=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
            for n in n_sizes]


def _loop(model, loss_fn, batches, mode="eval"):
    """The reference: one forward/backward per example on a copy of the model."""
    m = copy.deepcopy(model).train(mode == "train")
    rows = []
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = loss_fn(m(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk_size", [1, 3, 32])
def test_vmap_rows_equal_a_loop_over_single_examples(chunk_size):
    model, batches = _mlp(), _batches()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), batches)
    src = PerExampleGradients(land, chunk_size=chunk_size)
    G = src.matrix()
    assert src.method == "vmap" and src.fallback_reason is None and len(src) == 12
    assert torch.allclose(G, _loop(model, nn.CrossEntropyLoss(), batches), rtol=0, atol=FLOAT64_EXACT)
    # A mean loss: the rows average to the Landscape's (sample-weighted) gradient.
    assert torch.allclose(G.mean(0), land.grad, rtol=0, atol=FLOAT64_EXACT)


def test_microbatch_route_equals_vmap_and_max_samples_truncates():
    model, batches = _mlp(), _batches()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), batches)
    G = PerExampleGradients(land).matrix()
    src = PerExampleGradients(land, method="microbatch", max_samples=9)
    assert torch.allclose(src.matrix(), G[:9], rtol=0, atol=FLOAT64_EXACT)
    assert src.method == "microbatch" and len(src) == 9


def test_selected_parameters_only():
    model, batches = _mlp(), _batches()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), batches, params="2.*")
    G = PerExampleGradients(land).matrix()
    full = _loop(model, nn.CrossEntropyLoss(), batches)
    assert G.shape == (12, 6 * 3 + 3)
    assert torch.allclose(G, full[:, -21:], rtol=0, atol=FLOAT64_EXACT)


def test_batchnorm_train_mode_falls_back_to_microbatches_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = _BNConv().double()
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    model.train()
    stats = copy.deepcopy(model.bn.state_dict())
    rng = torch.get_rng_state()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), (X, Y), mode="train")
    src = PerExampleGradients(land, chunk_size=4)
    G = src.matrix()
    assert src.method == "microbatch"
    assert "RuntimeError" in src.fallback_reason
    # Per-example in train mode: each example normalized by its own statistics, as a batch of one.
    assert torch.allclose(G, _loop(model, nn.CrossEntropyLoss(), [(X, Y)], mode="train"), rtol=0, atol=FLOAT64_EXACT)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_batchnorm_eval_mode_runs_under_vmap():
    torch.manual_seed(0)
    model = _BNConv().double()
    X = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    Y = torch.randint(0, 3, (5,))
    land = gp.Landscape(model, nn.CrossEntropyLoss(), (X, Y), mode="eval")
    src = PerExampleGradients(land)
    G = src.matrix()
    assert src.method == "vmap"
    assert torch.allclose(G, _loop(model, nn.CrossEntropyLoss(), [(X, Y)], mode="eval"), rtol=0, atol=FLOAT64_EXACT)


def test_dropout_in_train_mode_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), _batches((10,)), mode="train")
    src = PerExampleGradients(land)
    assert src.matrix().shape == (10, land.dim) and src.method == "microbatch"
    assert "random" in src.fallback_reason


def test_model_loss_form_uses_microbatches():
    model, batches = _mlp(), _batches()

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    land = gp.Landscape(model, loss, batches)
    src = PerExampleGradients(land)
    assert src.method == "microbatch" and "loss_fn(model, batch)" in src.fallback_reason
    assert torch.allclose(src.matrix(), _loop(model, nn.CrossEntropyLoss(), batches), rtol=0, atol=FLOAT64_EXACT)


def test_dict_inputs_go_through_vmap():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 1), nn.Linear(3, 1)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    torch.manual_seed(0)
    model = Two().double()
    left, right = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    land = gp.Landscape(model, nn.MSELoss(), [({"left": left, "right": right}, y)])
    src = PerExampleGradients(land)
    G = src.matrix()
    assert src.method == "vmap"
    assert torch.allclose(G.mean(0), land.grad, rtol=0, atol=FLOAT64_EXACT)


def test_forced_vmap_on_batchnorm_train_is_a_clear_error():
    torch.manual_seed(0)
    land = gp.Landscape(_BNConv().double(), nn.CrossEntropyLoss(),
                        (torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])), mode="train")
    with pytest.raises(gp.UnsupportedOperationError, match="vmap per-example gradients failed"):
        PerExampleGradients(land, method="vmap").matrix()


def test_batchnorm1d_train_on_single_examples_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    land = gp.Landscape(model, nn.CrossEntropyLoss(), _batches((8,)), mode="train")
    with pytest.raises(gp.UnsupportedOperationError, match="single value per channel"):
        PerExampleGradients(land).matrix()


def test_bad_options():
    land = gp.Landscape(_mlp(), nn.CrossEntropyLoss(), _batches())
    with pytest.raises(gp.ConfigurationError, match="method must be one of"):
        PerExampleGradients(land, method="jit")
    with pytest.raises(gp.ConfigurationError, match="chunk_size must be >= 1"):
        PerExampleGradients(land, chunk_size=0)


def test_minibatch_rows_are_batch_gradients_and_the_rng_does_not_move():
    model = _mlp()
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))
    rng = torch.get_rng_state()
    noise_batches = sample_minibatches(data, 8, 5, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [tuple(b[0].shape) for b in noise_batches] == [(8, 4)] * 5
    again = sample_minibatches(data, 8, 5, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(noise_batches, again))
    land = gp.Landscape(model, nn.CrossEntropyLoss(), _batches())
    src = MinibatchGradients(land, noise_batches)
    rows = torch.cat(list(src))
    assert src.batch_size == 8 and len(src) == 5 and src.method == "minibatch"
    for r, (x, y) in zip(rows, noise_batches):
        ref = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), list(model.parameters()))
        assert torch.allclose(r, torch.cat([t.reshape(-1) for t in ref]), rtol=0, atol=FLOAT64_EXACT)


def test_minibatch_bad_inputs():
    land = gp.Landscape(_mlp(), nn.CrossEntropyLoss(), _batches())
    with pytest.raises(gp.ConfigurationError, match="training batch size"):
        MinibatchGradients(land, _batches((8, 8, 5)))
    data = (torch.randn(10, 4, dtype=torch.float64), torch.zeros(10, dtype=torch.long))
    with pytest.raises(gp.ConfigurationError, match=r"batch_size must lie in \[1, 10\]"):
        sample_minibatches(data, 11, 3)
    with pytest.raises(gp.ConfigurationError, match="num_batches must be >= 1"):
        sample_minibatches(data, 2, 0)
