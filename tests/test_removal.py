"""fit_steering's defaults on shapes-sd remove the concept and leave control images alone,
at every strength: the gates' floor keeps closed positions exactly unsteered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval import pixel_change
from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes import ShapeJudge, concept_dir, concept_prompts, concepts_drawn
from dsas_diffusion.steering import SteeringError

CONCEPT = ["a yellow banana on a gray background", "a red banana on a white background",
           "a purple banana on a black background", "a green banana on a gray background"]  # fmt: skip
CONTROL = read_prompts(concept_dir("banana") / "eval_control.txt")[:8]  # held out from fitting


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    source, target, control = concept_prompts("banana")
    pipe.fit_steering(source, target, control, num_inference_steps=6, progress=False)
    return pipe


def _render(pipe, prompts, **steering):
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, num_inference_steps=12, **steering).images


@pytest.mark.slow
def test_control_images_stay_within_the_bound_at_every_strength(pipe):
    plain = _render(pipe, CONTROL, steering_strength=0.0)

    def change(strength):  # the target's measure: mean absolute pixel change of control images
        steered = _render(pipe, CONTROL, steering_strength=strength)
        return float(np.mean([pixel_change(a, b) for a, b in zip(steered, plain, strict=True)]))

    for strength in (2.0, 16.0):
        assert change(strength) <= 2.0, strength
    with pytest.raises(SteeringError, match="above this steering's bound 16"):
        change(64.0)  # the default bound refuses, before any image is drawn
    steerer = pipe.steerers["default"]
    steerer.config["max_strength"] = None  # without the bound, the gates' floor alone keeps control images
    try:
        assert change(64.0) <= 2.0
    finally:
        steerer.config["max_strength"] = 16.0


@pytest.mark.slow
def test_the_defaults_remove_the_concept_where_uniform_steering_damages_control(pipe):
    judge = ShapeJudge()
    plain = _render(pipe, CONCEPT, steering_strength=0.0)
    steered = _render(pipe, CONCEPT, steering_strength=2.0)
    before = np.mean(concepts_drawn(judge, plain, CONCEPT, "banana"))
    after = np.mean(concepts_drawn(judge, steered, CONCEPT, "banana"))
    assert before >= 0.5 and after <= before / 2, (before, after)
    control_plain = _render(pipe, CONTROL, steering_strength=0.0)
    uniform = _render(pipe, CONTROL, steering_strength=2.0, steering_gate="none")
    assert np.mean([pixel_change(a, b) for a, b in zip(uniform, control_plain, strict=True)]) > 2.0
