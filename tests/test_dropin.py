"""Drop-in: what diffusers' own pipeline tests check, run on every DSAS class with steering
loaded, at strength 0 (the output must be the stock pipeline's, bit for bit) and at a
non-zero strength (the same call works, gives the same kind of output, and steers).

Each check applies where the stock class supports it, read from the stock signature. The
tiny models have random weights, on which the fitted DSAS gates stay closed on most
images: "steers" is checked with uniform steering (``steering_gate="none"``), and the gated
path by the gate maps it records.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from kernels import needs_bfloat16_kernels
from PIL import Image
from tiny_pipelines import FAMILIES, build, fit

from dsas_diffusion.diffusion.signature import STEERING_PARAMETERS
from dsas_diffusion.steering import SteeringError

PROMPTS = ["a purple banana on a gray background", "a blue star on a white background"]
STRENGTHS = [0.0, 1.0]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


class Case:
    """A family's tiny stock pipeline and a DSAS pipeline on the same components, steering loaded."""

    def __init__(self, family: str, tokenizer_dir) -> None:
        self.tiny = build(family, tokenizer_dir)
        self.family = family
        self.pipe, self.steerer = fit(self.tiny)
        self.tiny.call_kwargs["num_inference_steps"] = 3  # enough for an interrupt after step 1
        self.stock = self.tiny.stock()
        self.stock.set_progress_bar_config(disable=True)
        self.parameters = inspect.signature(self.tiny.stock_class.__call__).parameters

    def call(self, pipe, strength=None, prompts=PROMPTS, **kwargs):
        """``pipe`` on ``prompts`` (seeded per image); ``strength=None`` for the stock class."""
        arguments = {**self.tiny.call_kwargs, "output_type": "np", **kwargs}
        count = len(prompts) * arguments.get("num_images_per_prompt", 1) if prompts is not None else 2
        arguments["generator"] = [torch.Generator().manual_seed(i) for i in range(count)]
        if strength is not None:
            arguments["steering_strength"] = strength
        if prompts is not None:
            arguments["prompt"] = prompts
        return pipe(**arguments)

    def both(self, strength, **kwargs):
        """The DSAS and the stock output of one call; at strength 0 they must be equal, at
        a non-zero strength the (uniformly) steered images must differ from the stock ones."""
        steering = {"steering_gate": "none"} if strength else {}
        steered = self.call(self.pipe, strength, **steering, **kwargs)
        stock = self.call(self.stock, **kwargs)
        a, b = _images(steered), _images(stock)
        assert type(a) is type(b) and _array(a).shape == _array(b).shape
        if strength == 0:
            assert np.array_equal(_array(a), _array(b))
        else:
            assert not np.array_equal(_array(a), _array(b)), "the steering did not act"
        return steered, stock


def _images(output):
    return output[0] if isinstance(output, tuple) else output.images


def _array(images):
    if isinstance(images, list):
        return np.stack([np.asarray(image) for image in images])
    if torch.is_tensor(images):
        return images.float().numpy()
    return np.asarray(images)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tokenizer_dir):
    return Case(request.param, tokenizer_dir)


def _steps(case):
    return case.tiny.call_kwargs["num_inference_steps"]


def test_the_call_signature_is_the_stock_one_plus_the_steering_arguments(case):
    signature = inspect.signature(case.pipe.__call__)
    stock = inspect.signature(case.stock.__call__)
    shown = list(signature.parameters.values())
    for name, parameter in stock.parameters.items():
        assert signature.parameters[name] == parameter, name  # kind, default and annotation
    steering = [p for p in shown if p.name.startswith(("steering_", "return_gate"))]
    assert steering == list(STEERING_PARAMETERS)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in steering)
    assert signature.return_annotation == stock.return_annotation
    doc = case.pipe.__call__.__doc__
    assert doc.startswith(case.stock.__call__.__doc__.rstrip()) and "steering_strength" in doc
    # help() and tools that read the class see the same
    assert inspect.signature(type(case.pipe).__call__).parameters["prompt"].default is None


@pytest.mark.parametrize("strength", STRENGTHS)
def test_num_images_per_prompt(case, strength):
    steered, _ = case.both(strength, num_images_per_prompt=2)
    assert len(steered.images) == 2 * len(PROMPTS)
    if strength:
        maps = case.call(case.pipe, strength, num_images_per_prompt=2, return_gate_maps=True).gate_maps["default"]
        assert all(tuple(t.shape) == (_steps(case), 2 * len(PROMPTS), 32, 32) for t in maps.values())


def _needs(case, *names):
    missing = [name for name in names if name not in case.parameters]
    if missing:
        pytest.skip(f"{case.tiny.stock_class.__name__} has no {missing}")


@pytest.mark.parametrize("strength", STRENGTHS)
def test_callback_on_step_end_sees_every_step_and_its_tensors(case, strength):
    _needs(case, "callback_on_step_end", "callback_on_step_end_tensor_inputs")
    inputs = list(case.tiny.stock_class._callback_tensor_inputs)
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return tensors

    case.call(case.pipe, strength, callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs)
    assert seen == [(step, sorted(inputs)) for step in range(_steps(case))]


