"""Tiny causal language models of every family with a text preset, built from configs (random
weights, nothing downloaded), and a word-level tokenizer over the Shapes words."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3")
WORDS = (
    "a an the and on of is next to lies with red green blue yellow purple orange white black gray "
    "banana circle square star triangle diamond background picture small large dirty broken ugly clean "
    "shiny left right top bottom there one two three"
).split()
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build(family: str, seed: int = 0, *, hidden: int = 32, heads: int = 4, kv_heads: int = 2):
    """``(model, tokenizer)`` of ``family``: 2 layers, ``hidden`` wide, ``heads`` attention heads
    of ``hidden / heads`` features (``kv_heads`` of them for keys and values, except GPT-2)."""
    vocab = len(SPECIAL) + len(WORDS)
    common = {"vocab_size": vocab, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, **common)  # fmt: skip
    head = hidden // heads
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=hidden, n_head=heads, **common),
        "llama": lambda: transformers.LlamaConfig(**llama_like),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like),
        "qwen3": lambda: transformers.Qwen3Config(**llama_like, head_dim=head),
        "gemma2": lambda: transformers.Gemma2Config(**llama_like, head_dim=head),
        "gemma3": lambda: transformers.Gemma3TextConfig(**llama_like, head_dim=head),
        "mistral": lambda: transformers.MistralConfig(**llama_like),
        "phi3": lambda: transformers.Phi3Config(**llama_like),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[family]()).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model, tokenizer()
