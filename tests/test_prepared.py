"""The inference form of a steering layer computes what the differentiable reference does."""

import itertools

import pytest
import torch

from dsas_diffusion.steering import HookPoint, LinearGate, SteeringLayer, SteeringMap
from dsas_diffusion.steering.prepared import PreparedLayer

WIDTH = 6


def _layers(layout: str):
    """Every kind of layer: shift or affine map (with and without a support), sigmoid or ReLU
    gate, with a floor and an accuracy scale or without."""
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
    gates = itertools.product(("sigmoid", "relu"), (0.0, 0.3), (1.0, 0.6))
    for (kind, make_map), (activation, floor, scale) in itertools.product(maps.items(), gates):
        gate = LinearGate(vector(), 0.2, activation=activation, floor=floor, scale=scale)
        yield (
            f"{kind}/{activation}/floor={floor}/scale={scale}",
            SteeringLayer(HookPoint("m", layout=layout), make_map(), gate),
        )


@pytest.mark.parametrize(
    ("layout", "shape"),
    [("channels_last", (2, 5, WIDTH)), ("channels_last", (7, WIDTH)), ("channels_first", (2, WIDTH, 3, 4))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_layer_equals_the_reference(layout, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2.0).to(dtype)
    x.view(-1)[3] = float("nan")  # a NaN stays confined to its position in both
    for case, layer in _layers(layout):
        prepared = PreparedLayer(layer, x.device)
        for strength, gated in itertools.product((0.0, 1.0, -2.5), (True, False)):
            expected, expected_gates = layer.steer(x, strength, gated)
            steered, gates = prepared(x, strength, gated)
            assert steered.dtype == x.dtype and steered.shape == x.shape, case
            tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
            torch.testing.assert_close(steered, expected, equal_nan=True, **tolerance, msg=case)
            if gated:
                positions = x.shape[:-1] if layout == "channels_last" else x.shape[:1] + x.shape[2:]
                assert gates.shape == positions, case
                torch.testing.assert_close(gates, expected_gates, equal_nan=True, atol=1e-6, rtol=1e-5, msg=case)
            else:
                assert gates is None and expected_gates is None


def test_prepared_layer_reads_a_non_contiguous_activation():
    layer = dict(_layers("channels_last"))["affine+support/sigmoid/floor=0.3/scale=0.6"]
    x = torch.randn(5, WIDTH, 4).transpose(1, 2)  # (5, 4, WIDTH), features not contiguous
    torch.testing.assert_close(PreparedLayer(layer, x.device)(x, 1.5, True)[0], layer.steer(x, 1.5, True)[0])
