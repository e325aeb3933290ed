"""What gates reading the context read in a vLLM engine: one running sum per steered request and source layer."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
import torch
from torch import nn

from ..steering import ActivationError, SteeringError

__all__ = ["ContextSums"]


class ContextSums:
    """What gates reading the context read in vLLM: per token, the mean of the attention values
    of its request's tokens so far, its own included (:mod:`dsas_diffusion.steering.context`).

    vLLM keeps the values in its paged cache, in a layout of each attention backend's own; this
    reader keeps instead, per steered request and per source layer, the running sum of the
    values its attention was called with (one vector per request), read before the attention
    runs. A request is followed from its first token: a request vLLM restarts (preemption)
    starts again at 0; a request that arrives with tokens this worker did not compute is refused.
    """

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}  # source decoder layer -> its attention
        self.sums: dict[str, torch.Tensor] = {}  # source -> (slots, width) float32; slot 0 is scratch
        self.slots: dict[str, int] = {}  # request id -> its slot
        self.counts: dict[str, int] = {}  # request id -> the tokens its sums hold
        self.read: dict[str, torch.Tensor] = {}  # source -> this forward's contexts, one row per token
        #: this forward's slot and position + 1 of each token, the multi-token stretches of its
        #: requests, and whether a token of a request not steered uses the scratch slot
        self.layout: tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], bool] | None = None

    def add_source(self, source: str, module: nn.Module, width: int, max_len: int) -> Any | None:
        """Follow the context of the decoder layer ``source``; returns the hook to keep, or
        ``None`` when it is already followed."""
        from vllm.model_executor.layers.attention.attention import Attention

        if source in self.modules:
            return None
        found = [m for m in module.modules() if isinstance(m, Attention)]
        if len(found) != 1:
            raise SteeringError(
                f"a gate reads the context of {source!r}, which holds {len(found)} vLLM attention layers; a gate reading "
                "the context reads one decoder layer's"
            )
        attention = found[0]
        if attention.sliding_window is not None and attention.sliding_window < max_len:
            raise SteeringError(
                f"a gate reads the context of {source!r}, whose attention sees a window of {attention.sliding_window} "
                f"tokens, shorter than the engine's max_model_len {max_len}: a gate reading the context needs "
                f"full-attention layers, or max_model_len <= {attention.sliding_window}"
            )
        if attention.num_kv_heads * attention.head_size_v != width:
            raise SteeringError(
                f"a gate reads the context of {source!r} with {width} features, but its attention holds "
                f"{attention.num_kv_heads}x{attention.head_size_v} values per token: this steering was made for "
                "another model"
            )
        self.modules[source] = attention
        return attention.register_forward_pre_hook(functools.partial(self._values, source), with_kwargs=True)

    def prepare(self, runner: Any, scheduler_output: Any, rows: np.ndarray, steered: set[str]) -> None:
        """Before a forward: the slot and position of each scheduled token (``rows``: its
        request's row in the batch); ``steered``: the requests whose gates read the context."""
        for request in [r for r in self.slots if r not in runner.requests]:  # finished or aborted
            self._release(request)
        if not steered:
            self.layout = None
            return
        batch = runner.input_batch
        requests = batch.req_ids[: batch.num_reqs]
        starts = batch.num_computed_tokens_cpu[: batch.num_reqs].astype(np.int64)
        scheduled = np.array([scheduler_output.num_scheduled_tokens[r] for r in requests], dtype=np.int64)
        slots = np.zeros(len(requests), dtype=np.int64)
        for index, request in enumerate(requests):
            if request not in steered:
                continue
            start = int(starts[index])
            if start == 0:
                self._release(request)
            elif self.counts.get(request) != start:
                raise ActivationError(
                    f"request {request!r} arrives with {start} tokens computed that this worker did not read (a "
                    "prefix cache, a KV transfer, or a restart it did not see): a gate reading the context needs "
                    "every token of its request computed by this worker"
                )
            slots[index] = self._slot(request)
            self.counts[request] = start + int(scheduled[index])
        first = np.concatenate(([0], np.cumsum(scheduled)[:-1]))
        positions = starts[rows] + np.arange(len(rows)) - first[rows]
        segments = [(int(s), int(s + n)) for s, n in zip(first, scheduled, strict=True) if n > 1]
        token_slots = slots[rows]
        scratch = bool((token_slots == 0).any())
        self.layout = (torch.from_numpy(token_slots), torch.from_numpy(positions + 1.0).float(), segments, scratch)

    def _slot(self, request: str) -> int:
        slot = self.slots.get(request)
        if slot is None:
            taken = set(self.slots.values())
            slot = next(i for i in itertools.count(1) if i not in taken)
            self.slots[request] = slot
            for source, sums in self.sums.items():
                if slot >= sums.shape[0]:  # room for twice as many requests
                    self.sums[source] = torch.cat([sums, torch.zeros_like(sums)])
                self.sums[source][slot].zero_()
        return slot

    def _release(self, request: str) -> None:
        self.slots.pop(request, None)
        self.counts.pop(request, None)

    def _values(self, source: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The attention's forward pre-hook: this forward's contexts of ``source``, then the sums."""
        if self.layout is None:
            return
        slots, counts, segments, scratch = self.layout
        value = args[2] if len(args) > 2 else kwargs["value"]
        tokens = slots.shape[0]
        values = value[:tokens].reshape(tokens, -1).float()
        if slots.device != values.device:  # once per forward
            slots, counts = slots.to(values.device), counts.to(values.device)
            self.layout = (slots, counts, segments, scratch)
        sums = self.sums.get(source)
        if sums is None or sums.device != values.device:
            size = max(2 * len(self.slots), 8)
            sums = self.sums[source] = torch.zeros(size, values.shape[1], device=values.device)
        within = values.clone() if segments else values  # each token's sum over its request's tokens here, up to it
        for start, end in segments:
            torch.cumsum(values[start:end], dim=0, out=within[start:end])
        context = torch.index_select(sums, 0, slots).add_(within).div_(counts[:, None])
        sums.index_add_(0, slots, values)
        if scratch:  # (the slot of the tokens of requests not steered)
            sums[0].zero_()
        rows = value.shape[0]
        if rows > tokens:  # padding rows: a context of zeros
            context = torch.cat([context, context.new_zeros(rows - tokens, context.shape[1])])
        self.read[source] = context

    def done(self) -> None:
        self.layout = None
        self.read.clear()
