"""DSAS in a vLLM engine on every language model family with a text preset (GPT-2, Llama,
Qwen2, Qwen3, Gemma 2, Gemma 3, Mistral, Phi-3): tiny random-weight models saved to folders,
a steering with gates reading the context fitted with ``DSASLanguageModel``, and vLLM's
log-probabilities of its greedy continuations, requests at different strengths in one batch,
equal to ``DSASLanguageModel``'s under the same steering.

Run by ``make test-vllm`` (see ``test_vllm.py``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

vllm = pytest.importorskip("vllm")

from lm_reference import log_probs  # noqa: E402
from test_text import CONTROL, SOURCE, TARGET  # noqa: E402
from tiny_lms import FAMILIES, build  # noqa: E402

from dsas_diffusion import DSASLanguageModel  # noqa: E402
from dsas_diffusion.vllm import load_steering  # noqa: E402

PROMPTS = ["a yellow banana", "the small red square lies on the left of a", "a red banana lies on a", "the blue star"]
STRENGTHS = [64.0, 0.0, 16.0, 64.0]
TOKENS = 8


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_steered_in_vllm_as_dsas_language_model_steers_it(family, tmp_path):
    model, tokenizer = build(family, hidden=64, heads=2, kv_heads=1)  # heads of 32 features: vLLM's CPU kernels
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lm = DSASLanguageModel(model, tokenizer)
    # (Linear-AcT everywhere: the edge of a support would turn a rounding difference into a jump)
    steerer = lm.fit_steering(SOURCE, TARGET, CONTROL, gate_threshold=None, batch_size=6, progress=False,
                              gate_reads="context", gate_fit_on="contrast", support_quantiles=None)  # fmt: skip
    steerer.save_pretrained(tmp_path / "steering")
    engine = vllm.LLM(model=str(tmp_path / "model"), dtype="float32", enforce_eager=True, max_model_len=64,
                      max_num_seqs=4, enable_prefix_caching=False, max_num_batched_tokens=8)  # fmt: skip
    try:
        hooked = load_steering(engine, str(tmp_path / "steering"))
        assert hooked == [layer.name for layer in steerer.layers]
        prompts = [tokenizer(p).input_ids for p in PROMPTS]
        params = [vllm.SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=0,
                                      extra_args={"dsas": s} if s else None) for s in STRENGTHS]  # fmt: skip
        outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    finally:
        del engine
        gc.collect()
    acted = 0
    for ids, strength, output in zip(prompts, STRENGTHS, outputs, strict=True):
        tokens = list(output.outputs[0].token_ids)
        served = torch.tensor(
            [step[token].logprob for step, token in zip(output.outputs[0].logprobs, tokens, strict=True)]
        )
        index = torch.tensor(tokens)[:, None]
        one_pass = log_probs(lm, ids + tokens, len(ids), strength, cached=False)
        chosen = one_pass.gather(1, index)[:, 0]
        cached = log_probs(lm, ids + tokens, len(ids), strength, cached=True).gather(1, index)[:, 0]
        # 1e-4, or where DSASLanguageModel's own two passes differ more, ten times their gap: random
        # weights and steep gates turn rounding (which also changes with how vLLM splits the batch)
        # into up to 1e-2 at some tokens
        tolerance = 1e-4 + 10 * (cached - chosen).abs()
        assert torch.all((served - chosen).abs() <= tolerance), (served - chosen).abs().max()
        assert torch.all(chosen >= one_pass.max(dim=1).values - tolerance)  # greedy, up to ties
        if strength:
            plain = log_probs(lm, ids + tokens, len(ids), 0.0, cached=False).gather(1, index)[:, 0]
            acted += bool((plain - chosen).abs().max() > 1e-2)
    assert acted >= 2  # the steering changes what the model predicts
