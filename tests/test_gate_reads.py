"""Gates that read their module's input (``gate_reads="input"``): the gate decides from what
enters the module (a cross-attention's query input: the image being drawn) and scales the
steering of what leaves it, in the reference math, the prepared path, sessions, fitting,
steering files and under torch.compile."""

from __future__ import annotations

import json

import pytest
import torch
from kernels import needs_inductor
from torch import nn
from torch._dynamo.utils import counters

from dsas_diffusion.errors import SteeringFileError
from dsas_diffusion.steering import (
    ActivationError,
    HookPoint,
    IncompatibleSteeringError,
    LinearGate,
    Steerer,
    SteeringError,
    SteeringLayer,
    SteeringMap,
    fit_steerer,
)
from dsas_diffusion.steering.prepared import PreparedLayer

IN, OUT = 8, 12


class Widen(nn.Module):
    """A module whose output has other features than its input at the same positions (called
    positionally here, as UNets call their cross-attention; the pipeline tests cover the
    ``hidden_states=`` keyword of joint attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(IN, IN)
        with torch.no_grad():
            self.inner.weight.copy_(torch.eye(IN) + 0.1 * torch.randn(IN, IN))
        self.widen = Widen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.widen(self.inner(x))


def _input_gated_layer() -> SteeringLayer:
    """Steers ``widen`` by +1 on every output feature where input feature 0 is large."""
    weight = torch.zeros(IN)
    weight[0] = 20.0
    gate = LinearGate(weight, -10.0, floor=0.5, reads="input")
    return SteeringLayer(HookPoint("widen", layout="channels_last"), SteeringMap(torch.ones(OUT)), gate)


def test_the_gate_reads_the_input_and_scales_the_output_position_by_position():
    layer = _input_gated_layer()
    u = torch.zeros(1, 3, IN)
    u[0, 1, 0] = 1.0  # only position 1 shows the "concept" in the input
    x = torch.randn(1, 3, OUT)
    steered, gates = layer.steer(x, 2.0, True, gate_input=u)
    assert gates[0, 0] == 0 and gates[0, 2] == 0 and gates[0, 1] > 0.99
    assert torch.equal(steered[0, [0, 2]], x[0, [0, 2]])  # a shut gate leaves the output exactly
    torch.testing.assert_close(steered[0, 1], x[0, 1] + 2.0 * gates[0, 1])
    prepared = PreparedLayer(layer, torch.device("cpu"))
    prepared_steered, prepared_gates = prepared(x, 2.0, True, u)
    torch.testing.assert_close(prepared_steered, steered)
    torch.testing.assert_close(prepared_gates, gates)
    assert torch.equal(layer.steer(x, 2.0, False)[0], x + 2.0)  # uniform steering needs no input


def test_a_gate_reading_the_input_refuses_a_missing_or_mismatched_input():
    layer = _input_gated_layer()
    x = torch.randn(1, 3, OUT)
    prepared = PreparedLayer(layer, torch.device("cpu"))
    with pytest.raises(ActivationError, match="reads the module's input"):
        prepared(x, 1.0, True)
    for wrong in (torch.randn(1, 4, IN), torch.randn(1, 3, IN + 1)):
        with pytest.raises(IncompatibleSteeringError, match="gate reads the input"):
            prepared(x, 1.0, True, wrong)
        with pytest.raises(IncompatibleSteeringError):
            layer.steer(x, 1.0, True, gate_input=wrong)
    with pytest.raises(ValueError, match="reads one of"):
        LinearGate(torch.ones(IN), 0.0, reads="query")


@torch.no_grad()
def test_a_session_passes_the_module_input_to_the_gate_and_steers_only_the_rows_asked():
    model = Model().eval()
    steerer = Steerer([_input_gated_layer()])
    x = torch.randn(2, 5, IN)
    inner = model.inner(x)
    expected, _ = _input_gated_layer().steer(model.widen(hidden_states=inner), 1.5, True, gate_input=inner)
    with steerer.apply(model, strength=1.5, record_gates=True) as session:
        torch.testing.assert_close(model(x), expected)
        assert session.gate_maps["widen"][0].shape == (2, 5)
        session.batch_rows = slice(1, 2)
        steered = model(x)
    unsteered = model(x)
    assert torch.equal(steered[0], unsteered[0])
    torch.testing.assert_close(steered[1], expected[1])


def _sets(seed: int = 0):
    """Source batches whose *inputs* show the concept (a shift of input feature 0) at a few
    positions, target batches without it, control batches without it."""
    generator = torch.Generator().manual_seed(seed)

    def batch(concept: bool) -> torch.Tensor:
        x = torch.randn(4, 6, IN, generator=generator)
        if concept:
            x[:, :3, 0] += 6.0
        return x

    return [[batch(kind == "source") for _ in range(8)] for kind in ("source", "target", "control")]


@torch.no_grad()
def test_fitting_with_gate_reads_input_fits_the_gate_on_the_input_and_saves_it(tmp_path):
    torch.manual_seed(0)
    model = Model().eval()
    steerer = fit_steerer(
        model, ["widen"], *_sets(), map="caa", gate_reads="input",
        gate_calibration="control-positions", gate_floor=0.5, progress=False,
    )  # fmt: skip
    layer = steerer.layer("widen")
    assert layer.gate.reads == "input" and layer.gate.width == IN and layer.width == OUT
    assert layer.gate_point == HookPoint("widen", None, "channels_last", reads="input")
    assert steerer.config["fit_config"]["gate_reads"] == "input"
    source, _, control = _sets(seed=1)
    with steerer.apply(model, strength=1.0, record_gates=True) as session:
        model(source[0])
        model(control[0])
        concept_gates, control_gates = session.gate_maps["widen"]
    assert concept_gates[:, :3].float().mean() > 0.5  # open where the input shows the concept
    assert control_gates.float().mean() < 0.05
    steerer.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "steering_config.json").read_text())["layers"][0]
    assert entry["gate"]["reads"] == "input" and entry["gate"]["width"] == IN
    loaded = Steerer.from_pretrained(tmp_path)
    x = source[0]
    with steerer.apply(model, strength=2.0):
        expected = model(x)
    with loaded.apply(model, strength=2.0):
        torch.testing.assert_close(model(x), expected)
    entry["gate"]["reads"] = "query"
    config = json.loads((tmp_path / "steering_config.json").read_text())
    config["layers"][0] = entry
    (tmp_path / "steering_config.json").write_text(json.dumps(config))
    with pytest.raises(SteeringFileError, match=r"gate\.reads"):
        Steerer.from_pretrained(tmp_path)


def test_gate_reads_input_is_refused_where_it_cannot_be_fitted():
    with pytest.raises(SteeringError, match="gate_reads='input' is fitted with gate='dsas'"):
        fit_steerer(Model(), ["widen"], *_sets(), map="lineas", gate="e2e", gate_reads="input", progress=False)


@needs_inductor
@torch.no_grad()
def test_a_gate_reading_the_input_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    model = Model().eval()
    steerer = Steerer([_input_gated_layer()])
    x = torch.randn(3, 5, IN)
    x[0, :2, 0] = 5.0
    torch._dynamo.reset()
    counters.clear()
    with steerer.apply(model, strength=1.0) as session:
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(model)
        compiled(x)
        before = counters["stats"]["unique_graphs"]
        for strength in (2.0, 0.5):
            session.strength = strength
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == before
