"""The inference form of a steering layer computes what the differentiable reference does."""

import itertools

import pytest
import torch
from toys import WIDTH, layer_kinds

from dsas_diffusion.steering.prepared import PreparedLayer


@pytest.mark.parametrize(
    ("layout", "shape"),
    [("channels_last", (2, 5, WIDTH)), ("channels_last", (7, WIDTH)), ("channels_first", (2, WIDTH, 3, 4))],
)
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_layer_equals_the_reference(layout, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2.0).to(dtype)
    x.view(-1)[3] = float("nan")  # a NaN stays confined to its position in both
    for case, layer in layer_kinds(layout):
        prepared = PreparedLayer(layer, x.device)
        for strength, gated in itertools.product((0.0, 1.0, -2.5), (True, False)):
            expected, expected_gates = layer.steer(x, strength, gated)
            steered, gates = prepared(x, strength, gated)
            assert steered.dtype == x.dtype and steered.shape == x.shape, case
            tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
            torch.testing.assert_close(steered, expected, equal_nan=True, **tolerance, msg=case)
            alone, no_gates = prepared(x, strength, gated, return_gates=False)  # the gates made only on request
            assert no_gates is None and torch.equal(alone.nan_to_num(), steered.nan_to_num()), case
            if gated:
                positions = x.shape[:-1] if layout == "channels_last" else x.shape[:1] + x.shape[2:]
                assert gates.shape == positions, case
                torch.testing.assert_close(gates, expected_gates, equal_nan=True, atol=1e-6, rtol=1e-5, msg=case)
            else:
                assert gates is None and expected_gates is None


def test_prepared_layer_reads_a_non_contiguous_activation():
    layer = dict(layer_kinds("channels_last"))["affine+support/sigmoid/floor=0.3/scale=0.6"]
    x = torch.randn(5, WIDTH, 4).transpose(1, 2)  # (5, 4, WIDTH), features not contiguous
    torch.testing.assert_close(PreparedLayer(layer, x.device)(x, 1.5, True)[0], layer.steer(x, 1.5, True)[0])


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
