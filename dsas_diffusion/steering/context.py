"""What a gate with ``reads="context"`` reads: at each token, the mean of the attention values
of the tokens it attends to, taken from the KV cache its layer was called with.

A decoder layer (or its attention module) of a transformers causal language model is called
with the cache and the attention mask; after the call the cache holds the values of every
token so far, the current ones included. The mean that the mask allows each query token is a
causal summary of its prefix that needs no state of its own: prefill, each decoding step,
beam reordering, static and dynamic caches and left padding all see the same numbers as one
teacher-forced pass over the finished text. A call without a cache (``use_cache=False``) is
given a fresh one for the duration of the layer's call (:meth:`ContextReader.provide_cache`),
which the layer fills with the values it computes anyway.

Examples:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    >>> reader = ContextReader(model.model.layers[1], "model.layers.1")
    >>> read = []
    >>> handle = model.model.layers[1].register_forward_hook(
    ...     lambda module, args, kwargs, output: read.append(reader(args, kwargs, output.shape[1])), with_kwargs=True)
    >>> _ = model(torch.tensor([[1, 2, 3]]))
    >>> handle.remove()
    >>> read[0].shape                                   # (batch, tokens, key-value heads x head width)
    torch.Size([1, 3, 16])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ActivationError, SteeringError

__all__ = ["ContextReader", "visible_tokens"]

#: the names transformers gives the cache argument of decoder layers and attention modules
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _slot(parameters: list[inspect.Parameter], names: tuple[str, ...]) -> tuple[int | None, str] | None:
    """The position (``None`` for keyword-only) and name of the first parameter named in ``names``."""
    for name in names:
        for index, parameter in enumerate(parameters):
            if parameter.name == name:
                positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                return (index if positional else None), name
    return None


def _layer_index(module: nn.Module, where: str) -> int:
    """The cache layer of ``module``: its own ``layer_idx``, or its attention's."""
    found = {value for m in module.modules() if isinstance(value := getattr(m, "layer_idx", None), int)}
    if len(found) != 1:
        raise SteeringError(
            f"module {where!r} ({type(module).__name__}) holds {len(found)} attention layers with a cache index "
            f"({sorted(found)}); a gate reading the context reads one layer's cached values: hook the decoder "
            "layers (preset='residual') or their attention (preset='attention'), or fit with gate_reads='output'"
        )
    return found.pop()


def visible_tokens(mask: Any, batch: int, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``(batch, queries, keys)`` float: 1 where a query token attends to a key token, from the
    mask a transformers layer is called with: ``None`` (causal, the queries being the last
    ``queries`` keys), a 4-D mask (boolean, or additive with 0 where allowed) or a 2-D padding
    mask of the keys (flash attention's), combined with causality.

    Examples:
        >>> visible_tokens(None, 1, 2, 3, torch.device("cpu"))
        tensor([[[1., 1., 0.],
                 [1., 1., 1.]]])
    """

    def causal() -> torch.Tensor:  # (made only where a mask does not already say it)
        return torch.ones(queries, keys, device=device, dtype=torch.bool).tril(keys - queries)

    if mask is None:
        return causal().float().expand(batch, queries, keys)
    if not torch.is_tensor(mask):
        raise ActivationError(
            f"this layer was called with an attention mask of type {type(mask).__name__}, which a gate reading the "
            "context cannot read; load the model with attn_implementation='sdpa' or 'eager'"
        )
    if mask.ndim == 2:
        allowed = mask.bool()[:, None, :] & causal()
    elif mask.ndim == 4:
        allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    else:
        raise ActivationError(f"attention mask of shape {tuple(mask.shape)}: expected (batch, keys) or 4-D")
    if allowed.shape[-2:] != (queries, keys):
        raise SteeringError(
            f"the attention mask covers {tuple(allowed.shape[-2:])} (queries, keys) but the cache holds {keys} "
            f"values for {queries} queries: this layer's cache does not keep every token it attends to (a "
            "sliding window shorter than the text, or a quantized or offloaded cache); a gate reading the context "
            "needs full-attention layers and a DynamicCache or StaticCache"
        )
    return allowed.to(device=device, dtype=torch.float32).expand(batch, queries, keys)


class ContextReader:
    """Reads, per call of ``module`` (a decoder layer or an attention module), the mean of the
    cached attention values each token attends to: ``(batch, tokens, kv_heads x head_dim)``,
    float32. Made once per module (it reads the signature of ``module.forward``)."""

    def __init__(self, module: nn.Module, where: str) -> None:
        self.where = where
        self.layer = _layer_index(module, where)
        parameters = [p for name, p in inspect.signature(module.forward).parameters.items() if name != "self"]
        cache, mask = _slot(parameters, _CACHE_ARGUMENTS), _slot(parameters, ("attention_mask",))
        if cache is None or mask is None:
            raise SteeringError(
                f"module {where!r} ({type(module).__name__}) is not called with the KV cache and the attention mask, "
                "so a gate there cannot read the context; hook the decoder layers (preset='residual') or their "
                "attention (preset='attention'), or fit with gate_reads='output'"
            )
        self._cache, self._mask = cache, mask

    @staticmethod
    def _argument(slot: tuple[int | None, str], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        index, name = slot
        if index is not None and index < len(args):
            return args[index]
        if name == "cache" and "cache" not in kwargs:
            return kwargs.get("past_key_values")
        return kwargs.get(name)

    def provide_cache(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A forward pre-hook (``with_kwargs=True``): a call without a cache gets an empty
        ``DynamicCache`` of its own, so that its values can be read after the call."""
        if self._argument(self._cache, args, kwargs) is not None:
            return None
        from transformers import DynamicCache

        index, name = self._cache
        if index is not None and index < len(args):
            return (*args[:index], DynamicCache(), *args[index + 1 :]), kwargs
        return args, {**kwargs, name: DynamicCache()}

    def register(self, module: nn.Module) -> Any:
        """Register :meth:`provide_cache` on ``module``; returns the handle."""
        return module.register_forward_pre_hook(self.provide_cache, with_kwargs=True)

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], tokens: int) -> torch.Tensor:
        cache = self._argument(self._cache, args, kwargs)
        if cache is None:
            raise SteeringError(
                f"module {self.where!r} was called without a KV cache: register ContextReader.provide_cache as its "
                "forward pre-hook"
            )
        layers = getattr(cache, "layers", None)
        values = (
            getattr(layers[self.layer], "values", None) if layers is not None and self.layer < len(layers) else None
        )
        if not torch.is_tensor(values) or values.ndim != 4:
            raise SteeringError(
                f"the {type(cache).__name__} passed to {self.where!r} holds no value tensor for layer {self.layer}; a "
                "gate reading the context needs a DynamicCache or StaticCache"
            )
        batch, heads, keys, width = values.shape
        mask = self._argument(self._mask, args, kwargs)
        if mask is None and tokens == 1:  # one decoding step without padding: it attends to every cached token
            values = values if values.dtype == torch.float32 else values.float()
            return values.mean(dim=2).view(batch, 1, heads * width)
        weights = visible_tokens(mask, batch, tokens, keys, values.device)
        counts = weights.sum(-1, keepdim=True).clamp_(min=1.0)
        summed = torch.matmul(weights.unsqueeze(1), values.float())  # (B, H, tokens, width)
        return (summed.transpose(1, 2).reshape(batch, tokens, heads * width)) / counts
