"""One behaviour suite over every pipeline family, on tiny pipelines built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import CONTROL, FAMILIES, SOURCE, TARGET, build, fit, fit_reading_input

import dsas_diffusion
from dsas_diffusion.diffusion import architecture_of, hook_points, record_denoiser_calls
from dsas_diffusion.steering import Steerer, SteeringError, active_hook_names

PROMPTS = ["a purple banana on a gray background", "a blue star on a white background"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tokenizer_dir):
    return build(request.param, tokenizer_dir)


@pytest.fixture(scope="module")
def fitted(tiny):
    """A DSAS pipeline of the family with a Linear-AcT + DSAS steerer fitted through pipeline runs."""
    return fit(tiny)


def _run(pipe, prompts, seed=0, **kwargs):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, output_type="np", **kwargs)


def test_presets_name_existing_modules_and_the_image_stream(tiny):
    denoiser = tiny.components.get("unet") or tiny.components["transformer"]
    names = dict(denoiser.named_modules())
    for preset in ("blocks", "norms"):
        points = hook_points(denoiser, preset)
        assert points and all(p.module in names for p in points)
    if tiny.family == "flux":  # both block kinds, image stream = output 1
        modules = [p.module for p in hook_points(denoiser, "blocks")]
        assert "transformer_blocks.0" in modules and "single_transformer_blocks.0" in modules
    assert architecture_of(denoiser).denoiser_class == type(denoiser).__name__


def test_strength_zero_and_no_steering_are_bit_identical_to_the_stock_pipeline(tiny, fitted):
    pipe, _ = fitted
    stock = tiny.stock()
    stock.set_progress_bar_config(disable=True)
    reference = _run(stock, PROMPTS, **tiny.call_kwargs).images
    assert np.array_equal(_run(pipe, PROMPTS, steering_strength=0.0, **tiny.call_kwargs).images, reference)
    other = tiny.dsas()
    other.set_progress_bar_config(disable=True)
    assert np.array_equal(_run(other, PROMPTS, **tiny.call_kwargs).images, reference)
    steered = _run(pipe, PROMPTS, steering_strength=1.0, steering_gate="none", **tiny.call_kwargs).images
    assert not np.array_equal(steered, reference)  # and the steering does act


@pytest.mark.numerics
def test_a_batch_gives_the_images_of_each_prompt_alone(tiny, fitted):
    pipe, _ = fitted
    batch = _run(pipe, PROMPTS, steering_strength=1.0, **tiny.call_kwargs).images
    for i, prompt in enumerate(PROMPTS):
        alone = _run(pipe, [prompt], seed=i, steering_strength=1.0, **tiny.call_kwargs).images
        np.testing.assert_allclose(alone[0], batch[i], atol=2e-3)


@pytest.mark.numerics
def test_one_strength_per_prompt_gives_each_prompt_its_image_alone(tiny, fitted):
    pipe, _ = fitted
    stock = tiny.stock()
    stock.set_progress_bar_config(disable=True)
    reference = _run(stock, PROMPTS, **tiny.call_kwargs).images
    for cfg, gate in (("cond", "none"), ("both", "dsas")):
        steering = {"steering_cfg": cfg, "steering_gate": gate, **tiny.call_kwargs}
        batch = _run(pipe, PROMPTS, steering_strength=[2.0, 0.0], **steering).images
        assert np.array_equal(batch[1], reference[1])  # λ 0 beside a steered prompt: the stock image, bit for bit
        alone = _run(pipe, PROMPTS[:1], steering_strength=2.0, **steering).images
        np.testing.assert_allclose(alone[0], batch[0], atol=2e-3)
        assert gate == "dsas" or not np.array_equal(batch[0], reference[0])
    # the images of a prompt share its λ; a mapping gives one steerer its own per prompt
    call = {**tiny.call_kwargs, "num_images_per_prompt": 2, "output_type": "np", "steering_gate": "none"}

    def generators():
        return [torch.Generator().manual_seed(i) for i in (0, 0, 1, 1)]

    mixed = pipe(PROMPTS, generator=generators(), steering_strength={"default": [0.0, 2.0]}, **call).images
    plain = pipe(PROMPTS, generator=generators(), steering_strength=0.0, **call).images
    assert np.array_equal(mixed[:2], plain[:2]) and not np.array_equal(mixed[2:], plain[2:])
    with pytest.raises(SteeringError, match="3 values for 2 prompts"):
        pipe(PROMPTS, steering_strength=[1.0, 1.0, 2.0], **tiny.call_kwargs)


def test_hooks_are_removed_after_the_call_and_after_an_exception(tiny, fitted):
    pipe, _ = fitted
    _run(pipe, PROMPTS[:1], steering_strength=1.0, **tiny.call_kwargs)
    assert active_hook_names(pipe.denoiser) == []

    def explode(module, args, kwargs):
        raise RuntimeError("boom inside the denoiser")

    handle = pipe.denoiser.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _run(pipe, PROMPTS[:1], steering_strength=1.0, **tiny.call_kwargs)
    finally:
        handle.remove()
    assert active_hook_names(pipe.denoiser) == []


def test_gate_maps_per_layer_and_step_at_image_size(tiny, fitted):
    pipe, steerer = fitted
    out = _run(pipe, PROMPTS, steering_strength=1.0, return_gate_maps=True, **tiny.call_kwargs)
    maps = out.gate_maps["default"]
    assert set(maps) == set(steerer.module_names)
    steps = tiny.call_kwargs["num_inference_steps"]
    for tensor in maps.values():
        assert tuple(tensor.shape) == (steps, len(PROMPTS), 32, 32)
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0


def _first_denoiser_output(pipe, tiny, **steering):
    """The denoiser's output at the first step ([unconditional; conditional] rows)."""
    outputs = []

    def keep(module, args, output):
        if not outputs:
            outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    handle = pipe.denoiser.register_forward_hook(keep)
    try:
        _run(pipe, PROMPTS, **steering, **tiny.call_kwargs)
    finally:
        handle.remove()
    return outputs[0]


