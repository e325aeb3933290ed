"""Gates that read the context (``gate_reads="context"``): the mean of the cached attention
values each token attends to. Exact through ``generate`` on every language model family with a
preset: cached = uncached = static cache for greedy, sampled and beam-search decoding, a padded
batch gives each prompt what it gives alone, and generation-time gates equal a replay's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_rounding import assert_greedy_agrees
from test_text import CONTROL, GREEDY, PROMPTS, SOURCE, TARGET, assert_same_greedy, continuations
from tiny_lms import FAMILIES, build

from dsas_diffusion import DSASLanguageModel, FitConfig
from dsas_diffusion.steering import InputSetError, SteeringError
from dsas_diffusion.steering.context import ContextReader, visible_tokens
from dsas_diffusion.text import hook_points

CONTEXT = {"gate_reads": "context", "gate_fit_on": "contrast"}


def _generate(lm: DSASLanguageModel, prompts: list[str], seed: int | None = None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return lm.generate(prompts, steering_strength=4.0, **kwargs)


@pytest.mark.numerics
@pytest.mark.parametrize("family,context_layer", [(family, None) for family in FAMILIES] + [("qwen3", 0), ("gpt2", 0)])
def test_context_gates_are_exact_through_generate(family, context_layer, tmp_path):
    """Each gate on its own layer's context, or (``context_layer``) every gate on the first layer's."""
    model, tokenizer = build(family)
    lm = DSASLanguageModel(model, tokenizer)
    steerer = lm.fit_steering(SOURCE, TARGET, CONTROL, gate_threshold=None, batch_size=6, progress=False,
                              context_layer=context_layer, **CONTEXT)  # fmt: skip
    sources = {layer.gate.source for layer in steerer.layers}
    assert sources == ({None} if context_layer is None else {hook_points(model)[0].module})
    config = model.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = 32 if family == "gpt2" else config.num_key_value_heads * head  # the cached values of one token
    assert all(layer.gate.reads == "context" and layer.gate.width == width for layer in steerer.layers)
    stock = lm.generate(PROMPTS, steering_strength=0.0, **GREEDY).sequences
    modes = {
        "greedy": GREEDY,
        "sampled": {"max_new_tokens": 6, "do_sample": True},
        "beams": {"max_new_tokens": 4, "num_beams": 2},
    }
    for name, mode in modes.items():
        cached = _generate(lm, PROMPTS, seed=0, **mode)
        for other in ({"use_cache": False}, {"cache_implementation": "static"}):
            again = _generate(lm, PROMPTS, seed=0, **other, **mode)
            if name == "greedy":  # token for token, up to a tie that rounding decides
                assert_same_greedy(lm, cached, again, 4.0, "dsas")
            else:  # a draw or a beam flips only where rounding crosses a boundary: seen on no CPU so far
                assert torch.equal(again.sequences, cached.sequences), (name, other)
    steered = lm.generate(PROMPTS, steering_strength=64.0, **GREEDY).sequences
    assert not torch.equal(steered, stock)  # the gates open somewhere: steering acts
    batch = continuations(_generate(lm, PROMPTS, **GREEDY))
    for prompt, together in zip(PROMPTS, batch, strict=True):
        assert_greedy_agrees(lm, prompt, continuations(_generate(lm, [prompt], **GREEDY))[0], together, 4.0)
    out = lm.generate(PROMPTS, steering_strength=1.0, return_gate_maps=True, **GREEDY)
    mask = lm._sequence_mask(out.sequences, out.prompt_length, out.sequences[:, : out.prompt_length] != 0, 1)
    replay = lm._replay(out.sequences, mask, lm._plan(1.0, record_gates=True))
    for layer, gates in out.gate_maps["default"].items():
        np.testing.assert_allclose(gates.numpy(), replay["default"][layer].numpy(), atol=2e-3)
    steerer.save_pretrained(tmp_path)
    again = DSASLanguageModel(model, tokenizer)
    again.load_steering(tmp_path)
    assert {layer.gate.source for layer in again.steerers["default"].layers} == sources
    assert torch.equal(_generate(again, PROMPTS, **GREEDY).sequences, _generate(lm, PROMPTS, **GREEDY).sequences)


def test_the_context_is_the_mean_of_the_values_each_token_attends_to():
    model, tokenizer = build("llama")
    layer = model.model.layers[1]
    reader = ContextReader(layer, "model.layers.1")
    values, read = [], []
    handles = [
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, output: values.append(output)),
        layer.register_forward_hook(
            lambda m, a, k, output: read.append(reader(a, k, output.shape[1])), with_kwargs=True
        ),
    ]
    tokenizer.padding_side = "right"
    batch = tokenizer(["a red banana lies on the left", "a star"], return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    real = batch["attention_mask"].bool()
    for row in range(2):
        v = values[0][row][real[row]]
        expected = v.cumsum(0) / torch.arange(1, len(v) + 1).unsqueeze(-1)
        torch.testing.assert_close(read[0][row][real[row]], expected, rtol=1e-5, atol=1e-6)


def test_visible_tokens_reads_every_mask_transformers_passes():
    cpu = torch.device("cpu")
    causal = visible_tokens(None, 1, 3, 3, cpu)
    torch.testing.assert_close(causal[0], torch.ones(3, 3).tril())
    padding = torch.tensor([[0, 1, 1]])  # left padding, flash attention's (batch, keys) mask
    assert visible_tokens(padding, 1, 1, 3, cpu)[0].tolist() == [[0.0, 1.0, 1.0]]
    additive = torch.zeros(1, 1, 1, 3).masked_fill(torch.tensor([True, False, False]), torch.finfo(torch.float32).min)
    assert visible_tokens(additive, 2, 1, 3, cpu).tolist() == [[[0.0, 1.0, 1.0]]] * 2
    with pytest.raises(SteeringError, match="sliding window"):
        visible_tokens(torch.ones(1, 1, 2, 5, dtype=torch.bool), 1, 2, 4, cpu)


def test_context_gates_where_they_cannot_read_are_refused_with_the_fix():
    model, tokenizer = build("llama")
    lm = DSASLanguageModel(model, tokenizer)
    with pytest.raises(SteeringError, match="preset='residual'"):
        lm.fit_steering(SOURCE, TARGET, CONTROL, FitConfig.for_text(preset="mlp", **CONTEXT), progress=False)
    steerer = lm.fit_steering(
        SOURCE, TARGET, CONTROL, preset="attention", gate_threshold=None, progress=False, **CONTEXT
    )
    assert [layer.name for layer in steerer.layers] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with pytest.raises(InputSetError, match="runs after"):  # a gate would read the previous call's context
        lm.fit_steering(SOURCE, TARGET, CONTROL, context_layer=-1, progress=False, **CONTEXT)
    with pytest.raises(SteeringError, match="with gate_reads='context'"):
        FitConfig(context_layer=0)
