"""Steering a compiled denoiser, the ways users compile, on every pipeline family.

Each idiom (``pipe.<denoiser>.compile()``, ``torch.compile`` assigned back, diffusers'
``compile_repeated_blocks()`` where the denoiser declares repeated blocks) on a tiny pipeline of
each family: steered latents equal the eager ones at every strength, no graph break, no new
graph after the first unsteered and the first steered call, and calls that need eager hooks
(gate maps, a step window) give the eager latents. Dynamo's ``eager`` backend keeps the
traces short; what it traces (hooks, guards, graph breaks) is what any backend compiles
(``benchmarks/compiled.py`` runs inductor on the Shapes models).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tiny_pipelines import CONTROL, FAMILIES, SOURCE, TARGET, build, fit, fit_reading_input
from torch._dynamo.utils import counters

from dsas_diffusion.diffusion import architecture_of, hook_points
from dsas_diffusion.steering import ActivationError, Steerer, active_hook_names
from dsas_diffusion.steering.compiled import compiled_kind

PROMPTS = ["a purple banana on a gray background", "a blue star on a white background"]
IDIOMS = [(family, idiom) for family in FAMILIES for idiom in ("in-place", "wrapped", "regional")]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="module")
def families(tokenizer_dir):
    """Per family: the tiny pipeline's parts, its fitted steerer and eager reference images."""
    cache = {}

    def get(family):
        if family not in cache:
            tiny = build(family, tokenizer_dir)
            pipe, steerer = fit(tiny)
            references = {
                (strength, gate): _run(pipe, tiny, steering_strength=strength, steering_gate=gate)
                for strength in (0.0, 1.0, 2.0)
                for gate in ("dsas", "none")
            }
            references["window"] = _run(pipe, tiny, steering_strength=2.0, steering_steps=(0.0, 0.5))
            cache[family] = (tiny, steerer, references)
        return cache[family]

    return get


