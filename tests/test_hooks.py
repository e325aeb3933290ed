"""Applying steering through hooks: identity cases, gating per position, removal, scoping."""

import threading

import pytest
import torch
from torch import nn

from dsas_diffusion.steering import (
    HookPoint,
    LinearGate,
    Steerer,
    SteeringError,
    SteeringLayer,
    SteeringMap,
    active_hook_names,
)


def _layer(module: str, width: int, layout: str = "channels_last", gate: LinearGate | None = None, affine=False):
    generator = torch.Generator().manual_seed(width)
    bias = torch.randn(width, generator=generator)
    weight = torch.rand(width, generator=generator) + 0.5 if affine else None
    return SteeringLayer(HookPoint(module, layout=layout), SteeringMap(bias, weight=weight), gate)


def _gate(width: int, bias: float = 0.0) -> LinearGate:
    generator = torch.Generator().manual_seed(100 + width)
    return LinearGate(torch.randn(width, generator=generator), bias)


def test_strength_zero_is_the_identity_bit_for_bit(token_net):
    x = torch.randn(3, 5, 16)
    reference = token_net(x)
    steerer = Steerer([_layer("blocks.0", 16, gate=_gate(16)), _layer("blocks.2", 16, gate=_gate(16), affine=True)])
    for gate in ("dsas", "none"):
        with steerer.apply(token_net, strength=0.0, gate=gate):
            assert torch.equal(token_net(x), reference)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_zero_gate_is_the_identity_bit_for_bit(token_net, activation):
    x = torch.randn(3, 5, 16)
    reference = token_net(x)
    closed = LinearGate(torch.zeros(16), float("-inf") if activation == "sigmoid" else -5.0, activation=activation)
    steerer = Steerer([_layer("blocks.1", 16, gate=closed, affine=True)])
    with steerer.apply(token_net, strength=3.0, gate="dsas"):
        assert torch.equal(token_net(x), reference)
    with steerer.apply(token_net, strength=3.0, gate="none"):
        assert not torch.equal(token_net(x), reference)


def test_uniform_steering_adds_strength_times_delta():
    model = nn.Identity()
    steerer = Steerer([_layer("", 4)])
    x = torch.randn(2, 3, 4)
    with steerer.apply(model, strength=0.5, gate="none"):
        torch.testing.assert_close(model(x), x + 0.5 * steerer.layers[0].map.bias)


