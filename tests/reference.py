"""Dense float64 references and the small models the core is checked on."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from geomprobe.engine.state import frozen


def dense_hessian(model: nn.Module, loss_fn, batches, *, mode: str = "eval", seed: int = 0) -> torch.Tensor:
    """The exact Hessian of the sample-weighted loss over ``batches`` by torch.autograd.functional.hessian."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    total = sum(b[1].shape[0] for b in batches)
    H = torch.zeros(w0.numel(), w0.numel(), dtype=w0.dtype)
    for i, (x, y) in enumerate(batches):
        def f(w):
            parts = torch.split(w, sizes)
            params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
            return loss_fn(functional_call(model, params, (x,)), y) * (y.shape[0] / total)

        with frozen(model, mode, seed=seed + i):
            H += torch.autograd.functional.hessian(f, w0, vectorize=True)
    return (H + H.T) / 2


class TanhMLP(nn.Module):
    def __init__(self, d_in=6, hidden=10, d_out=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class TinyTransformer(nn.Module):
    """One pre-norm block with scaled-dot-product attention, over token embeddings, mean-pooled."""

    def __init__(self, vocab=7, d=8, heads=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)
        self.heads = heads

    def forward(self, tokens):
        h = self.emb(tokens)
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, D))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 2))

    def forward(self, x):
        return self.net(x)


def make_case(name: str, dtype=torch.float64, seed: int = 0):
    """(model, loss_fn, batches, mode) for one of the reference cases, with unequal batch sizes."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "tanh_mlp":
        model = TanhMLP()
        X = torch.randn(23, 6, generator=g)
        y = torch.randint(0, 3, (23,), generator=g)
        mode, loss = "eval", nn.CrossEntropyLoss()
    elif name == "cnn_bn":
        model = SmallCNN()
        X = torch.randn(23, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (23,), generator=g)
        mode, loss = "eval", nn.CrossEntropyLoss()
        # non-trivial running statistics so eval-mode BatchNorm differs from batch statistics
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            model.bn.running_var.uniform_(0.5, 2.0, generator=g)
    elif name == "transformer":
        model = TinyTransformer()
        X = torch.randint(0, 7, (23, 5), generator=g)
        y = torch.randint(0, 3, (23,), generator=g)
        mode, loss = "eval", nn.CrossEntropyLoss()
    elif name == "dropout_train":
        model = DropoutMLP()
        X = torch.randn(23, 5, generator=g)
        y = torch.randn(23, 2, generator=g)
        mode, loss = "train", nn.MSELoss()
    else:
        raise KeyError(name)
    model = model.to(dtype)
    if X.is_floating_point():
        X = X.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    batches = [(X[:16], y[:16]), (X[16:], y[16:])]
    return model, loss, batches, mode


CASES = ["tanh_mlp", "cnn_bn", "transformer", "dropout_train"]


def relerr(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(scale), 1e-300)


def isclose_all(x, y, tol):
    return all(math.isclose(a, b, rel_tol=tol, abs_tol=tol) for a, b in zip(x, y))


class OnceDifferentiableCube(torch.autograd.Function):
    """x -> x^3 with a backward marked once-differentiable: a layer whose HVP terms autograd would drop."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.pow(3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x.pow(2) * g
