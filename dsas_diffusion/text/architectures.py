"""Where to hook each causal language model family, as data.

One :class:`TextArchitecture` per ``config.model_type`` names the decoder layers and, inside
each, the attention, the MLP and the normalisation layers in forward order. Presets:

* ``"residual"`` (default): every decoder layer's output, the residual stream.
* ``"attention"``: every self-attention's output (its element 0; the module returns
  ``(output, weights)``), before it is added to the residual stream.
* ``"mlp"``: every MLP's output, before it is added to the residual stream.
* ``"norms"``: the normalisation layers inside each decoder layer, in forward order. The same
  name means different things across families: Llama's ``post_attention_layernorm`` is the
  norm *before the MLP*, while Gemma 2/3's normalises *the attention output* (their pre-MLP
  norm is ``pre_feedforward_layernorm``, and ``post_feedforward_layernorm`` normalises the
  MLP output). The preset takes each family's own list.

Every hooked output is ``(batch, tokens, hidden)``; :func:`check_token_stream` refuses any
other at fit time. A model type not listed here gets the generic fallback: the unique
``ModuleList`` of decoder layers, residual preset only.

Examples:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> [p.module for p in hook_points(model)]
    ['model.layers.0', 'model.layers.1']
    >>> [p.module for p in hook_points(model, "norms", layers=[1])]
    ['model.layers.1.input_layernorm', 'model.layers.1.post_attention_layernorm']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..names import DEFAULT_TEXT_PRESET, TEXT_PRESETS
from ..steering import HookPoint, SteeringError
from ..steering.compiled import unwrap_compiled

__all__ = ["TEXT_ARCHITECTURES", "TEXT_PRESETS", "TextArchitecture", "check_token_stream", "hook_points"]


@dataclass(frozen=True)
class TextArchitecture:
    """The decoder layers (``layers``: the ``ModuleList``'s name) and, relative to a layer,
    its attention, MLP and norms (forward order)."""

    layers: str
    attention: str
    mlp: str
    norms: tuple[str, ...]


_LLAMA_LIKE = TextArchitecture("model.layers", "self_attn", "mlp", ("input_layernorm", "post_attention_layernorm"))
_GEMMA = TextArchitecture(
    "model.layers",
    "self_attn",
    "mlp",
    ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
)

#: ``config.model_type`` -> its architecture
TEXT_ARCHITECTURES: dict[str, TextArchitecture] = {
    "gpt2": TextArchitecture("transformer.h", "attn", "mlp", ("ln_1", "ln_2")),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}


def _decoder_layers(model: nn.Module) -> str:
    """The name of the unique ``ModuleList`` of identical blocks (the decoder layers)."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
        and sum(p.numel() for p in module.parameters()) > 0
    ]
    outer = [name for name in found if not any(name.startswith(other + ".") for other in found if other != name)]
    if len(outer) != 1:
        raise SteeringError(
            f"{type(model).__name__}: no preset for model type {getattr(model.config, 'model_type', '?')!r} and "
            f"{len(outer)} candidate decoder-layer lists ({outer}); name the modules with hook_points=[...]"
        )
    return outer[0]


def hook_points(
    model: nn.Module, preset: str = DEFAULT_TEXT_PRESET, layers: Sequence[int] | None = None
) -> list[HookPoint]:
    """The hook points of ``preset`` on ``model`` (in forward order), on the decoder layers
    numbered ``layers`` (default: all; negative numbers count from the end)."""
    if preset not in TEXT_PRESETS:
        raise SteeringError(f"unknown text preset {preset!r}; choose one of {TEXT_PRESETS} or pass hook_points=[...]")
    model = unwrap_compiled(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    architecture = TEXT_ARCHITECTURES.get(model_type)
    if architecture is None:
        if preset != "residual":
            raise SteeringError(
                f"model type {model_type!r} has no {preset!r} preset (only 'residual' through the generic decoder-layer "
                "list); name the modules with hook_points=[...]"
            )
        architecture = TextArchitecture(_decoder_layers(model), "", "", ())
    stack = model.get_submodule(architecture.layers)
    count = len(stack)
    chosen = range(count) if layers is None else [int(i) for i in layers]
    for index in chosen:
        if not -count <= index < count:
            raise SteeringError(f"layer {index} does not exist: {type(model).__name__} has {count} decoder layers")
    points = []
    for index in sorted({i % count for i in chosen}):
        base = f"{architecture.layers}.{index}"
        if preset == "residual":
            points.append(HookPoint(base, None, "channels_last"))
        elif preset == "attention":
            points.append(HookPoint(f"{base}.{architecture.attention}", 0, "channels_last"))
        elif preset == "mlp":
            points.append(HookPoint(f"{base}.{architecture.mlp}", None, "channels_last"))
        else:
            points += [HookPoint(f"{base}.{norm}", None, "channels_last") for norm in architecture.norms]
    return points


def check_token_stream(model: nn.Module, points: Sequence[HookPoint], batch: dict[str, torch.Tensor]) -> None:
    """Run ``batch`` once and refuse any hook point whose output is not the token stream
    ``(batch, tokens, hidden)`` (e.g. a per-head norm, a projection to another width)."""
    from ..steering.hookpoints import get_output, resolve_module
    from ..steering.hooks import HookHandles

    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    size = tuple(batch["input_ids"].shape)
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(point: HookPoint):
        def hook(module: nn.Module, args: object, output: object) -> None:
            tensor = get_output(output, point.output_index, point.module)
            shapes.setdefault(point.module, tuple(tensor.shape))

        return hook

    hooks = HookHandles().place((resolve_module(model, point.module), keep(point)) for point in points)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hooks.remove()
    for point in points:
        shape = shapes.get(point.module)
        if shape is None:
            raise SteeringError(f"module {point.module!r} did not run in a forward pass: it cannot be steered")
        if len(shape) != 3 or shape[:2] != size or (hidden is not None and shape[2] != hidden):
            raise SteeringError(
                f"module {point.module!r} outputs {shape}, not the token stream (batch, tokens, hidden) = "
                f"{(*size, hidden)}; steer decoder layers, attention, MLP or norm outputs instead"
            )
