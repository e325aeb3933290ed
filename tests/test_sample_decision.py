"""One decision per image (``sample_decision="accumulated"``): every layer's sample-gate logit,
scaled per layer and averaged over the denoising steps before the steering window, decides
whether an image is steered at all; in the arithmetic, in a session on a plain model, in the
steering file and through every pipeline family."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_pipelines import CONTROL, FAMILIES, SOURCE, build, fit_reading_input
from torch import nn

from dsas_diffusion.config import FitConfig
from dsas_diffusion.errors import SteeringFileError
from dsas_diffusion.steering import HookPoint, LinearGate, Steerer, SteeringError, SteeringLayer, SteeringMap
from dsas_diffusion.steering.decision import SampleDecision, calibrate_decision

WIDTH = 4


def test_a_decision_scores_the_layers_mean_scaled_logits_once():
    decision = SampleDecision(1.0, {"a": 2.0})
    decision.observe("a", torch.tensor([4.0, 0.0, 2.0]))  # scaled: 2, 0, 1
    decision.observe("b", torch.tensor([1.0, 1.0, 1.5]))  # unscaled
    decision.observe("b", torch.tensor([3.0, 1.0, 1.5]))  # b's mean over steps: 2, 1, 1.5
    torch.testing.assert_close(decision.score(), torch.tensor([2.0, 0.5, 1.25]))  # the layers alike
    assert decision.factor(torch.device("cpu")).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(SteeringError, match="already taken"):
        decision.observe("a", torch.zeros(3))
    weighted = SampleDecision(0.0, {"a": 2.0}, {"a": 2.0, "b": -1.0}, bias=0.5)
    weighted.observe("a", torch.tensor([4.0, 0.0]))
    weighted.observe("b", torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted.score(), torch.tensor([3.5, -2.5]))  # 2·a − b + 0.5
    with pytest.raises(SteeringError, match=r"layers \['c'\], which were not observed"):
        _only_a().score()
    with pytest.raises(SteeringError, match="none was observed"):
        SampleDecision(0.0).factor(torch.device("cpu"))
    with pytest.raises(SteeringError, match="rows changed"):
        other = SampleDecision(0.0)
        other.observe("a", torch.zeros(2))
        other.observe("a", torch.zeros(3))


def _only_a() -> SampleDecision:
    decision = SampleDecision(0.0, weights={"a": 1.0, "c": 1.0})
    decision.observe("a", torch.zeros(2))
    return decision


def _runs(generator, shift: float = 0.0, size: int = 5):
    """Two seed rounds of two runs of ``size`` samples, 3 steps each; layer b's logits are 100
    times larger, layer a's shifted by ``shift``."""

    def logits(name: str) -> torch.Tensor:
        values = torch.randn(size, generator=generator)
        return values * 100.0 if name == "b" else values + shift

    return [[[(name, logits(name)) for _ in range(3) for name in ("a", "b")] for _ in range(2)] for _ in range(2)]


@pytest.mark.numerics
def test_calibration_weighs_layers_alike_and_leaves_no_held_out_control_sample_above_the_threshold():
    generator = torch.Generator().manual_seed(0)
    layers = [_layer("a"), _layer("b")]
    control = _runs(generator)
    settings, scores = calibrate_decision(layers, control, 1.0)
    assert settings["scales"]["b"] / settings["scales"]["a"] > 30  # each divided by its own spread
    assert settings["weights"] is None and scores.shape == (20,)
    # above the highest held-out control score by a margin of their spread, never on it
    assert settings["threshold"] == pytest.approx(float(scores.max()) + 0.01 * float(scores.double().std()))
    for run in (run for round_ in control for run in round_):  # a call over the same samples flags none
        decision = SampleDecision(settings["threshold"], settings["scales"])
        for name, logits in run:
            decision.observe(name, logits)
        assert decision.factor(torch.device("cpu")).sum() == 0
    median, _ = calibrate_decision(layers, control, 0.5)
    ordered = scores.double().sort().values
    assert int((scores > median["threshold"]).sum()) == 10  # the quantile's count, midway between two scores
    assert median["threshold"] == pytest.approx(float(ordered[9] + ordered[10]) / 2)
    # stacked: the source differs from the control in layer a only, which then carries the weight
    control = _runs(generator, size=50)
    stacked, held_out = calibrate_decision(layers, control, 1.0, source=_runs(generator, shift=1.5, size=50))
    assert stacked["weights"]["a"] > 10 * abs(stacked["weights"]["b"]) and held_out.shape == (100,)
    for run in control[-1]:  # the last round set the threshold: none of its samples is above it
        decision = SampleDecision(stacked["threshold"], stacked["scales"], stacked["weights"], stacked["bias"])
        for name, logits in run:
            decision.observe(name, logits)
        assert decision.factor(torch.device("cpu")).sum() == 0
    with pytest.raises(SteeringError, match="two rounds of control samples"):
        calibrate_decision(layers, control[:1], 1.0, source=control[:1])