def test_per_position_gating_on_4d_maps_steers_only_source_like_positions():
    """Feature maps whose positions carry the concept on channel 0 get steered there only."""
    width = 6
    concept = torch.zeros(width)
    concept[0] = 4.0
    gate = LinearGate(concept / 4.0 * 5.0, -10.0)  # logit = 5 * x0 - 10: on for x0 near 4, off near 0
    steering_map = SteeringMap(-concept)  # remove the concept
    steerer = Steerer([SteeringLayer(HookPoint("", layout="channels_first"), steering_map, gate)])
    x = torch.randn(2, width, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    concept_positions = torch.zeros(2, 8, 8, dtype=torch.bool)
    concept_positions[0, 2:5, 3:6] = True
    concept_positions[1, 6:, :2] = True
    x = x + concept.view(1, width, 1, 1) * concept_positions.unsqueeze(1)
    model = nn.Identity()
    with steerer.apply(model, strength=1.0, gate="dsas", record_gates=True) as session:
        y = model(x)
    change = (y - x).abs().sum(1)
    assert float(change[concept_positions].min()) > 3.9  # concept removed almost fully
    assert float(change[~concept_positions].max()) < 0.005  # the rest barely touched
    gates = session.gate_maps[""][0]
    assert gates.shape == (2, 8, 8)
    assert bool((gates[concept_positions] > 0.99).all()) and bool((gates[~concept_positions] < 0.001).all())


def test_hooks_are_removed_when_the_block_exits_by_exception(token_net):
    steerer = Steerer([_layer("blocks.0", 16), _layer("blocks.1", 16)])
    hooks_before = sum(len(m._forward_hooks) for m in token_net.modules())
    with pytest.raises(RuntimeError, match="boom"), steerer.apply(token_net, gate="none"):
        assert len(active_hook_names(token_net)) == 2
        raise RuntimeError("boom")
    assert active_hook_names(token_net) == []
    assert sum(len(m._forward_hooks) for m in token_net.modules()) == hooks_before


def test_hooks_are_removed_when_the_forward_pass_raises(token_net):
    steerer = Steerer([_layer("blocks.0", 8)])  # wrong width: raises inside forward
    with pytest.raises(SteeringError, match="expects 8 features"), steerer.apply(token_net, gate="none"):
        token_net(torch.randn(1, 2, 16))
    assert active_hook_names(token_net) == []
    assert all(not m._forward_hooks for m in token_net.modules())


def test_attach_and_detach(token_net):
    x = torch.randn(2, 3, 16)
    reference = token_net(x)
    session = Steerer([_layer("blocks.0", 16)]).attach(token_net, gate="none")
    assert not torch.equal(token_net(x), reference)
    session.detach()
    session.detach()  # idempotent
    assert torch.equal(token_net(x), reference)


def test_batch_rows_steer_only_the_chosen_rows():
    model = nn.Identity()
    steerer = Steerer([_layer("", 4)])
    x = torch.randn(4, 3, 4)
    with steerer.apply(model, gate="none") as session:
        session.batch_rows = slice(2, None)
        y = model(x)
    assert torch.equal(y[:2], x[:2])
    torch.testing.assert_close(y[2:], x[2:] + steerer.layers[0].map.bias)


def test_two_steerers_compose_in_attach_order():
    model = nn.Identity()
    first, second = Steerer([_layer("", 4)]), Steerer([_layer("", 4, affine=True)])
    x = torch.randn(2, 4)
    with first.apply(model, gate="none"), second.apply(model, gate="none"):
        y = model(x)
    after_first = x + first.layers[0].map.bias
    expected = after_first + second.layers[0].map.delta(after_first, (4,))
    torch.testing.assert_close(y, expected)


def test_scoped_sessions_do_not_leak_across_threads(token_net):
    """Each thread steers with its own strength on one shared model; results match solo runs."""
    steerer = Steerer([_layer("blocks.0", 16, gate=_gate(16)), _layer("blocks.2", 16, gate=_gate(16))])
    x = torch.randn(2, 4, 16)
    strengths = [0.0, 0.5, 1.0, 2.0, 3.0, 0.25]
    solo = {}
    for strength in strengths:
        with steerer.apply(token_net, strength=strength):
            solo[strength] = token_net(x)
    results, barrier = {}, threading.Barrier(len(strengths))

    def worker(strength: float) -> None:
        with steerer.apply(token_net, strength=strength):
            barrier.wait()  # all sessions attached at once
            outputs = [token_net(x) for _ in range(5)]
            barrier.wait()
        results[strength] = outputs

    threads = [threading.Thread(target=worker, args=(s,)) for s in strengths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for strength in strengths:
        for output in results[strength]:
            assert torch.equal(output, solo[strength])
    assert active_hook_names(token_net) == []


def test_reduced_precision_activations_are_steered_in_float32_and_cast_back():
    model = nn.Identity()
    layer = _layer("", 8, gate=_gate(8), affine=True)
    x = torch.randn(2, 5, 8)
    with Steerer([layer]).apply(model, strength=0.7):
        for dtype in (torch.float16, torch.bfloat16):
            y = model(x.to(dtype))
            assert y.dtype == dtype
            # the same arithmetic as on the float32 copy of the rounded input, then rounded
            assert torch.equal(y, model(x.to(dtype).float()).to(dtype))


def test_non_finite_strength_is_refused(token_net):
    steerer = Steerer([_layer("blocks.0", 16)])
    for value in (float("nan"), float("inf")):
        with pytest.raises(SteeringError, match="finite"):
            steerer.apply(token_net, strength=value)
    assert active_hook_names(token_net) == []


def test_recorded_gates_have_one_entry_per_call_and_the_activation_shape(token_net):
    steerer = Steerer([_layer("blocks.1", 16, gate=_gate(16))])
    with steerer.apply(token_net, record_gates=True) as session:
        token_net(torch.randn(3, 7, 16))
        token_net(torch.randn(2, 4, 16))
    shapes = [tuple(g.shape) for g in session.gate_maps["blocks.1"]]
    assert shapes == [(3, 7), (2, 4)]
    assert all(g.dtype == torch.float16 for g in session.gate_maps["blocks.1"])


def test_scoped_sessions_can_be_detached_in_any_order():
    model = nn.Identity()
    first, second = Steerer([_layer("", 4)]), Steerer([_layer("", 4, affine=True)])
    x = torch.randn(2, 4)
    session_a = first.apply(model, gate="none")
    session_b = second.apply(model, gate="none")
    session_a.detach()  # not the last one attached
    expected = x + second.layers[0].map.delta(x, (4,))
    torch.testing.assert_close(model(x), expected)
    session_b.detach()
    assert torch.equal(model(x), x)


def test_gates_are_recorded_at_strength_zero_without_changing_the_output(token_net):
    steerer = Steerer([_layer("blocks.0", 16, gate=_gate(16)), _layer("blocks.2", 16, gate=_gate(16))])
    x = torch.randn(2, 5, 16)
    reference = token_net(x)
    with steerer.apply(token_net, strength=0.0, record_gates=True) as idle:
        assert torch.equal(token_net(x), reference)
    with steerer.apply(token_net, strength=1.0, record_gates=True) as active:
        token_net(x)
    # the first steered module sees the same input either way, so its gates agree
    assert torch.equal(idle.gate_maps["blocks.0"][0], active.gate_maps["blocks.0"][0])
    assert idle.gate_maps["blocks.2"][0].shape == (2, 5)


def test_a_gate_below_its_floor_leaves_positions_untouched_at_any_strength():
    """The floor makes a closed gate exactly 0: no leak however large the strength."""
    model = nn.Identity()
    gate = LinearGate(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.0, floor=0.5)
    steerer = Steerer([_layer("", 4, gate=gate)])
    x = torch.zeros(1, 3, 4)
    x[0, 0, 0], x[0, 1, 0], x[0, 2, 0] = -4.0, 0.0, 4.0  # opening 0.018, 0.5, 0.982
    for strength in (1.0, 64.0, 1000.0):  # up to the largest strength accepted
        with steerer.apply(model, strength=strength, gate="dsas"):
            out = model(x)
        assert torch.equal(out[0, :2], x[0, :2])  # at or below the floor: bit-identical
        assert not torch.equal(out[0, 2], x[0, 2])  # above it: steered
    # without the floor the sigmoid's tail leaks, more with the strength
    leaky = Steerer([_layer("", 4, gate=LinearGate(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.0))])
    with leaky.apply(model, strength=64.0, gate="dsas"):
        assert (model(x)[0, 0] - x[0, 0]).abs().max() > 0.5


def test_the_floor_keeps_a_fully_open_gate_at_one_and_is_saved(tmp_path):
    gate = LinearGate(torch.tensor([1.0]), 0.0, floor=0.5)
    values = gate(torch.tensor([[30.0], [-30.0]]), -1).squeeze(-1)
    assert values.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="floor"):
        LinearGate(torch.tensor([1.0]), 0.0, floor=1.0)
    Steerer([_layer("", 1, gate=gate)]).save_pretrained(tmp_path)
    assert Steerer.from_pretrained(tmp_path).layers[0].gate.floor == 0.5


def test_a_strength_above_the_steerings_bound_is_refused(token_net):
    steerer = Steerer([_layer("blocks.1", 16)], config={"max_strength": 4.0})
    with steerer.apply(token_net, strength=4.0, gate="none"):
        pass
    for strength in (4.5, -8.0):
        with pytest.raises(SteeringError, match="above this steering's bound 4"):
            steerer.apply(token_net, strength=strength, gate="none")
    assert active_hook_names(token_net) == []
    unbounded = Steerer([_layer("blocks.1", 16)])
    with unbounded.apply(token_net, strength=1e3, gate="none"):
        pass
