"""Models the benchmarks measure: an MLP, a CIFAR-size ResNet-18 and a 6-layer transformer language model.

Written here (torchvision is not a dependency) with standard shapes: ResNet-18 has 11.2M parameters at
10 classes; the transformer has d_model 512, 8 heads, 6 layers, a 1024-token vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=784, width=1024, depth=3, classes=10):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as used on CIFAR-10."""

    def __init__(self, classes=10, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        sh = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, vocab=1024, d=512, heads=8, layers=6, context=128):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x))).flatten(0, 1)


def lm_loss(logits, targets):
    return F.cross_entropy(logits, targets.flatten())


def make(name: str, batch: int, device, generator: torch.Generator, small: bool = False):
    """(model, loss_fn, (inputs, targets)) for a benchmark case; ``small`` shrinks it for CPU runs. The weights
    come from a generator seeded by ``generator``'s seed, so reruns and separate scripts measure the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator.initial_seed())
        return _make(name, batch, device, generator, small)


def _make(name: str, batch: int, device, generator: torch.Generator, small: bool):
    if name == "mlp":
        model = MLP(width=256 if small else 1024)
        x = torch.randn(batch, 784, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        loss = nn.CrossEntropyLoss()
    elif name == "resnet18":
        model = ResNet18(width=16 if small else 64)
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        loss = nn.CrossEntropyLoss()
    elif name == "transformer":
        model = TransformerLM(d=128 if small else 512, heads=4 if small else 8, layers=6, context=64 if small else 128)
        T = 64 if small else 128
        x = torch.randint(0, 1024, (batch, T), generator=generator)
        y = torch.randint(0, 1024, (batch, T), generator=generator)
        loss = lm_loss
    else:
        raise KeyError(name)
    return model.to(device), loss, (x.to(device), y.to(device))
