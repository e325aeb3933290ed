"""Sample gates (``sample_gate=True``): a second gate per layer reads the mean over a sample's
positions and multiplies the positional gate, so that a sample that does not show the concept
as a whole is not steered where single positions resemble it; in the reference math, the
prepared path, fitting, steering files and under torch.compile."""

from __future__ import annotations

import json

import pytest
import torch
from kernels import needs_inductor
from torch import nn

from dsas_diffusion.errors import SteeringFileError
from dsas_diffusion.steering import HookPoint, LinearGate, Steerer, SteeringLayer, SteeringMap, fit_steerer
from dsas_diffusion.steering.gate import calibrate_gate_two_sided
from dsas_diffusion.steering.prepared import PreparedLayer

WIDTH = 6


def _layer(layout: str = "channels_last") -> SteeringLayer:
    """Steers +1 where feature 0 is large, in samples whose mean of feature 1 is large."""
    positional, sample = torch.zeros(WIDTH), torch.zeros(WIDTH)
    positional[0], sample[1] = 20.0, 20.0
    return SteeringLayer(
        HookPoint("0", layout=layout),
        SteeringMap(torch.ones(WIDTH)),
        LinearGate(positional, -10.0, floor=0.5),
        sample_gate=LinearGate(sample, -10.0, floor=0.5),
    )


def _batch() -> torch.Tensor:
    """Two samples of four positions; both show feature 0 at position 1, only the first shows
    feature 1 on average."""
    x = torch.zeros(2, 4, WIDTH)
    x[:, 1, 0] = 1.0
    x[0, :, 1] = 1.0
    x[1, 2, 1] = 1.0  # one position of the second sample: a mean of 0.25
    return x


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_the_sample_gate_multiplies_the_positional_gate_per_sample(layout):
    layer = _layer(layout)
    x = _batch()
    if layout == "channels_first":
        x = x.transpose(1, 2).reshape(2, WIDTH, 2, 2).contiguous()
    steered, gates = layer.steer(x, 2.0, True)
    flat = gates.reshape(2, 4)
    assert flat[0, 1] > 0.99 and flat[0, [0, 2, 3]].eq(0).all()  # the sample shows it: steered where it is
    assert flat[1].eq(0).all()  # the sample does not: shut although position 1 looks the same
    assert torch.equal(steered[1], x[1])
    prepared_steered, prepared_gates = PreparedLayer(layer, torch.device("cpu"))(x, 2.0, True)
    torch.testing.assert_close(prepared_steered, steered)
    torch.testing.assert_close(prepared_gates, gates)
    torch.testing.assert_close(layer.gate_values(x), gates)
    layer.sample_gate = None
    assert layer.steer(x, 2.0, True)[1].reshape(2, 4)[1, 1] > 0.99  # without it the second sample opens


def test_a_sample_gate_must_read_what_its_gate_reads():
    layer = _layer()
    with pytest.raises(ValueError, match="multiplies a gate"):
        SteeringLayer(layer.hook_point, layer.map, None, sample_gate=layer.sample_gate)
    with pytest.raises(ValueError, match="must read the same"):
        SteeringLayer(layer.hook_point, layer.map, layer.gate, sample_gate=LinearGate(torch.ones(3), 0.0))


def _sets(seed: int = 0):
    """Source samples that show the concept (feature 0 shifted at half their positions),
    targets and controls without it; controls sometimes show one concept-like position."""
    generator = torch.Generator().manual_seed(seed)

    def batch(kind: str) -> torch.Tensor:
        x = torch.randn(4, 8, WIDTH, generator=generator)
        if kind == "source":
            x[:, :4, 0] += 4.0
        elif kind == "control":
            x[:, 0, 0] += 4.0
        return x

    return [[batch(kind) for _ in range(8)] for kind in ("source", "target", "control")]


@torch.no_grad()
def test_fitting_a_sample_gate_shuts_control_samples_and_round_trips_through_the_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(WIDTH))
        model[0].bias.zero_()
    steerer = fit_steerer(
        model, ["0"], *_sets(), map="caa", sample_gate=True, gate_fit_on="contrast", gate_calibration="two-sided",
        calibration_quantile=0.5, gate_floor=0.5, gate_threshold=None, progress=False,
    )  # fmt: skip
    layer = steerer.layer("0")
    assert layer.sample_gate is not None and layer.sample_gate.width == WIDTH
    assert steerer.config["sample_calibration_outcome"] == {"0": "two-sided"}
    source, _, control = _sets(seed=1)
    with steerer.apply(model, strength=1.0, record_gates=True) as session:
        model(source[0])
        model(control[0])
        source_gates, control_gates = session.gate_maps["0"]
    assert source_gates[:, :4].float().mean() > 0.5
    assert control_gates.float().max() == 0  # the concept-like first position of a control sample stays shut
    steerer.save_pretrained(tmp_path)
    path = tmp_path / "steering_config.json"
    config = json.loads(path.read_text())
    assert config["layers"][0]["sample_gate"]["floor"] == 0.5
    loaded = Steerer.from_pretrained(tmp_path)
    with steerer.apply(model, strength=2.0):
        expected = model(source[0])
    with loaded.apply(model, strength=2.0):
        torch.testing.assert_close(model(source[0]), expected)
    config["layers"][0]["sample_gate"]["reads"] = "input"
    path.write_text(json.dumps(config))
    with pytest.raises(SteeringFileError, match=r"sample_gate\.reads"):
        Steerer.from_pretrained(tmp_path)
    config["layers"][0]["gate"] = None
    path.write_text(json.dumps(config))
    with pytest.raises(SteeringFileError, match="sample_gate multiplies the layer's gate"):
        Steerer.from_pretrained(tmp_path)


@needs_inductor
@torch.no_grad()
def test_a_sample_gate_compiles_without_graph_breaks_and_matches_eager():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH)).eval()
    x = _batch()
    with Steerer([_layer()]).apply(model, strength=1.5):
        expected = model(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch.testing.assert_close(torch.compile(model)(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.numerics
def test_a_step_gate_opens_fully_exactly_above_the_calibrated_control_quantile():
    control, concept = torch.randn(1000, WIDTH), torch.randn(200, WIDTH) + torch.tensor([3.0] + [0.0] * (WIDTH - 1))
    gate = LinearGate(torch.tensor([2.0] + [0.0] * (WIDTH - 1)), 0.0, activation="step", floor=0.5)
    assert calibrate_gate_two_sided(gate, control, concept, control_quantile=0.9)
    opened = gate(control).squeeze(-1)
    assert set(opened.unique().tolist()) <= {0.0, 1.0}  # shut or fully open, whatever the floor
    assert abs(float(opened.mean()) - 0.1) < 0.01  # the control positions above their 90% quantile
    assert torch.equal(gate(control * (1 + 1e-6)).squeeze(-1), opened)  # no control position on the edge
    assert float(gate(concept).mean()) > 0.9
    assert float(gate.weight[0]) == 2.0  # the direction is kept, not rescaled to nothing
