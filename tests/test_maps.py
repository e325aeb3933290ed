"""Properties of the steering maps' math."""

import pytest
import torch

from dsas_diffusion.steering import fit_caa, fit_iti, fit_linear_act, sliced_w2
from dsas_diffusion.steering.linear import sorted_quantiles


def test_linear_act_sends_sorted_source_onto_sorted_target_when_they_are_affine():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(64, 5, generator=generator) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    scale = torch.tensor([0.5, -0.0 + 2.0, 1.5, 0.2, 1.0])
    offset = torch.tensor([1.0, -3.0, 0.0, 2.0, -1.0])
    # target: an increasing affine image of source, shuffled (order must not matter)
    target = (source * scale + offset)[torch.randperm(64, generator=generator)]
    steering_map = fit_linear_act(source, target, support_quantiles=None)
    torch.testing.assert_close(steering_map.weight, scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steering_map.bias, offset, atol=1e-5, rtol=1e-5)
    moved = source + steering_map.delta(source, (5,))
    torch.testing.assert_close(moved.sort(0).values, target.sort(0).values, atol=1e-5, rtol=1e-5)


def test_linear_act_is_least_squares_between_sorted_gaussian_samples():
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(40, 3, generator=generator) * 2.0 + 1.0
    target = torch.randn(40, 3, generator=generator) * 0.5 - 1.0
    steering_map = fit_linear_act(source, target, support_quantiles=None)
    xs, yt = source.double().sort(0).values, target.double().sort(0).values
    for unit in range(3):
        design = torch.stack([xs[:, unit], torch.ones(40, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, yt[:, unit : unit + 1]).solution.flatten()
        assert abs(float(steering_map.weight[unit]) - float(solution[0])) < 1e-5
        assert abs(float(steering_map.bias[unit]) - float(solution[1])) < 1e-5


@pytest.mark.numerics
def test_linear_act_support_leaves_values_outside_the_source_range_alone():
    source = torch.linspace(0.0, 1.0, 11).unsqueeze(1)
    target = source * 2.0 + 5.0
    steering_map = fit_linear_act(source, target)  # support = [min, max] of the source, widened a little
    values = torch.tensor([[-0.5], [0.0], [0.5], [1.0], [1.5]])
    delta = steering_map.delta(values, (1,))
    assert torch.equal(delta[[0, 4]], torch.zeros(2, 1))
    torch.testing.assert_close(values[1:4] + delta[1:4], values[1:4] * 2.0 + 5.0)
    rounded = torch.tensor([[-1e-7], [1.0 + 1e-7]])  # the extreme source samples, rounded otherwise: still inside
    torch.testing.assert_close(rounded + steering_map.delta(rounded, (1,)), rounded * 2.0 + 5.0)
    nan = steering_map.delta(torch.tensor([[float("nan")]]), (1,))
    assert torch.equal(nan, torch.zeros(1, 1))  # NaN is outside every support


def test_affine_delta_follows_weight_changes_in_place_and_across_devices():
    steering_map = fit_linear_act(torch.randn(16, 3), torch.randn(16, 3), support_quantiles=None)
    values = torch.randn(4, 3)
    expected = (steering_map.weight - 1.0) * values + steering_map.bias
    torch.testing.assert_close(steering_map.delta(values, (3,)), expected)
    steering_map.weight.data.mul_(3.0)  # an in-place edit must not reuse the slope of the old weight
    expected = (steering_map.weight - 1.0) * values + steering_map.bias
    torch.testing.assert_close(steering_map.delta(values, (3,)), expected)
    steering_map.load_state_dict({"bias": steering_map.bias, "weight": torch.ones(3)})
    torch.testing.assert_close(steering_map.delta(values, (3,)), steering_map.bias.expand(4, 3))


def test_linear_act_with_unequal_counts_matches_quantiles():
    # exact normal quantiles: 100 source levels, 60 target levels of 3 * N(0, 1) + 1
    source = torch.special.ndtri((torch.arange(100) + 0.5) / 100).unsqueeze(1)
    target = 3.0 * torch.special.ndtri((torch.arange(60) + 0.5) / 60).unsqueeze(1) + 1.0
    steering_map = fit_linear_act(source, target, support_quantiles=None)
    assert abs(float(steering_map.weight) - 3.0) < 0.05
    assert abs(float(steering_map.bias) - 1.0) < 1e-4


def test_caa_moves_the_source_mean_onto_the_target_mean():
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(32, 7, generator=generator) + 3.0
    target = torch.randn(20, 7, generator=generator) - 1.0
    steering_map = fit_caa(source, target)
    moved = source + steering_map.delta(source, (7,))
    torch.testing.assert_close(moved.mean(0), target.mean(0), atol=1e-5, rtol=0)


def test_iti_auto_alpha_moves_the_projected_source_mean_onto_the_target_along_the_probe():
    generator = torch.Generator().manual_seed(4)
    source = torch.randn(32, 6, generator=generator)
    source[:, 2] += 4.0
    target = torch.randn(32, 6, generator=generator)
    steering_map = fit_iti(source, target)
    direction = steering_map.bias / steering_map.bias.norm()
    # the probe finds the separating unit
    assert int(direction.abs().argmax()) == 2
    moved = source + steering_map.bias
    assert abs(float((moved.mean(0) - target.mean(0)) @ direction)) < 1e-4
    # only the probe direction moves: orthogonal components of the source mean unchanged
    assert torch.allclose(steering_map.bias, (steering_map.bias @ direction) * direction)


def test_iti_with_mean_difference_probe_equals_caa():
    generator = torch.Generator().manual_seed(5)
    source, target = torch.randn(16, 4, generator=generator) + 1.0, torch.randn(16, 4, generator=generator)
    torch.testing.assert_close(fit_iti(source, target, probe="mean_diff").bias, fit_caa(source, target).bias)


def test_sliced_w2_is_zero_for_a_permutation_and_positive_otherwise():
    generator = torch.Generator().manual_seed(6)
    rows = torch.randn(8, 3, generator=generator)
    assert float(sliced_w2(rows[torch.randperm(8, generator=generator)], rows.sort(0).values)) == 0.0
    assert float(sliced_w2(rows + 1.0, sorted_quantiles(rows, 8))) > 0.9
