"""Small models and data sets shared by the tests."""

import itertools

import torch
from torch import nn

from dsas_diffusion.steering import HookPoint, LinearGate, SteeringLayer, SteeringMap

WIDTH = 6


class ResidualBlock(nn.Module):
    """``x + tanh(W x + b)``: its output is the residual stream, like a decoder block's."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class TokenNet(nn.Module):
    """A small residual token model: (B, N, C) -> (B, N, C), blocks named blocks.0 ..."""

    def __init__(self, width: int = 16, depth: int = 3, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make_sets(width: int = 16, batches: int = 8, batch: int = 4, tokens: int = 6, seed: int = 0, shift: float = 2.0):
    """Source = control-like inputs plus a concept direction on the first unit; target = control."""
    generator = torch.Generator().manual_seed(seed)
    concept = torch.zeros(width)
    concept[0] = shift

    def draw(offset: torch.Tensor) -> list[torch.Tensor]:
        return [torch.randn(batch, tokens, width, generator=generator) + offset for _ in range(batches)]

    return draw(concept), draw(torch.zeros(width)), draw(torch.zeros(width))


def layer_kinds(layout: str):
    """``(name, layer)`` for every kind of steering layer of ``WIDTH`` features: shift or affine
    map (with and without a support), sigmoid or ReLU gate, with a floor and an accuracy scale
    or without (a sigmoid floored at ½ is computed as a tanh by the inference form)."""
    generator = torch.Generator().manual_seed(0)

    def vector(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(WIDTH, generator=generator) * scale + shift

    maps = {
        "shift": lambda: SteeringMap(vector()),
        "affine": lambda: SteeringMap(vector(), weight=vector(0.3, 1.0)),
        "affine+support": lambda: SteeringMap(
            vector(), weight=vector(0.3, 1.0), support=(torch.full((WIDTH,), -0.5), torch.full((WIDTH,), 0.7))
        ),
    }
    gates = itertools.product(("sigmoid", "relu", "step"), (0.0, 0.3, 0.5), (1.0, 0.6))
    for (kind, make_map), (activation, floor, scale) in itertools.product(maps.items(), gates):
        gate = LinearGate(vector(), 0.2, activation=activation, floor=floor, scale=scale)
        yield (
            f"{kind}/{activation}/floor={floor}/scale={scale}",
            SteeringLayer(HookPoint("m", layout=layout), make_map(), gate),
        )
