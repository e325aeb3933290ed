"""The steering formula computes t' = t + λ·s(t)·(T(t) − t), as the maps and gates define it,
in the inference form and in the differentiable form that LinEAS trains through."""

import itertools

import pytest
import torch
from toys import WIDTH, layer_kinds

from dsas_diffusion.steering.prepared import PreparedLayer


def definition(layer, x: torch.Tensor, strength: float, gated: bool):
    """``t + λ·s(t)·(T(t) − t)`` in float64, written from the definitions: ``T(t) = w·t + b``
    inside the map's support and ``t`` outside it, ``s`` the gate module (its own forward)."""
    dim = -1 if layer.hook_point.layout == "channels_last" else 1
    shape = [1] * x.ndim
    shape[dim] = layer.width
    t = x.double()
    weight = torch.ones(layer.width) if layer.map.weight is None else layer.map.weight
    mapped = weight.double().view(shape) * t + layer.map.bias.double().view(shape)
    if layer.map.support_lo is not None:
        lo, hi = (bound.double().view(shape) for bound in (layer.map.support_lo, layer.map.support_hi))
        mapped = torch.where((t >= lo) & (t <= hi), mapped, t)
    if not gated:
        return t + strength * (mapped - t), None
    gate = layer.gate(x.float(), dim).double()
    return t + strength * gate * (mapped - t), gate.squeeze(dim)


@pytest.mark.parametrize(
    ("layout", "shape"),
    [("channels_last", (2, 5, WIDTH)), ("channels_last", (7, WIDTH)), ("channels_first", (2, WIDTH, 3, 4))],
)
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_formula_computes_the_definition(layout, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2.0).to(dtype)
    x.view(-1)[3] = float("nan")  # a NaN stays confined to its position
    for case, layer in layer_kinds(layout):
        prepared = PreparedLayer(layer, x.device)
        for strength, gated in itertools.product((0.0, 1.0, -2.5), (True, False)):
            expected, expected_gates = definition(layer, x, strength, gated)
            steered, gates = prepared(x, strength, gated)
            assert steered.dtype == x.dtype and steered.shape == x.shape, case
            tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
            torch.testing.assert_close(
                steered.double(), expected.to(dtype).double(), equal_nan=True, **tolerance, msg=case
            )
            alone, no_gates = prepared(x, strength, gated, return_gates=False)  # the gates made only on request
            assert no_gates is None and torch.equal(alone.nan_to_num(), steered.nan_to_num()), case
            differentiable, _ = layer.steer(x, strength, gated)  # the same formula, without in-place operations
            assert torch.equal(differentiable.nan_to_num(), steered.nan_to_num()), case
            if gated:
                positions = x.shape[:-1] if layout == "channels_last" else x.shape[:1] + x.shape[2:]
                assert gates.shape == positions, case
                torch.testing.assert_close(
                    gates.double(), expected_gates, equal_nan=True, atol=1e-6, rtol=1e-5, msg=case
                )
            else:
                assert gates is None and expected_gates is None


def test_gradients_reach_the_layer_through_the_differentiable_form():
    layer = dict(layer_kinds("channels_last"))["affine+support/sigmoid/floor=0.5/scale=0.6"]
    layer.map.requires_grad_(True)  # as LinEAS trains it
    x = torch.randn(4, 3, WIDTH, generator=torch.Generator().manual_seed(2), requires_grad=True)
    steered, _ = layer.steer(x, 1.5, True)
    steered.sum().backward()
    assert layer.map.bias.grad is not None and layer.map.bias.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_prepared_layer_reads_a_non_contiguous_activation():
    layer = dict(layer_kinds("channels_last"))["affine+support/sigmoid/floor=0.3/scale=0.6"]
    x = torch.randn(5, WIDTH, 4).transpose(1, 2)  # (5, 4, WIDTH), features not contiguous
    torch.testing.assert_close(
        PreparedLayer(layer, x.device)(x, 1.5, True)[0], definition(layer, x, 1.5, True)[0].float()
    )


@pytest.mark.parametrize(
    ("layout", "shape"),
    [("channels_last", (3, 5, WIDTH)), ("channels_last", (3, WIDTH)), ("channels_first", (3, WIDTH, 2, 2))],
)
@pytest.mark.numerics
def test_one_strength_per_sample_steers_each_sample_as_alone_and_leaves_a_zero_one_untouched(layout, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2.0
    strengths = torch.tensor([0.0, 1.5, -2.0])
    for case, layer in layer_kinds(layout):
        prepared = PreparedLayer(layer, x.device)
        for gated in (True, False):
            steered, gates = prepared(x, strengths, gated)
            assert torch.equal(steered[0], x[0]), case  # λ 0: the activation itself, bit for bit
            for i, strength in enumerate(strengths.tolist()):
                alone, alone_gates = prepared(x[i : i + 1], strength, gated)
                torch.testing.assert_close(steered[i : i + 1], alone, atol=1e-6, rtol=1e-6, msg=case)
                if gated:
                    torch.testing.assert_close(gates[i : i + 1], alone_gates, msg=case)
    with pytest.raises(Exception, match="2 strengths for 3 samples"):
        prepared(x, strengths[:2], True)
