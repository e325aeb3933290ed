"""The DSAS gate: PCA + logistic regression folded into one affine score."""

import math

import pytest
import torch

from dsas_diffusion.steering import InputSetError, LinearGate, fit_gate, gate_accuracy_scale
from dsas_diffusion.steering.linear import fit_logistic, fit_pca


def _two_classes(seed: int = 0, width: int = 12, shift: float = 1.5):
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(width, generator=generator)
    direction /= direction.norm()
    source = torch.randn(32, width, generator=generator) + shift * direction
    control = torch.randn(32, width, generator=generator) - shift * direction
    return source, control


def test_folded_gate_equals_pca_then_logistic_on_the_same_inputs():
    source, control = _two_classes()
    gate = fit_gate(source, control, n_components=5)
    features = torch.cat([source, control]).double()
    labels = torch.cat([torch.ones(32), torch.zeros(32)])
    mean, components = fit_pca(features, 5)
    projected = (features - mean) @ components
    beta, beta0 = fit_logistic(projected, labels)
    two_step = torch.sigmoid(projected @ beta + beta0)
    folded = gate(features.float(), -1).squeeze(-1).double()
    torch.testing.assert_close(folded, two_step, atol=1e-5, rtol=1e-5)


def test_logistic_solution_is_the_regularised_optimum():
    source, control = _two_classes(1)
    features = torch.cat([source, control]).double()
    labels = torch.cat([torch.ones(32), torch.zeros(32)]).double()
    weight, bias = fit_logistic(features, labels, l2=1.0)
    # gradient of the objective in standardised coordinates is zero at the solution
    std = features.std(0, unbiased=False)
    z = (features - features.mean(0)) / std
    w_std = (weight * std).requires_grad_(True)
    b_std = (bias + (features.mean(0) * weight).sum()).requires_grad_(True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w_std + b_std, labels, reduction="sum")
    loss = loss + 0.5 * w_std.pow(2).sum()
    loss.backward()
    assert float(w_std.grad.abs().max()) < 1e-4 and abs(float(b_std.grad)) < 1e-4


def test_gate_accuracy_is_high_when_separable_and_near_chance_when_not():
    source, control = _two_classes(2, shift=2.0)
    assert fit_gate(source, control).accuracy >= 0.95
    generator = torch.Generator().manual_seed(3)
    same = fit_gate(torch.randn(32, 12, generator=generator), torch.randn(32, 12, generator=generator))
    assert same.accuracy < 0.75


def test_gate_applies_per_position_on_channels_first_maps():
    gate = LinearGate(torch.tensor([1.0, 0.0, 0.0]), -0.5)
    x = torch.zeros(2, 3, 4, 5)
    x[1, 0, 2, 3] = 10.0
    values = gate(x, 1)
    assert values.shape == (2, 1, 4, 5)
    assert float(values[1, 0, 2, 3]) > 0.99
    assert float(values[0].max()) < 0.5


def test_relu_gate_is_clipped_to_unit_interval():
    gate = LinearGate(torch.tensor([1.0]), 0.0, activation="relu")
    values = gate(torch.tensor([[-2.0], [0.25], [3.0]]), -1).flatten()
    assert values.tolist() == [0.0, 0.25, 1.0]


def test_accuracy_scaling_goes_to_zero_at_chance():
    assert gate_accuracy_scale(0.5) == 0.0
    assert gate_accuracy_scale(0.4) == 0.0
    assert gate_accuracy_scale(1.0) == 1.0
    assert math.isclose(gate_accuracy_scale(0.75), 0.5)


def test_fewer_samples_than_components_is_a_clear_error():
    with pytest.raises(InputSetError, match="PCA components"):
        fit_gate(torch.randn(2, 8), torch.randn(2, 8), n_components=5)


def test_empty_control_is_a_clear_error():
    with pytest.raises(InputSetError, match="control set is empty"):
        fit_gate(torch.randn(8, 4), torch.zeros(0, 4))


def test_two_sided_calibration_puts_both_quantiles_at_their_levels():
    from dsas_diffusion.steering import calibrate_gate_two_sided

    generator = torch.Generator().manual_seed(3)
    control = torch.randn(400, 6, generator=generator)
    concept = torch.randn(400, 6, generator=generator) + torch.tensor([3.0, 0, 0, 0, 0, 0])
    gate = LinearGate(torch.tensor([0.2, 0.01, 0, 0, 0, 0]), 0.0)
    direction = gate.weight.clone()
    assert calibrate_gate_two_sided(gate, control, concept, control_level=0.05, concept_level=0.9)
    opening = {name: gate(rows, -1).squeeze(-1).double() for name, rows in (("control", control), ("concept", concept))}
    assert float(torch.quantile(opening["control"], 0.99)) == pytest.approx(0.05, abs=1e-3)
    assert float(torch.quantile(opening["concept"], 0.5)) == pytest.approx(0.9, abs=1e-3)
    torch.testing.assert_close(gate.weight / gate.weight.norm(), direction / direction.norm())  # same direction
    # a direction that ranks the concept below control cannot meet both ends: control stays shut
    backwards = LinearGate(-direction, 0.0)
    assert not calibrate_gate_two_sided(backwards, control, concept)
    assert float(torch.quantile(backwards(control, -1).squeeze(-1).double(), 0.99)) <= 0.05 + 1e-4


@pytest.mark.numerics
@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("count", [11, 32, 401])
def test_a_calibrated_threshold_splits_the_values_as_their_quantile_does_and_lies_on_none(count, quantile):
    from dsas_diffusion.steering.linear import separating_threshold

    values = torch.randn(count, generator=torch.Generator().manual_seed(count)).double()
    threshold = separating_threshold(values, quantile, margin=0.05)
    level = float(torch.quantile(values, quantile))  # with 11 values the median is one of them
    assert int((values > threshold).sum()) == int((values > level).sum())
    ordered = values.sort().values
    gaps = ordered.diff()
    nearest = float((values - threshold).abs().min())
    if quantile == 1.0:  # above the highest by the margin
        assert nearest == pytest.approx(0.05 * float(values.std()))
    else:  # midway between its two neighbours
        assert nearest == pytest.approx(float(gaps[int((values <= threshold).sum()) - 1]) / 2)
    for scale in (1 - 1e-6, 1 + 1e-6):  # another rounding of every value keeps each on its side
        rounded = values * scale + 1e-7
        assert torch.equal(rounded > threshold, values > threshold)
    with pytest.raises(ValueError, match="margin must be positive"):
        separating_threshold(values, quantile, margin=0.0)
