"""Steering beside LoRA weights loaded with diffusers' ``load_lora_weights`` (peft): both act,
either can be removed without the other, and a steerer accepts the LoRA-wrapped modules as
the modules it was fitted on."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_pipelines import build, fit

from dsas_diffusion.steering import active_hook_names
from dsas_diffusion.steering.layer import module_signature

peft = pytest.importorskip("peft")

PROMPTS = ["a purple banana on a gray background", "a blue star on a white background"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


def _lora_file(tiny, denoiser, directory):
    """A LoRA as a trainer writes it: a peft adapter with non-zero weights on a copy of the
    denoiser, saved with the pipeline class's ``save_lora_weights``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(denoiser)
    torch.manual_seed(1)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    key = "unet_lora_layers" if hasattr(tiny.components.get("unet"), "config") else "transformer_lora_layers"
    tiny.stock_class.save_lora_weights(directory, **{key: get_peft_model_state_dict(donor)})
    return directory


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_lora_and_steering_both_act_and_unload_independently(family, tokenizer_dir, tmp_path):
    tiny = build(family, tokenizer_dir)
    pipe, steerer = fit(tiny)  # fitted on the model without the LoRA

    def run(strength=None, **kwargs):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        steering = {} if strength is None else {"steering_strength": strength, "steering_gate": "none"}
        arguments = {**tiny.call_kwargs, **steering, **kwargs}
        return pipe(PROMPTS, generator=generators, output_type="np", **arguments)

    plain, steered = run(0.0).images, run(1.0).images
    attention = next(n for n, m in pipe.denoiser.named_modules() if n.endswith(("attn2", "attn")))
    before = module_signature(pipe.denoiser.get_submodule(attention))

    pipe.load_lora_weights(_lora_file(tiny, pipe.denoiser, tmp_path / "lora"), adapter_name="style")
    wrapped = pipe.denoiser.get_submodule(attention)
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())  # the LoRA is in place
    assert module_signature(wrapped) == before  # and the module is the one the steering was fitted on
    pipe.load_steering(steerer)  # its compatibility check passes with the LoRA loaded
    lora, both = run(0.0).images, run(1.0).images
    assert not np.array_equal(lora, plain)  # the LoRA acts
    assert not np.array_equal(both, lora) and not np.array_equal(both, steered)  # steering acts on top
    gated = run(1.0, steering_gate="dsas", return_gate_maps=True)
    assert set(gated.gate_maps["default"]) == set(steerer.module_names)
    assert active_hook_names(pipe.denoiser) == []

    pipe.unload_steering()
    np.testing.assert_array_equal(run().images, lora)  # the LoRA stays without the steering
    pipe.load_steering(steerer)
    pipe.unload_lora_weights()
    # the steering stays without the LoRA; peft's unloading gives the weights back in another memory
    # layout, which some kernels (torch's portable ones) round otherwise: within rounding, far below
    # what the LoRA changed
    assert np.abs(both - steered).max() > 1e-3
    np.testing.assert_allclose(run(1.0).images, steered, rtol=0, atol=1e-5)
    np.testing.assert_allclose(run(0.0).images, plain, rtol=0, atol=1e-5)


def test_a_lora_wrapped_linear_has_the_signature_of_the_linear_it_wraps():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))
    plain = module_signature(model.to_q)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model)
    assert type(model.to_q) is not torch.nn.Linear and module_signature(model.to_q) == plain
    assert module_signature(model) == module_signature(torch.nn.Sequential(torch.nn.Linear(8, 8)))