def test_steering_the_conditional_half_leaves_the_unconditional_rows_untouched(tiny, fitted):
    pipe, _ = fitted
    if pipe.dsas_cfg_layout != "batched" or not pipe._guidance_on(tiny.call_kwargs):
        pytest.skip(f"{tiny.family} runs no batched classifier-free guidance")
    plain = _first_denoiser_output(pipe, tiny, steering_strength=0.0)
    half = len(PROMPTS)
    assert plain.shape[0] == 2 * half
    for gate in ("none", "dsas"):
        cond = _first_denoiser_output(pipe, tiny, steering_strength=2.0, steering_gate=gate, steering_cfg="cond")
        assert torch.equal(cond[:half], plain[:half])  # unconditional rows: bit-identical, gated or not
    # uniform steering (the gates of random weights may stay shut) changes what it is asked to
    cond = _first_denoiser_output(pipe, tiny, steering_strength=2.0, steering_gate="none", steering_cfg="cond")
    both = _first_denoiser_output(pipe, tiny, steering_strength=2.0, steering_gate="none", steering_cfg="both")
    assert not torch.equal(cond[half:], plain[half:])  # conditional rows steered
    assert not torch.equal(both[:half], plain[:half]) and not torch.equal(both[half:], plain[half:])


def test_separate_guidance_calls_steer_only_the_conditional_call(tokenizer_dir):
    """FLUX runs true classifier-free guidance as two denoiser calls per step (conditional
    first): with steering_cfg="cond" only the first call of each step is steered."""
    tiny = build("flux", tokenizer_dir)
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    extra = {k: v for k, v in tiny.call_kwargs.items() if k != "num_inference_steps"}
    pipe.fit_steering(SOURCE, TARGET, gate="none", preset="blocks", num_inference_steps=2, progress=False,
                      pipeline_kwargs=extra)  # fmt: skip
    call = {**tiny.call_kwargs, "true_cfg_scale": 2.0, "negative_prompt": ["a gray background"] * len(PROMPTS)}
    call["steering_gate"] = "none"

    def outputs(**steering):
        kept = []
        handle = pipe.denoiser.register_forward_hook(lambda m, a, o: kept.append(o[0].detach().clone()))
        try:
            _run(pipe, PROMPTS, **{**call, **steering})
        finally:
            handle.remove()
        return kept

    plain, cond, both = (
        outputs(steering_strength=0.0),
        outputs(steering_strength=2.0),
        outputs(steering_strength=2.0, steering_cfg="both"),
    )
    assert len(plain) == 2 * call["num_inference_steps"]  # two calls per step
    assert not torch.equal(cond[0], plain[0]) and torch.equal(cond[1], plain[1])  # first step: only the conditional
    assert not torch.equal(both[1], plain[1])