def test_fit_settings_name_what_a_decision_needs():
    with pytest.raises(SteeringError, match="sample_gate=True and steering_steps starting after 0"):
        FitConfig.for_diffusion(sample_decision="accumulated", steering_steps=(0.5, 1.0))
    with pytest.raises(SteeringError, match="steering_steps starting after 0"):
        FitConfig.for_diffusion(sample_decision="accumulated", sample_gate=True, steering_steps=(0.0, 1.0))
    with pytest.raises(SteeringError, match="decision_seeds must be at least 2"):
        FitConfig.for_diffusion(sample_decision="stacked", sample_gate=True, steering_steps=(0.5, 1), decision_seeds=1)
    with pytest.raises(SteeringError, match="decision_quantile"):
        FitConfig.for_diffusion(decision_quantile=0.0)


def _layer(name: str) -> SteeringLayer:
    """Steers +1 everywhere through a gate that is always open; its sample gate reads the mean
    of feature 0."""
    sample = torch.zeros(WIDTH)
    sample[0] = 1.0
    return SteeringLayer(
        HookPoint(name, layout="channels_last"),
        SteeringMap(torch.ones(WIDTH)),
        LinearGate(torch.zeros(WIDTH), 20.0),
        sample_gate=LinearGate(sample, 0.0),
    )


@torch.no_grad()
def test_a_session_observes_untouched_then_steers_only_the_samples_decided(tmp_path):
    model = nn.Sequential(nn.Identity())
    steerer = Steerer([_layer("0")], config={"decision": {"threshold": 0.5, "scales": {"0": 2.0}}})
    x = torch.zeros(3, 2, WIDTH)
    x[0, :, 0], x[1, :, 0], x[2, :, 0] = 2.0, 0.5, 1.2  # mean logits 1.0, 0.25, 0.6 after scaling
    with steerer.apply(model, strength=1.0, record_gates=True) as session:
        session.active, session.observing = False, True
        assert torch.equal(model(x), x)  # observing changes nothing
        session.active, session.observing = True, False
        steered = model(x)
        again = model(x * 0)  # the decision is held for the rest of the call
    torch.testing.assert_close(steered - x, torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, WIDTH))
    assert session.gate_maps["0"][0].float().amax(1).tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(again[1], torch.zeros(2, WIDTH)) and again[0].eq(1.0).all()
    with steerer.apply(model, strength=1.0), pytest.raises(SteeringError, match="none was observed"):
        model(x)
    steerer.save_pretrained(tmp_path)
    assert Steerer.from_pretrained(tmp_path).config["decision"] == steerer.config["decision"]
    path = tmp_path / "steering_config.json"
    saved = json.loads(path.read_text())
    saved["config"]["decision"]["scales"]["0"] = -1.0
    path.write_text(json.dumps(saved))
    with pytest.raises(SteeringFileError, match=r"config\.decision"):
        Steerer.from_pretrained(tmp_path)
    uncalibrated = Steerer([_layer("0")], config={"decision": {"threshold": None}})
    with pytest.raises(SteeringError, match="never calibrated"):
        uncalibrated.apply(model)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


def _run(pipe, prompts, tiny, first_seed=0, **kwargs):
    generators = [torch.Generator().manual_seed(first_seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, output_type="np", **{**tiny.call_kwargs, **kwargs})


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["accumulated", "stacked"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_steers_an_image_wholly_or_not_at_all(family, kind, tokenizer_dir):
    tiny = build(family, tokenizer_dir)
    steps = tiny.call_kwargs["num_inference_steps"]
    pipe, steerer = fit_reading_input(tiny, sample_decision=kind, decision_inference_steps=steps)
    saved = steerer.config["decision"]
    assert math.isfinite(saved["threshold"]) and saved["kind"] == kind
    assert saved["samples"] == (2 if kind == "accumulated" else 1) * len(CONTROL)  # the held-out control images
    assert (saved["weights"] is None) == (kind == "accumulated")
    assert steerer.decision_threshold == saved["threshold"]
    assert set(saved["scales"]) == set(steerer.module_names) and saved["num_inference_steps"] == steps
    prompts = CONTROL + SOURCE
    held_out = len(CONTROL)  # the control images of the second seed round set the threshold ...
    unsteered = _run(pipe, prompts, tiny, held_out).images
    steered = _run(pipe, prompts, tiny, held_out, steering_strength=8.0).images
    np.testing.assert_array_equal(steered[: len(CONTROL)], unsteered[: len(CONTROL)])  # ... so none is steered
    saved["threshold"] = -1e9  # every image decided: steered at its positional gates
    every = _run(pipe, prompts, tiny, held_out, steering_strength=8.0).images
    assert all(not np.array_equal(every[i], unsteered[i]) for i in range(len(prompts)))
    for i in range(len(CONTROL), len(prompts)):  # each source image: wholly one or the other
        assert np.array_equal(steered[i], every[i]) or np.array_equal(steered[i], unsteered[i])
    with pytest.raises(SteeringError, match="steps before its steering window"):
        _run(pipe, prompts[:1], tiny, steering_strength=8.0, steering_steps=(0.0, 1.0))
    with pytest.warns(UserWarning, match=f"calibrated on {steps} denoising steps"):
        _run(pipe, prompts[:1], tiny, steering_strength=8.0, num_inference_steps=steps + 2)
    uniform = _run(pipe, prompts[:1], tiny, steering_strength=8.0, steering_gate="none", steering_steps=(0.0, 1.0))
    assert not np.array_equal(uniform.images[0], unsteered[0])  # uniform steering needs no decision