def _run(pipe, tiny, **kwargs):
    """The call's final latents (before the VAE, which squashes differences on tiny pipelines)."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    call = {**tiny.call_kwargs, "num_inference_steps": 2}
    return pipe(PROMPTS, generator=generators, output_type="latent", **call, **kwargs).images.numpy()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def compiled_pipeline(tiny, steerer, idiom):
    """A fresh DSAS pipeline of the tiny components with ``steerer`` loaded and its denoiser
    compiled by ``idiom``; the shared denoiser is uncompiled and unhooked afterwards."""
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_steering(steerer)
    attribute = "unet" if "unet" in tiny.components else "transformer"
    denoiser = tiny.components[attribute]
    try:
        if idiom == "in-place":
            denoiser.compile(backend="eager")
        elif idiom == "wrapped":
            setattr(pipe, attribute, torch.compile(denoiser, backend="eager"))
        else:
            denoiser.compile_repeated_blocks(backend="eager")
        torch._dynamo.reset()
        counters.clear()
        yield pipe
    finally:
        pipe.unload_steering()
        for module in denoiser.modules():
            module._compiled_call_impl = None
        assert not active_hook_names(denoiser)
        torch._dynamo.reset()


@pytest.mark.parametrize(("family", "idiom"), IDIOMS)
@torch.no_grad()
def test_a_compiled_denoiser_steers_as_eager_without_recompiling(families, family, idiom):
    tiny, steerer, references = families(family)
    denoiser_class = type(tiny.components.get("unet") or tiny.components["transformer"])
    if idiom == "regional" and not getattr(denoiser_class, "_repeated_blocks", None):
        with compiled_pipeline(tiny, steerer, "in-place") as pipe, pytest.raises(ValueError, match="_repeated_blocks"):
            pipe.denoiser.compile_repeated_blocks()  # diffusers refuses it itself, before any image
        return
    with compiled_pipeline(tiny, steerer, idiom) as pipe:
        called = pipe._denoiser_as_called()
        assert compiled_kind(called) == idiom
        # names, architectures and presets are looked up through torch.compile's wrapper
        assert architecture_of(called).denoiser_class == type(pipe.denoiser).__name__
        assert hook_points(called, "cross-attention") == hook_points(pipe.denoiser, "cross-attention")
        close = dict(atol=1e-4, rtol=0)
        # warm-up: the first unsteered call, the first steered call of each gating mode
        np.testing.assert_allclose(_run(pipe, tiny, steering_strength=0.0), references[0.0, "dsas"], **close)
        for gate in ("dsas", "none"):
            out = _run(pipe, tiny, steering_strength=1.0, steering_gate=gate)
            np.testing.assert_allclose(out, references[1.0, gate], **close)
        assert np.abs(out - references[0.0, "dsas"]).max() > 10 * close["atol"]  # the steering is visible
        warm = _graphs()
        for strength, gate in (
            (2.0, "dsas"),
            (0.0, "dsas"),
            (2.0, "none"),
            (1.0, "dsas"),
            (0.0, "none"),
            (2.0, "dsas"),
        ):
            out = _run(pipe, tiny, steering_strength=strength, steering_gate=gate)
            np.testing.assert_allclose(out, references[strength, gate], **close)
        assert _graphs() == warm, "a new strength or an unsteered call recompiled"
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        # gate maps and step windows run eagerly with per-call hooks: the eager images, no graph
        out = pipe(
            PROMPTS,
            generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))],
            output_type="latent",
            steering_strength=1.0,
            return_gate_maps=True,
            **{**tiny.call_kwargs, "num_inference_steps": 2},
        )
        np.testing.assert_allclose(out.images.numpy(), references[1.0, "dsas"], **close)
        assert out.gate_maps["default"]
        np.testing.assert_allclose(
            _run(pipe, tiny, steering_strength=2.0, steering_steps=(0.0, 0.5)), references["window"], **close
        )
        np.testing.assert_allclose(_run(pipe, tiny, steering_strength=1.0), references[1.0, "dsas"], **close)
        assert _graphs() == warm


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])  # a UNet, joint attention, single-stream blocks
@torch.no_grad()
def test_one_strength_per_prompt_steers_a_compiled_denoiser_as_eager_without_recompiling(families, family):
    tiny, steerer, references = families(family)
    with compiled_pipeline(tiny, steerer, "in-place") as pipe:
        _run(pipe, tiny, steering_strength=[0.0, 2.0])  # warm-up: the graph with one λ per row
        warm = _graphs()
        for mix in ([2.0, 1.0], [1.0, 0.0], [0.0, 2.0]):
            out = _run(pipe, tiny, steering_strength=mix)
            for row, strength in enumerate(mix):  # each prompt: its row of the batch steered at its λ
                np.testing.assert_allclose(out[row], references[strength, "dsas"][row], atol=1e-4, rtol=0)
        assert _graphs() == warm, "a new mix of strengths recompiled"
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@torch.no_grad()
def test_compiled_steering_follows_loading_and_unloading_and_refuses_non_finite_steerers(families, tmp_path):
    tiny, steerer, references = families("sd")
    steerer.save_pretrained(tmp_path / "broken")
    broken = Steerer.from_pretrained(tmp_path / "broken")
    broken.layers[0].map.bias.data[0] = float("nan")
    close = dict(atol=1e-4, rtol=0)
    with compiled_pipeline(tiny, steerer, "in-place") as pipe:
        np.testing.assert_allclose(_run(pipe, tiny, steering_strength=1.0), references[1.0, "dsas"], **close)
        pipe.load_steering(broken, name="broken")  # attached again at the next call, which refuses it
        with pytest.raises(ActivationError, match=r"broken:.*hold NaN or infinite values"):
            _run(pipe, tiny, steering_strength={"broken": 0.0, "default": 1.0})
        pipe.unload_steering("broken")
        np.testing.assert_allclose(_run(pipe, tiny, steering_strength=2.0), references[2.0, "dsas"], **close)
        pipe.load_steering(steerer, name="again")  # two steerers: each at its own strength, in one graph
        np.testing.assert_allclose(_run(pipe, tiny, steering_strength={"default": 1.0, "again": 0.0}),
                                   references[1.0, "dsas"], **close)  # fmt: skip
        warm = _graphs()
        np.testing.assert_allclose(_run(pipe, tiny, steering_strength={"default": 0.0, "again": 2.0}),
                                   references[2.0, "dsas"], **close)  # fmt: skip
        assert _graphs() == warm
        pipe.unload_steering()
        assert not active_hook_names(pipe.denoiser)  # nothing left attached on the compiled denoiser
        np.testing.assert_allclose(_run(pipe, tiny), references[0.0, "dsas"], **close)


def test_fitting_on_a_compiled_denoiser_gives_the_eager_steerer(families):
    """Fitting records activations through per-call hooks: on a compiled denoiser it runs
    eagerly and gives exactly the steerer an uncompiled pipeline fits."""
    tiny, steerer, _ = families("sd")
    settings = dict(
        num_inference_steps=2,
        collect_steps=(0,),
        batch_size=3,
        n_components=4,
        gate_threshold=None,
        progress=False,
        pipeline_kwargs={"height": 32, "width": 32},
    )
    eager = tiny.dsas().fit_steering(SOURCE[:3], TARGET[:3], CONTROL[:3], **settings)
    with compiled_pipeline(tiny, steerer, "in-place") as pipe:
        fitted = pipe.fit_steering(SOURCE[:3], TARGET[:3], CONTROL[:3], name="again", **settings)
        for name, tensor in eager.state_dict().items():
            assert torch.equal(fitted.state_dict()[name], tensor), name
        assert _graphs() == 0  # nothing was compiled while fitting


@torch.no_grad()
def test_gates_reading_the_attention_input_steer_a_compiled_denoiser_as_eager(families):
    """The hooks of gates reading the module's input (here passed as hidden_states= by SD3's joint
    blocks; test_gate_reads.py compiles a positional one), with sample gates, are traced without
    graph breaks and recompiles."""
    tiny, _, _ = families("sd3")
    pipe, steerer = fit_reading_input(tiny, window=None)  # a step window would run the calls eagerly
    low, high = 4.0, 16.0  # the sample gates, calibrated on random weights, open little
    references = {strength: _run(pipe, tiny, steering_strength=strength) for strength in (low, high)}
    close = dict(atol=1e-4, rtol=0)
    with compiled_pipeline(tiny, steerer, "in-place") as compiled:
        np.testing.assert_allclose(_run(compiled, tiny, steering_strength=low), references[low], **close)
        warm = _graphs()
        np.testing.assert_allclose(_run(compiled, tiny, steering_strength=high), references[high], **close)
        assert _graphs() == warm and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert np.abs(references[high] - references[low]).max() > 10 * close["atol"]


@torch.no_grad()
def test_a_per_image_decision_on_a_compiled_denoiser_decides_and_steers_as_eager(families):
    """A decided steering observes the steps before its window and then steers only the images
    it decides: on a compiled denoiser those calls run eagerly and give the eager latents, at the
    calibrated threshold, with every image decided and with none (the tiny UNet: on the tiny
    transformers a step steered at random weights moves the latents by less than the tolerance)."""
    tiny, _, _ = families("sd")
    pipe, steerer = fit_reading_input(tiny, sample_decision="stacked", decision_inference_steps=2)
    decision, close = steerer.config["decision"], dict(atol=1e-4, rtol=0)
    thresholds = {"calibrated": decision["threshold"], "every image": -1e9, "none": 1e9}
    references = {}
    for name, threshold in thresholds.items():
        decision["threshold"] = threshold
        references[name] = _run(pipe, tiny, steering_strength=16.0)
    np.testing.assert_array_equal(references["none"], _run(pipe, tiny))
    assert np.abs(references["every image"] - references["none"]).max() > 10 * close["atol"]
    with compiled_pipeline(tiny, steerer, "in-place") as compiled:
        np.testing.assert_allclose(_run(compiled, tiny), references["none"], **close)  # the traced unsteered call
        for name, threshold in thresholds.items():
            decision["threshold"] = threshold  # the loaded steerer is this object
            np.testing.assert_allclose(_run(compiled, tiny, steering_strength=16.0), references[name], **close)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
