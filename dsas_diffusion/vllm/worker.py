"""The steerings of one vLLM worker: the hooks on its model and, per forward, one λ per token."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..steering import ActivationError, Steerer, SteeringError
from ..steering.parts import LayerSteering
from ..steering.plan import gating
from .context import ContextSums
from .requests import request_strength

__all__ = ["WorkerSteering", "check_steerer", "load_in_worker"]

#: where a runner, an engine and an input processor keep their steerings
ATTRIBUTE = "_dsas_steering"


class WorkerSteering:
    """The steerings of one vLLM worker: hooks on its model, and per forward one λ per token."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.model: nn.Module = runner.get_model()
        self.steerers: dict[str, Steerer] = {}
        #: per steering, each hooked layer's steering part (the core's formula on the model's device)
        self.parts: dict[str, list[LayerSteering]] = {}
        self.handles: list[Any] = []
        #: per steering, one λ per scheduled token of the forward about to run (None: not steered)
        self.token_strengths: dict[str, torch.Tensor] | None = None
        self.context = ContextSums()
        #: the steerings whose gates read the context
        self.reading_context: set[str] = set()
        self._prepare = runner._prepare_inputs
        runner._prepare_inputs = self._prepare_inputs
        self.handles.append(self.model.register_forward_hook(self._forward_done))

    def load(self, name: str, steerer: Steerer) -> None:
        """Hook ``steerer`` under ``name``."""
        check_steerer(steerer, name, self.runner.model_config.get_hidden_size())
        modules = dict(self.model.named_modules())
        missing = [layer.name for layer in steerer.layers if layer.name not in modules]
        if missing:
            raise SteeringError(f"steering {name!r} hooks {missing}, which this vLLM model does not have")
        if name in self.steerers:
            raise SteeringError(f"a steering named {name!r} is already loaded in this engine")
        # the decoder layer whose context each gate reading the context reads
        sources = {
            layer.name: layer.gate.source or layer.name
            for layer in steerer.layers
            if layer.gate is not None and layer.gate.reads == "context"
        }
        if sources and self.runner.speculative_config is not None:
            raise SteeringError(
                f"steering {name!r} has gates reading the context, which a draft's rejected tokens would enter; "
                "serve it without speculative decoding"
            )
        for layer in steerer.layers:
            source = sources.get(layer.name)
            if source is None:
                continue
            if source not in modules:
                raise SteeringError(
                    f"a gate of {layer.name!r} reads the context of {source!r}, which this model does not have"
                )
            max_len = self.runner.model_config.max_model_len
            handle = self.context.add_source(source, modules[source], layer.gate.width, max_len)
            if handle is not None:
                self.handles.append(handle)
        device = next(self.model.parameters()).device
        self.steerers[name] = steerer
        if sources:
            self.reading_context.add(name)
        self.parts[name] = [LayerSteering(layer) for layer in steerer.layers]
        gated = gating(steerer, None)  # through the gates where it has them, as a request cannot choose
        for layer, part in zip(steerer.layers, self.parts[name], strict=True):
            if gated and not layer.gate.enabled:
                continue  # deselected by its gate accuracy, as DSASLanguageModel leaves it
            part.prepare(device)
            hook = functools.partial(self._steer, name, part, gated, sources.get(layer.name))
            self.handles.append(modules[layer.name].register_forward_hook(hook))

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        """The runner's own preparation, then one λ per scheduled token for each steering."""
        out = self._prepare(scheduler_output, *args, **kwargs)
        runner = self.runner
        total = int(scheduler_output.total_num_scheduled_tokens)
        requests = runner.input_batch.req_ids[: runner.input_batch.num_reqs]
        indices = runner.req_indices.np[:total].copy()
        rows = torch.from_numpy(indices)
        strengths, reading = {}, set()
        for name in self.steerers:
            per_request = [request_strength(runner.requests[r].sampling_params.extra_args, name) for r in requests]
            if any(value != 0.0 for value in per_request):
                strengths[name] = torch.tensor(per_request, dtype=torch.float32)[rows]
                if name in self.reading_context:
                    reading.update(r for r, value in zip(requests, per_request, strict=True) if value != 0.0)
        self.context.prepare(runner, scheduler_output, indices, reading)
        self.token_strengths = strengths or None
        return out

    def _forward_done(self, module: nn.Module, args: Any, output: Any) -> None:
        self.token_strengths = None  # warm-up and profiling forwards that follow are not steered
        self.context.done()

    def _steer(
        self,
        name: str,
        part: LayerSteering,
        gated: bool,
        source: str | None,
        module: nn.Module,
        args: Any,
        output: Any,
    ) -> Any:
        strengths = None if self.token_strengths is None else self.token_strengths.get(name)
        if strengths is None:
            return None
        if torch.is_tensor(output):  # GPT-2's blocks: the residual stream itself
            stream, residual = output, None
        elif isinstance(output, tuple) and len(output) == 2:
            hidden, residual = output
            stream = hidden if residual is None else hidden + residual  # the decoder layer's output in transformers
        else:
            raise ActivationError(
                f"{type(module).__name__} returned {type(output).__name__}, neither the residual stream nor vLLM's "
                "(hidden, residual) pair: hook vLLM's decoder layers"
            )
        rows = stream.shape[0]
        if strengths.shape[0] != rows or strengths.device != stream.device:  # once per forward and steering
            if rows < strengths.shape[0]:
                raise ActivationError(
                    f"vLLM's forward has {rows} token rows but {strengths.shape[0]} tokens were scheduled: this vLLM "
                    "version lays out its batches in a way dsas_diffusion.vllm does not know"
                )
            padded = torch.zeros(rows, dtype=torch.float32)  # padding rows: λ 0
            padded[: strengths.shape[0]] = strengths.cpu()
            strengths = self.token_strengths[name] = padded.to(stream.device)
        context = None if source is None or not gated else self.context.read[source]
        steered, _ = part.on(stream.device)(stream, strengths, gated, context, return_gates=False)
        return steered if torch.is_tensor(output) else (steered, torch.zeros_like(steered))

    def remove(self) -> None:
        """Remove every hook and give the runner its own input preparation back."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.runner._prepare_inputs = self._prepare


def check_steerer(steerer: Steerer, name: str, hidden: int) -> None:
    """:class:`SteeringError` unless this version can steer a vLLM model of width ``hidden``
    with ``steerer``: gates reading the output or the context (or none), each token on its
    own (no sample gates), every layer of that width."""
    gates = {layer.gate_reads for layer in steerer.layers if layer.gate is not None}
    if gates - {"output", "context"}:
        raise SteeringError(
            f"steering {name!r} has gates reading the {sorted(gates - {'output', 'context'})} of their layers; in "
            "vLLM gates read the output or the context (gate_reads='output' or 'context', e.g. FitConfig.for_text())"
        )
    if steerer.decision_threshold is not None or any(layer.sample_gate is not None for layer in steerer.layers):
        raise SteeringError(
            f"steering {name!r} decides per sample (sample gates), which vLLM's batches of tokens from requests at "
            "different steps cannot pool: fit it with gates per token (FitConfig(sample_gate=False), the default)"
        )
    wrong = [layer.name for layer in steerer.layers if layer.width != hidden]
    if wrong:
        raise SteeringError(f"steering {name!r} was made for {wrong} of another width than this model's {hidden}")


def load_in_worker(worker: Any, path: str, name: str) -> list[str]:
    """Run in each worker by :func:`load_steering`: load and hook the steering."""
    runner = worker.model_runner
    state = getattr(runner, ATTRIBUTE, None)
    if state is None:
        state = WorkerSteering(runner)
        setattr(runner, ATTRIBUTE, state)
    steerer = Steerer.from_pretrained(path)
    state.load(name, steerer)
    return [layer.name for layer in steerer.layers]
