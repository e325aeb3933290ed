"""The same core on real architectures built from configs (random weights, nothing downloaded):
a diffusers UNet steered per spatial position, a transformers GPT-2 steered per token."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from unet_toys import batches as demo_batches
from unet_toys import block_output, build_unet, make_latents

from dsas_diffusion.steering import HookPoint, Steerer, active_hook_names, fit_steerer


@pytest.fixture(scope="module")
def unet():
    return build_unet()  # the demo's small UNet2DConditionModel, random weights


def _latents(count: int, seed: int, blob: bool):
    """Noise latents; with ``blob`` a bright square on channel 0 at a random place (the concept)."""
    return make_latents(count, seed, concept=blob)


def _unet_batches(seed: int, blob: bool, batches: int = 8, size: int = 4):
    return demo_batches(seed, blob, count=batches, size=size)


def _resnet_gates_and_change(unet, steerer, latents):
    """Gate map and |change| of down_blocks.0.resnets.0 (the first hooked block; later hooks
    cannot change its output)."""
    plain, _ = block_output(unet, None, latents, gate="dsas")
    steered, gates = block_output(unet, steerer, latents, gate="dsas")
    return gates, (steered - plain).abs().mean(1)


def test_steerer_on_a_unet_gates_per_spatial_position(unet):
    hooks = [
        HookPoint("down_blocks.0.resnets.0"),  # 4-D (B, C, H, W) feature map
        HookPoint("down_blocks.0.attentions.0", output_index=0),  # Transformer2DModel: tuple output
        HookPoint("mid_block.attentions.0.transformer_blocks.0"),  # 3-D (B, HW, C) tokens
    ]
    sets = _unet_batches(1, True), _unet_batches(2, False), _unet_batches(3, False)
    steerer = fit_steerer(unet, hooks, *sets, map="caa", gate_calibration="control-positions", progress=False)
    layouts = [layer.hook_point.layout for layer in steerer.layers]
    assert layouts == ["channels_first", "channels_first", "channels_last"]
    assert steerer.layers[0].gate.accuracy >= 0.9

    latents, masks = _latents(2, 999, blob=True)
    # positions within 2 pixels of the concept see it through the 3x3 convolutions: leave them out
    near = torch.nn.functional.max_pool2d(masks.float().unsqueeze(1), 5, stride=1, padding=2)[:, 0].bool()
    gates, change = _resnet_gates_and_change(unet, steerer, latents)
    assert gates.shape == (2, 16, 16)
    assert float(gates[masks].mean()) > 0.7  # open on the concept's positions
    assert float(gates[~near].mean()) < 0.05  # nearly shut away from it
    assert float(change[masks].mean()) > 10 * float(change[~near].mean())
    assert active_hook_names(unet) == []

    # without calibration the pooled gate opens on many ordinary positions
    uncalibrated = fit_steerer(unet, hooks[:1], *sets, map="caa", progress=False)
    loose_gates, _ = _resnet_gates_and_change(unet, uncalibrated, latents)
    assert float(loose_gates[~near].mean()) > 4 * float(gates[~near].mean())


def test_unet_output_unchanged_at_strength_zero(unet):
    batches = _unet_batches(1, True, batches=2)
    steerer = fit_steerer(
        unet,
        ["down_blocks.1.resnets.0"],
        batches,
        _unet_batches(2, False, batches=2),
        _unet_batches(3, False, batches=2),
        map="caa",
        progress=False,
    )
    batch = batches[0]
    with torch.no_grad():
        reference = unet(**batch).sample
        with steerer.apply(unet, strength=0.0):
            assert torch.equal(unet(**batch).sample, reference)
        with steerer.apply(unet, strength=1.0, gate="none"):
            assert not torch.equal(unet(**batch).sample, reference)


CONCEPT_TOKENS = torch.arange(50, 54)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    # as in a trained model, the concept's tokens share a feature: a common embedding direction
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.transformer.wte.weight[CONCEPT_TOKENS] += 0.1 * direction / direction.norm()
    return model


def _token_batches(seed: int, concept: bool, batches: int = 8, size: int = 4, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, 40, (size, length), generator=generator)
        if concept:  # half of the tokens are concept tokens
            where = torch.rand(size, length, generator=generator) < 0.5
            ids[where] = CONCEPT_TOKENS[torch.randint(0, 4, (int(where.sum()),), generator=generator)]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_steerer_on_gpt2_gates_per_token(gpt2, tmp_path):
    hooks = ["transformer.h.0", "transformer.h.1"]
    steerer = fit_steerer(
        gpt2,
        hooks,
        _token_batches(1, True),
        _token_batches(2, False),
        _token_batches(3, False),
        map="linear-act",
        support_quantiles=None,
        gate_calibration="control-positions",
        provenance={"base_model": "tiny-gpt2-from-config"},
        progress=False,
    )
    assert all(layer.gate.accuracy >= 0.9 for layer in steerer.layers)
    steerer.save_pretrained(tmp_path)
    steerer = Steerer.from_pretrained(tmp_path)

    ids = torch.tensor([[3, 50, 7, 9, 51, 12, 52, 30, 2, 53, 5, 6]])
    is_concept = torch.isin(ids, CONCEPT_TOKENS)[0]
    block = gpt2.transformer.h[0]
    outputs = []
    with torch.no_grad():
        handle = block.register_forward_hook(lambda m, i, o: outputs.append(o))
        gpt2(ids)
        handle.remove()
        with steerer.apply(gpt2, record_gates=True) as session:
            handle = block.register_forward_hook(lambda m, i, o: outputs.append(o))  # after the steering hook
            gpt2(ids)
            handle.remove()
    gates = session.gate_maps["transformer.h.0"][0].float()[0]
    assert gates.shape == (12,)
    assert float(gates[is_concept].min()) > 0.5
    assert float(gates[~is_concept].max()) < 0.5
    # block 0's output: changed on concept tokens, barely elsewhere
    change = (outputs[1] - outputs[0]).norm(dim=-1)[0]
    assert float(change[is_concept].mean()) > 5 * float(change[~is_concept].mean())
    assert active_hook_names(gpt2) == []


def test_gpt2_padding_is_masked_when_collecting(gpt2):
    from dsas_diffusion.steering import collect_activations

    ids = torch.randint(1, 40, (2, 8))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 8), torch.zeros(2, 4)], dim=1).long()
    plain = collect_activations(gpt2, ["transformer.h.1"], [{"input_ids": ids}], progress=False)
    masked = collect_activations(
        gpt2, ["transformer.h.1"], [{"input_ids": padded, "attention_mask": mask}], progress=False
    )
    torch.testing.assert_close(masked.pooled["transformer.h.1"], plain.pooled["transformer.h.1"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("map_name", ["caa", "iti", "linear-act", "lineas"])
def test_every_map_with_dsas_spares_what_uniform_steering_hits(unet, map_name):
    """On the concept's positions DSAS keeps most of the uniform change; elsewhere in the same
    image and on concept-free inputs it removes nearly all of it."""
    from unet_toys import HOOKS

    from dsas_diffusion.steering import LinEASConfig

    steerer = fit_steerer(
        unet,
        HOOKS,
        demo_batches(1, True),
        demo_batches(2, False),
        demo_batches(3, False),
        map=map_name,
        incremental=map_name != "lineas",
        gate_calibration="control-positions",
        support_quantiles=None,
        lineas=LinEASConfig(steps=100, lr=1e-2, batch_size=8),
        progress=False,
    )
    concept, masks = make_latents(3, 999, True)
    plain, _ = make_latents(3, 998, False)
    base_concept, _ = block_output(unet, None, concept, "none")
    base_plain, _ = block_output(unet, None, plain, "none")
    change = {}
    for gate in ("none", "dsas"):
        steered_concept, _ = block_output(unet, steerer, concept, gate)
        steered_plain, _ = block_output(unet, steerer, plain, gate)
        diff = (steered_concept - base_concept).abs().mean(1)
        change[gate] = (
            float(diff[masks].mean()),
            float(diff[~masks].mean()),
            float((steered_plain - base_plain).abs().mean()),
        )
    uniform, gated = change["none"], change["dsas"]
    assert gated[0] > 0.5 * uniform[0]  # the concept's positions are still steered
    assert gated[1] < 0.1 * uniform[1]  # other positions of the same image barely
    assert gated[2] < 0.02 * uniform[2]  # concept-free inputs hardly at all
