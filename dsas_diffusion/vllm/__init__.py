"""DSAS in a vLLM engine: steering files loaded into the model workers, steered per request.

:func:`load_steering` sends a steering directory to every worker of a ``vllm.LLM`` (through
``collective_rpc`` and the method this package's vLLM plugin, :func:`register`, gives the
workers) and hooks the same decoder layers ``DSASLanguageModel`` hooks, with the
core's maps and gates. Each request chooses its strength in its sampling parameters::

    SamplingParams(max_tokens=30, extra_args={"dsas": 16.0})            # every loaded steering
    SamplingParams(max_tokens=30, extra_args={"dsas": {"negative": 16.0}})  # by name

A request without ``"dsas"`` is not steered. vLLM runs the tokens of every scheduled request
in one flattened ``(tokens, hidden)`` batch; before each forward the worker's model runner
tells which request each token belongs to, so each token is steered at its own request's λ
(:mod:`dsas_diffusion.steering.strengths`: one λ per row), and a token at λ 0 is left as it is.

Most of vLLM's decoder layers return the residual stream split in two, ``(hidden, residual)``,
whose sum the next layer's fused add-and-norm takes; the hook steers that sum, the tensor
transformers' decoder layers return, and hands it on as ``(steered, 0)`` (GPT-2's blocks return
the stream itself). Gates reading the context (the language models' default,
``FitConfig.for_text()``) read, per token, the mean of its request's attention values so far,
which the worker keeps as one running sum per steered request and source layer
(:mod:`dsas_diffusion._vllm_context`).

Limits of this version: vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0`` where the V2 one
is the default); eager engines (``enforce_eager=True``); one worker (no tensor or pipeline
parallelism); prefix caching off for steered engines (a cached prefix was computed at another
request's λ); gates per token (no sample gates); no speculative decoding with gates reading the
context.

Examples:
    >>> from vllm import LLM, SamplingParams  # doctest: +SKIP
    >>> llm = LLM(model=path, enforce_eager=True, enable_prefix_caching=False)  # doctest: +SKIP
    >>> load_steering(llm, "steering-negative", name="negative")  # doctest: +SKIP
    >>> llm.generate(["You are such a"], SamplingParams(max_tokens=20, extra_args={"dsas": 16.0}))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._vllm_context import ContextSums
from .steering import ActivationError, Steerer, SteeringError
from .steering.prepared import PreparedLayer
from .steering.strengths import check_strengths

__all__ = [
    "ENVIRONMENT_KEY",
    "STRENGTH_KEY",
    "WorkerSteering",
    "check_request",
    "check_steerer",
    "load_steering",
    "register",
    "request_strength",
    "steering_from_environment",
]

#: the key of ``SamplingParams.extra_args`` that holds a request's strength
STRENGTH_KEY = "dsas"
#: the environment variable naming the steerings the workers load with their model (``vllm serve``)
ENVIRONMENT_KEY = "DSAS_VLLM_STEERING"

_ATTRIBUTE = "_dsas_steering"


def request_strength(extra_args: Mapping[str, Any] | None, name: str) -> float:
    """The λ a request asks of the steering ``name``: ``extra_args["dsas:<name>"]``, else
    ``extra_args["dsas"]``, one number for every loaded steering or ``{name: λ}``; absent: 0.
    (The OpenAI-compatible server's ``vllm_xargs`` holds numbers only: ``{"dsas:negative": 8}``.)

    Examples:
        >>> request_strength({"dsas": {"negative": 8}}, "negative"), request_strength(None, "negative")
        (8.0, 0.0)
        >>> request_strength({"dsas:negative": 8, "dsas": 2}, "negative"), request_strength({"dsas": 2}, "red")
        (8.0, 2.0)
    """
    extra_args = extra_args or {}
    asked = extra_args.get(f"{STRENGTH_KEY}:{name}", extra_args.get(STRENGTH_KEY))
    if asked is None:
        return 0.0
    value = asked.get(name, 0.0) if isinstance(asked, Mapping) else asked
    strength = check_strengths(value)
    if isinstance(strength, tuple):
        raise SteeringError(f"extra_args['{STRENGTH_KEY}'] gives one λ per request, got {value!r}")
    return strength


def check_request(extra_args: Mapping[str, Any] | None, names: set[str] | frozenset[str]) -> None:
    """:class:`SteeringError` unless the strengths a request asks for in ``extra_args`` are
    numbers this engine can steer with, for steerings it has loaded (``names``). vLLM's input
    processor runs it on each request as it arrives (:func:`register`), so a malformed request
    is refused alone (vLLM's ``VLLMValidationError``; HTTP 400 from the server) instead of
    failing the engine step.

    Examples:
        >>> check_request({"dsas": {"negative": 8}}, {"negative"})
        >>> check_request({"dsas:red": 8}, {"negative"})
        Traceback (most recent call last):
        ...
        dsas_diffusion.errors.SteeringError: this request asks for the steerings ['red'], which this engine has not loaded (it has ['negative'])
    """
    extra_args = extra_args or {}
    keys = [key for key in extra_args if key == STRENGTH_KEY or str(key).startswith(f"{STRENGTH_KEY}:")]
    if not keys:
        return
    if not names:
        raise SteeringError(
            f"this request asks for DSAS steering (extra_args {keys}) but this engine has none loaded: "
            f"load_steering(llm, directory, name), or {ENVIRONMENT_KEY}=name=directory for vllm serve"
        )
    asked = {str(key).partition(":")[2] for key in keys if key != STRENGTH_KEY}
    if isinstance(extra_args.get(STRENGTH_KEY), Mapping):
        asked |= {str(name) for name in extra_args[STRENGTH_KEY]}
    unknown = sorted(asked - set(names))
    if unknown:
        raise SteeringError(
            f"this request asks for the steerings {unknown}, which this engine has not loaded (it has {sorted(names)})"
        )
    for name in names:
        request_strength(extra_args, name)


class WorkerSteering:
    """The steerings of one vLLM worker: hooks on its model, and per forward one λ per token."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.model: nn.Module = runner.get_model()
        self.steerers: dict[str, Steerer] = {}
        self.prepared: dict[str, list[PreparedLayer]] = {}
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
        self.prepared[name] = [PreparedLayer(layer, device) for layer in steerer.layers]
        for layer, prepared in zip(steerer.layers, self.prepared[name], strict=True):
            if steerer.has_gates and not layer.gate.enabled:
                continue  # deselected by its gate accuracy, as DSASLanguageModel leaves it
            hook = functools.partial(self._steer, name, prepared, steerer.has_gates, sources.get(layer.name))
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
        prepared: PreparedLayer,
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
        steered, _ = prepared(stream, strengths, gated, context, return_gates=False)
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


def _load_in_worker(worker: Any, path: str, name: str) -> list[str]:
    """Run in each worker by :func:`load_steering`: load and hook the steering."""
    runner = worker.model_runner
    state = getattr(runner, _ATTRIBUTE, None)
    if state is None:
        state = WorkerSteering(runner)
        setattr(runner, _ATTRIBUTE, state)
    steerer = Steerer.from_pretrained(path)
    state.load(name, steerer)
    return [layer.name for layer in steerer.layers]


def steering_from_environment(value: str | None = None) -> dict[str, str]:
    """The steerings named by ``DSAS_VLLM_STEERING`` (or ``value``): ``name=directory`` pairs
    separated by commas, or one directory (name ``"default"``).

    Examples:
        >>> steering_from_environment("negative=/s/neg,red=/s/red"), steering_from_environment("/s/neg")
        ({'negative': '/s/neg', 'red': '/s/red'}, {'default': '/s/neg'})
    """
    value = os.environ.get(ENVIRONMENT_KEY, "") if value is None else value
    pairs = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, path = part.rpartition("=") if "=" in part else ("default", "", part)
        pairs[name.strip() or "default"] = path.strip()
    return pairs


def _check_engine(config: Any) -> None:
    """:class:`SteeringError` unless this version can steer an engine with ``config``."""
    if not config.model_config.enforce_eager:
        raise SteeringError("steering in vLLM needs an eager engine: LLM(..., enforce_eager=True), or --enforce-eager")
    if config.cache_config.enable_prefix_caching:
        raise SteeringError(
            "prefix caching would hand a prefix computed at one request's λ to another: LLM(..., "
            "enable_prefix_caching=False), or --no-enable-prefix-caching"
        )
    if getattr(config, "use_v2_model_runner", False):
        raise SteeringError(
            "steering in vLLM runs in vLLM's V1 model runner, and this engine uses the V2 one: start it with the "
            "environment variable VLLM_USE_V2_MODEL_RUNNER=0"
        )
    if config.parallel_config.world_size > 1:
        raise SteeringError("steering in vLLM supports one worker (tensor_parallel_size=pipeline_parallel_size=1)")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it in each of its processes): gives
    vLLM's workers the method ``dsas_load_steering``, so that :func:`load_steering` names it in
    ``collective_rpc`` instead of sending a function (which vLLM's transport refuses); has each
    worker load the steerings named by ``DSAS_VLLM_STEERING`` once its model is loaded (for
    ``vllm serve``); and has vLLM's input processor check each request's strengths as it
    arrives (:func:`check_request`)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_worker import Worker
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.dsas_load_steering = _load_in_worker
    if not getattr(InputProcessor._validate_params, "_dsas", False):
        validate = InputProcessor._validate_params

        @functools.wraps(validate)
        def validate_then_strengths(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
            result = validate(self, params, *args, **kwargs)
            extra_args = getattr(params, "extra_args", None)
            if extra_args:
                names = set(steering_from_environment()) | self.__dict__.get(_ATTRIBUTE, set())
                try:
                    check_request(extra_args, names)
                except SteeringError as error:  # (vLLM's server answers 400)
                    raise VLLMValidationError(str(error), parameter="extra_args") from error
            return result

        validate_then_strengths._dsas = True
        InputProcessor._validate_params = validate_then_strengths
    if getattr(Worker.load_model, "_dsas", False):
        return
    load_model = Worker.load_model

    @functools.wraps(load_model)
    def load_model_then_steering(self: Any, *args: Any, **kwargs: Any) -> None:
        load_model(self, *args, **kwargs)
        named = steering_from_environment()
        if named:
            _check_engine(self.vllm_config)
        for name, path in named.items():
            _load_in_worker(self, path, name)

    load_model_then_steering._dsas = True
    Worker.load_model = load_model_then_steering


def load_steering(llm: Any, path: str, name: str = "default") -> list[str]:
    """Load the steering directory ``path`` into every worker of ``llm`` (a ``vllm.LLM``)
    under ``name``; returns the hooked module names. Requests then steer with
    ``SamplingParams(extra_args={"dsas": λ})`` or ``{"dsas": {name: λ}}``."""
    config = llm.llm_engine.vllm_config
    _check_engine(config)
    loaded = llm.__dict__.setdefault(_ATTRIBUTE, set())
    if name in loaded:
        raise SteeringError(f"a steering named {name!r} is already loaded in this engine")
    check_steerer(Steerer.from_pretrained(path), name, config.model_config.get_hidden_size())  # before the workers
    try:
        names = llm.collective_rpc("dsas_load_steering", args=(str(path), name))
    except NotImplementedError as error:
        raise SteeringError(
            "vLLM's workers have no dsas_load_steering: install dsas-diffusion in the environment vLLM runs in, "
            "whose vllm.general_plugins entry point adds it"
        ) from error
    loaded.add(name)
    processor = getattr(llm.llm_engine, "input_processor", None)
    if processor is not None:  # what it checks requests against (register)
        processor.__dict__.setdefault(_ATTRIBUTE, set()).add(name)
    return names[0]