@pytest.mark.parametrize("strength", STRENGTHS)
def test_a_callback_that_changes_the_latents_changes_the_images(case, strength):
    _needs(case, "callback_on_step_end")

    def halve(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"] * 0.5} if step == 1 else tensors

    changed, _ = case.both(strength, callback_on_step_end=halve)
    plain = case.call(case.pipe, strength, steering_gate="none" if strength else "dsas")
    assert not np.array_equal(changed.images, plain.images)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_a_callback_can_interrupt_and_the_gate_maps_hold_the_steps_that_ran(case, strength):
    _needs(case, "callback_on_step_end")
    calls = []
    handle = case.pipe.denoiser.register_forward_hook(lambda *args: calls.append(1))

    def interrupt(pipe, step, timestep, tensors):
        if step == 1:
            pipe._interrupt = True
        return tensors

    try:
        out = case.call(case.pipe, strength or 1.0, callback_on_step_end=interrupt, return_gate_maps=True)
    finally:
        handle.remove()
    assert len(calls) == 2  # steps 0 and 1 ran (guidance batched in one call), the rest were skipped
    assert all(t.shape[0] == 2 for t in out.gate_maps["default"].values())
    case.both(strength, callback_on_step_end=interrupt)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_the_legacy_callback(case, strength):
    if "callback_on_step_end" in case.parameters:
        pytest.skip("the stock class takes callback_on_step_end")
    _needs(case, "callback", "callback_steps")
    steps = []
    case.call(case.pipe, strength, callback=lambda step, t, latents: steps.append(step), callback_steps=1)
    assert steps == list(range(_steps(case)))


# what encode_prompt returns, in order, as the call's argument names (None: not a call argument)
ENCODED = {
    "sd": ["prompt_embeds", "negative_prompt_embeds"],
    "sdxl": ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"],
    "sd3": ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"],
    "flux": ["prompt_embeds", "pooled_prompt_embeds", None],
    "pixart": ["prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"],
}


@pytest.mark.parametrize("strength", STRENGTHS)
def test_encode_prompt_in_isolation_and_embeddings_instead_of_prompts(case, strength):
    """The prompt encoded on its own (diffusers' encode-in-isolation test), then passed as
    embeddings: the same images as from the prompts, steered or not."""
    wanted = {
        "prompt": PROMPTS,
        "prompt_2": None,
        "prompt_3": None,
        "device": torch.device("cpu"),
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": True,
        "negative_prompt": None,
        "max_sequence_length": case.tiny.call_kwargs.get("max_sequence_length"),
        "clean_caption": False,
    }
    accepted = inspect.signature(case.pipe.encode_prompt).parameters
    with torch.no_grad():
        encoded = case.pipe.encode_prompt(
            **{
                k: v
                for k, v in wanted.items()
                if k in accepted and (v is not None or accepted[k].default is inspect.Parameter.empty)
            }
        )
    embeddings = {name: value for name, value in zip(ENCODED[case.family], encoded, strict=True) if name}
    if "negative_prompt_embeds" in embeddings:
        embeddings["negative_prompt"] = None  # PixArt's default negative prompt "" would clash
    from_prompts = case.call(case.pipe, strength, steering_gate="none" if strength else "dsas")
    from_embeddings, _ = case.both(strength, prompts=None, **embeddings)
    np.testing.assert_allclose(from_embeddings.images, from_prompts.images, atol=1e-6)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_return_dict_false_gives_the_dict_output_as_a_tuple(case, strength):
    as_tuple, _ = case.both(strength, return_dict=False)
    as_dict = case.call(case.pipe, strength, steering_gate="none" if strength else "dsas")
    assert isinstance(as_tuple, tuple) and np.array_equal(as_tuple[0], as_dict.images)
    if strength:
        with_maps = case.call(case.pipe, strength, return_dict=False, return_gate_maps=True)
        maps = case.call(case.pipe, strength, return_gate_maps=True).gate_maps
        assert len(with_maps) == len(as_tuple) + 1
        assert all(torch.equal(with_maps[-1]["default"][k], maps["default"][k]) for k in maps["default"])


@pytest.mark.parametrize("strength", STRENGTHS)
def test_every_output_type(case, strength):
    arrays = {}
    for output_type in ("np", "pt", "pil", "latent"):
        out, _ = case.both(strength, output_type=output_type)
        arrays[output_type] = out.images
    assert isinstance(arrays["pil"][0], Image.Image)
    np.testing.assert_array_equal(arrays["pt"].permute(0, 2, 3, 1).numpy(), arrays["np"])
    np.testing.assert_array_equal(_array(arrays["pil"]), (arrays["np"] * 255).round().astype("uint8"))
    assert torch.is_tensor(arrays["latent"]) and arrays["latent"].shape[0] == len(PROMPTS)
    if strength:  # gate maps at the size the latents decode to
        maps = case.call(case.pipe, strength, output_type="latent", return_gate_maps=True).gate_maps["default"]
        assert all(tuple(t.shape[-2:]) == (32, 32) for t in maps.values())


@pytest.mark.parametrize("strength", STRENGTHS)
def test_without_classifier_free_guidance_steering_acts_on_the_whole_batch(case, strength):
    no_guidance = {"true_cfg_scale": 1.0} if case.family == "flux" else {"guidance_scale": 1.0}
    rows = []
    handle = case.pipe.denoiser.register_forward_hook(
        lambda module, args, output: rows.append((output[0] if isinstance(output, tuple) else output.sample).shape[0])
    )
    try:
        case.both(strength, **no_guidance)
    finally:
        handle.remove()
    assert rows and set(rows) == {len(PROMPTS)}  # one row per image: no guidance batch
    if strength:
        plain = case.call(case.pipe, 0.0, **no_guidance).images
        steered = case.call(case.pipe, strength, steering_gate="none", **no_guidance).images
        assert all(not np.array_equal(steered[i], plain[i]) for i in range(len(PROMPTS)))  # every image
        maps = case.call(case.pipe, strength, return_gate_maps=True, **no_guidance).gate_maps["default"]
        assert all(tuple(t.shape[:2]) == (_steps(case), len(PROMPTS)) for t in maps.values())


@pytest.mark.parametrize("strength", STRENGTHS)
def test_other_image_sizes(case, strength):
    out, _ = case.both(strength, height=24, width=16)
    assert out.images.shape == (len(PROMPTS), 24, 16, 3)
    if strength:
        maps = case.call(case.pipe, strength, height=24, width=16, return_gate_maps=True).gate_maps["default"]
        assert all(tuple(t.shape) == (_steps(case), len(PROMPTS), 24, 16) for t in maps.values())


@pytest.mark.parametrize("strength", STRENGTHS)
def test_attention_and_vae_slicing(case, strength):
    unsliced = case.call(case.pipe, strength, steering_gate="none" if strength else "dsas").images
    case.pipe.enable_attention_slicing(1)  # the components are shared: the stock pipeline slices too
    case.pipe.vae.enable_slicing()
    try:
        sliced, _ = case.both(strength)
    finally:
        case.pipe.disable_attention_slicing()
        case.pipe.vae.disable_slicing()
    np.testing.assert_allclose(sliced.images, unsliced, atol=1e-5)


@needs_bfloat16_kernels
def test_to_dtype(case, tokenizer_dir):
    tiny = build(case.family, tokenizer_dir)
    pipe = tiny.dsas().to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_steering(case.steerer)
    stock = tiny.stock()
    stock.set_progress_bar_config(disable=True)
    low = case.call(pipe, 0.0)
    assert np.array_equal(low.images, case.call(stock).images)
    steered = case.call(pipe, 1.0, steering_gate="none").images
    assert not np.array_equal(steered, low.images)
    reference = case.call(case.pipe, 1.0, steering_gate="none").images  # float32
    assert np.abs(steered - reference).mean() < 0.05  # bfloat16 keeps about 3 significant digits
    maps = case.call(pipe, 1.0, return_gate_maps=True).gate_maps["default"]
    assert maps and all(t.dtype == torch.float32 for t in maps.values())


def test_save_pretrained_writes_a_stock_pipeline_and_steerers_are_not_saved(case, tmp_path):
    case.pipe.save_pretrained(tmp_path / "pipe")
    absent = {name: None for name, value in case.tiny.components.items() if value is None}  # e.g. SD3 without T5
    loaded = case.tiny.dsas_class.from_pretrained(tmp_path / "pipe", **absent)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.steerers == {}  # steerers are not pipeline components
    unsteered = case.call(case.pipe, 0.0).images
    np.testing.assert_array_equal(case.call(loaded).images, unsteered)
    # the folder names the stock class: any diffusers loader opens it
    generic = DiffusionPipeline.from_pretrained(tmp_path / "pipe", **absent)
    assert type(generic) is case.tiny.stock_class
    loaded.load_steering(case.steerer)
    expected = case.call(case.pipe, 1.0, steering_gate="none").images
    np.testing.assert_array_equal(case.call(loaded, 1.0, steering_gate="none").images, expected)


def test_a_cache_that_skips_blocks_is_refused_and_group_offloading_composes(case, tokenizer_dir):
    from diffusers import FirstBlockCacheConfig

    tiny = build(case.family, tokenizer_dir)
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_steering(case.steerer)
    expected = case.call(case.pipe, 1.0, steering_gate="none").images
    pipe.denoiser.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    np.testing.assert_array_equal(case.call(pipe, 1.0, steering_gate="none").images, expected)
    if not hasattr(pipe.denoiser, "enable_cache"):
        return
    try:
        pipe.denoiser.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    except (ValueError, TypeError, NotImplementedError) as error:  # not every denoiser supports it
        pytest.skip(f"{type(pipe.denoiser).__name__}: no first-block cache ({error})")
    with pytest.raises(SteeringError, match="fbc_"):
        case.call(pipe, 1.0)
    case.call(pipe, 0.0)  # unsteered calls keep the cache
    pipe.denoiser.disable_cache()
    np.testing.assert_array_equal(case.call(pipe, 1.0, steering_gate="none").images, expected)
