"""Small models for the demo and the studies."""

from __future__ import annotations

from torch import nn

__all__ = ["DigitsMLP"]


class DigitsMLP(nn.Module):
    """An MLP for 8x8 digits: 64 -> hidden (tanh) -> ... -> 10. Smooth, so its Hessian has no kinks."""

    def __init__(self, hidden: tuple[int, ...] = (64,), d_in: int = 64, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