def test_a_step_window_steers_only_the_chosen_steps(tiny, fitted):
    pipe, _ = fitted
    steps = tiny.call_kwargs["num_inference_steps"]
    full = _run(pipe, PROMPTS[:1], steering_strength=1.0, steering_gate="none", **tiny.call_kwargs).images
    half = _run(
        pipe, PROMPTS[:1], steering_strength=1.0, steering_steps=(0, 0.5), return_gate_maps=True, **tiny.call_kwargs
    )
    assert all(tensor.shape[0] == steps // 2 for tensor in half.gate_maps["default"].values())  # gates of steered steps
    early = _run(pipe, PROMPTS[:1], steering_strength=1.0, steering_gate="none", steering_steps=(0, 0.5),
                 **tiny.call_kwargs).images  # fmt: skip
    plain = _run(pipe, PROMPTS[:1], steering_strength=0.0, **tiny.call_kwargs).images
    assert not np.array_equal(early, plain) and not np.array_equal(early, full)
    with pytest.raises(SteeringError, match="steering_steps"):
        _run(pipe, PROMPTS[:1], steering_strength=1.0, steering_steps=(0.5, 0.2), **tiny.call_kwargs)


def test_fit_save_load_generate_round_trip(tiny, fitted, tmp_path):
    pipe, steerer = fitted
    steerer.save_pretrained(tmp_path / "steering")
    expected = _run(pipe, PROMPTS, steering_strength=1.0, **tiny.call_kwargs).images
    other = tiny.dsas()
    other.set_progress_bar_config(disable=True)
    loaded = other.load_steering(tmp_path / "steering")
    assert isinstance(loaded, Steerer)
    np.testing.assert_array_equal(_run(other, PROMPTS, steering_strength=1.0, **tiny.call_kwargs).images, expected)
    assert loaded.provenance["denoiser_class"] == type(pipe.denoiser).__name__
    assert loaded.provenance["collect_steps"] == [0, 2]


def test_gates_reading_the_cross_attention_input_fit_and_steer_every_family(tiny):
    """The query input of each cross-attention (SD, SDXL, PixArt: passed positionally) and the
    image-stream input of each joint attention (SD3, FLUX: passed as hidden_states=)."""
    pipe, steerer = fit_reading_input(tiny)
    denoiser = pipe.denoiser
    for layer in steerer.layers:
        assert layer.gate.reads == layer.sample_gate.reads == "input"
        attention = denoiser.get_submodule(layer.name)
        assert layer.gate.width == layer.sample_gate.width == attention.to_q.in_features  # the query input's width
    unsteered = _run(pipe, PROMPTS, **tiny.call_kwargs)
    steered = _run(pipe, PROMPTS, steering_strength=4.0, return_gate_maps=True, **tiny.call_kwargs)
    assert not np.array_equal(steered.images, unsteered.images)
    assert set(steered.gate_maps["default"]) == set(steerer.module_names)
    steps = tiny.call_kwargs["num_inference_steps"]  # the saved window: the second half of the steps only
    assert all(maps.shape[0] == steps - steps // 2 for maps in steered.gate_maps["default"].values())
    every = _run(pipe, PROMPTS, steering_strength=4.0, steering_steps=(0, 1), return_gate_maps=True, **tiny.call_kwargs)
    assert all(maps.shape[0] == steps for maps in every.gate_maps["default"].values())  # the call's window wins


def test_from_pipe_reuses_the_components(tiny):
    stock = tiny.stock()
    converted = tiny.dsas_class.from_pipe(stock)
    assert isinstance(converted, dsas_diffusion.DSASPipelineMixin)
    assert converted.denoiser is (stock.components.get("unet") or stock.components["transformer"])


def _loaded_twice(tiny, steerer, names):
    """A new DSAS pipeline of the family with ``steerer`` loaded under both ``names``."""
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    for name in names:
        pipe.load_steering(steerer, name=name)
    return pipe


def test_a_gate_per_steerer_puts_uniform_and_dsas_images_in_one_batch(tiny, fitted):
    pipe = _loaded_twice(tiny, fitted[1], ("uniform", "dsas"))
    prompt = PROMPTS[:1] * 3  # unsteered, uniform, DSAS: each row steered by one name at most
    batch = pipe(prompt, generator=[torch.Generator().manual_seed(0) for _ in range(3)], output_type="np",
                 steering_strength={"uniform": [0.0, 2.0, 0.0], "dsas": [0.0, 0.0, 2.0]},
                 steering_gate={"uniform": "none"}, return_gate_maps=True, **tiny.call_kwargs)  # fmt: skip
    for row, steering in enumerate(({"steering_strength": 0.0}, {"steering_gate": "none"}, {})):
        alone = _run(pipe, PROMPTS[:1], **{"steering_strength": {"uniform": 0.0, "dsas": 2.0}, **steering},
                     **tiny.call_kwargs).images  # fmt: skip
        np.testing.assert_allclose(alone[0], batch.images[row], atol=2e-3)
    assert set(batch.gate_maps) == {"dsas"}  # uniform steering has no gates to map
    with pytest.raises(SteeringError, match="steering_gate names"):
        _run(pipe, PROMPTS[:1], steering_strength=1.0, steering_gate={"nope": "none"}, **tiny.call_kwargs)


def test_two_steerers_each_with_its_own_gates(tiny, fitted):
    second = _loaded_twice(tiny, fitted[1], ("bananas", "again"))
    out = _run(
        second, PROMPTS[:1], steering_strength={"bananas": 1.0, "again": 0.5}, return_gate_maps=True, **tiny.call_kwargs
    )
    assert set(out.gate_maps) == {"bananas", "again"}
    with pytest.raises(SteeringError, match="not loaded"):
        _run(second, PROMPTS[:1], steering_strength={"nope": 1.0}, **tiny.call_kwargs)
    second.unload_steering("again")
    assert list(second.steerers) == ["bananas"]


def test_collection_keeps_the_conditional_rows_of_the_chosen_steps(tiny):
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.denoiser
    extra = {k: v for k, v in tiny.call_kwargs.items() if k != "num_inference_steps"}
    calls = record_denoiser_calls(
        pipe, denoiser, SOURCE[:4], steps=(1, 3), num_inference_steps=4, batch_size=3, progress=False, **extra
    )
    assert len(calls) == 4  # two prompt batches (3 + 1) x two steps
    primary = [next(v for v in call.values() if torch.is_tensor(v)) for call in calls]
    assert [p.shape[0] for p in primary] == [3, 3, 1, 1]
    with pytest.raises(SteeringError, match="collection steps"):
        record_denoiser_calls(pipe, denoiser, SOURCE[:1], steps=(7,), num_inference_steps=4, progress=False, **extra)


def test_custom_pipeline_file_loads_the_dsas_class(tokenizer_dir, tmp_path):
    build("sd", tokenizer_dir).stock().save_pretrained(tmp_path / "tiny-sd")
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "pipelines" / "dsas_stable_diffusion.py"
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "tiny-sd", custom_pipeline=str(path), trust_remote_code=True)
    assert type(pipe).__name__ == "DSASStableDiffusionPipeline"
    assert hasattr(pipe, "fit_steering")


def test_a_hook_on_the_text_stream_of_a_joint_block_is_refused(tokenizer_dir):
    """SD3's joint blocks return (text, image) with the same width; steering the text stream
    by mistake must fail loudly, when fitting and when applying a file made that way."""
    from dsas_diffusion.diffusion import run_denoiser_call
    from dsas_diffusion.steering import ActivationError, HookPoint, fit_steerer

    tiny = build("sd3", tokenizer_dir)
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    wrong = [HookPoint("transformer_blocks.0", output_index=0, layout="channels_last")]
    kwargs = {"height": 32, "width": 32, "max_sequence_length": 16}
    with pytest.raises(ActivationError, match="not the image-token stream"):
        pipe.fit_steering(SOURCE, TARGET, CONTROL, hook_points=wrong, num_inference_steps=2, progress=False,
                          pipeline_kwargs=kwargs)  # fmt: skip
    calls = {
        name: record_denoiser_calls(
            pipe, pipe.denoiser, prompts, steps=(0,), num_inference_steps=2, progress=False, **kwargs
        )
        for name, prompts in (("s", SOURCE), ("t", TARGET), ("c", CONTROL))
    }
    steerer = fit_steerer(pipe.denoiser, wrong, calls["s"], calls["t"], calls["c"], gate_threshold=None,
                          forward=lambda c: run_denoiser_call(pipe.denoiser, c), mask_fn=lambda c: None,
                          progress=False)  # fmt: skip
    pipe.load_steering(steerer)
    with pytest.raises(ActivationError, match="not the image-token stream"):
        _run(pipe, PROMPTS[:1], steering_strength=1.0, **tiny.call_kwargs)
    assert active_hook_names(pipe.denoiser) == []
