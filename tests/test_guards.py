"""Guards around real (tiny) diffusers pipelines: no silent NaN image, one call at a time per
pipeline object (and ``for_thread`` pipelines that do run at once), and fit arguments
checked before any collection run."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from tiny_pipelines import build

from dsas_diffusion.steering import ActivationError, InputSetError, SteeringError

SOURCE = [f"a {c} banana on a {b} background" for c in ("red", "yellow", "green") for b in ("white", "black")]
TARGET = [f"a {c} circle on a {b} background" for c in ("red", "yellow", "green") for b in ("white", "black")]
CONTROL = [f"a {c} square on a {b} background" for c in ("red", "yellow", "green") for b in ("white", "black")]
PROMPTS = ["a purple banana on a gray background", "a blue star on a white background"]
CALL = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("sd", tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def pipe(tiny):
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    pipe.fit_steering(
        SOURCE,
        TARGET,
        CONTROL,
        num_inference_steps=3,
        gate_threshold=None,  # random weights: keep every layer
        max_strength=None,
        progress=False,
        pipeline_kwargs={"height": 32, "width": 32},
    )
    return pipe


def _run(pipe, prompts=PROMPTS, **kwargs):
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, **CALL, **kwargs).images


def test_a_non_finite_result_raises_instead_of_a_black_image(pipe):
    with pytest.raises(SteeringError, match="steering strength 1e\\+30 is beyond any useful value"):
        _run(pipe, steering_strength=1e30, steering_gate="none")  # refused before it can overflow
    steerer = pipe.steerers["default"]
    layer = steerer.layers[1]
    saved = layer.map.bias.detach().clone()
    layer.map.bias.data[0] = float("nan")
    try:
        with pytest.raises(ActivationError, match=f"{layer.name}'?\\] hold NaN or infinite values"):
            _run(pipe, steering_strength=1.0, steering_gate="none")
    finally:
        layer.map.bias.data.copy_(saved)
    assert np.isfinite(_run(pipe, steering_strength=1.0)).all()  # and a healthy call passes


def test_a_second_concurrent_call_on_one_pipeline_is_refused_and_for_thread_pipelines_run_together(pipe):
    started, tried = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(pipeline, step, timestep, kwargs):  # the first call waits inside its loop
        started.set()
        tried.wait(timeout=60)
        return kwargs

    def second():
        started.wait(timeout=60)
        try:
            _run(pipe, steering_strength=1.0)
        except SteeringError as error:
            errors.append(error)
        finally:
            tried.set()

    thread = threading.Thread(target=second)
    thread.start()
    first = _run(pipe, steering_strength=1.0, callback_on_step_end=hold)
    thread.join()
    assert len(errors) == 1 and "pipe.for_thread()" in str(errors[0])
    assert np.array_equal(first, _run(pipe, steering_strength=1.0))  # the first call was not disturbed

    workers = [pipe.for_thread() for _ in range(2)]
    results: dict[int, np.ndarray] = {}

    def work(index):
        results[index] = _run(workers[index], steering_strength=1.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(results[0], first) and np.array_equal(results[1], first)
    assert workers[0].unet is pipe.unet and workers[0].scheduler is not pipe.scheduler


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"source_prompts": "a red banana on a white background"}, InputSetError, "source_prompts is a single string"),
        ({"control_prompts": ["a red square on a white background", "  "]}, InputSetError, r"control_prompts\[1\]"),
        ({"target_prompts": []}, InputSetError, "target_prompts is empty"),
        ({"map": "linear_act"}, SteeringError, "map must be one of"),
        ({"gate_floor": 1.0}, SteeringError, r"gate_floor must lie in \[0, 1\)"),
        ({"num_inference_steps": 0}, SteeringError, "num_inference_steps must be a whole number >= 1"),
        ({"batch_size": 0}, SteeringError, "batch_size must be a whole number >= 1"),
        ({"collect_steps": [0, 9]}, SteeringError, r"collect_steps \[9\] lie outside the 3 collection steps"),
        ({"gate_threshold": 1.5}, SteeringError, "gate_threshold must be None or a number"),
    ],
)
def test_fit_arguments_are_checked_before_any_collection_run(tiny, arguments, error, message):
    pipe = tiny.dsas()
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    sets = {"source_prompts": SOURCE, "target_prompts": TARGET, "control_prompts": CONTROL}
    sets.update({k: v for k, v in arguments.items() if k in sets})
    rest = {"num_inference_steps": 3, **{k: v for k, v in arguments.items() if k not in sets}}
    try:
        with pytest.raises(error, match=message):
            pipe.fit_steering(
                sets["source_prompts"], sets["target_prompts"], sets["control_prompts"], progress=False, **rest
            )
    finally:
        handle.remove()
    assert not calls  # refused before the denoiser ran once
