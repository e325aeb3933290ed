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
(:mod:`dsas_diffusion.vllm.context`).

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
from typing import Any

from ..steering import Steerer, SteeringError
from .requests import ENVIRONMENT_KEY, STRENGTH_KEY, check_request, request_strength, steering_from_environment
from .worker import ATTRIBUTE, WorkerSteering, check_steerer, load_in_worker

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

    WorkerBase.dsas_load_steering = load_in_worker
    if not getattr(InputProcessor._validate_params, "_dsas", False):
        validate = InputProcessor._validate_params

        @functools.wraps(validate)
        def validate_then_strengths(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
            result = validate(self, params, *args, **kwargs)
            extra_args = getattr(params, "extra_args", None)
            if extra_args:
                names = set(steering_from_environment()) | self.__dict__.get(ATTRIBUTE, set())
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
            load_in_worker(self, path, name)

    load_model_then_steering._dsas = True
    Worker.load_model = load_model_then_steering


def load_steering(llm: Any, path: str, name: str = "default") -> list[str]:
    """Load the steering directory ``path`` into every worker of ``llm`` (a ``vllm.LLM``)
    under ``name``; returns the hooked module names. Requests then steer with
    ``SamplingParams(extra_args={"dsas": λ})`` or ``{"dsas": {name: λ}}``."""
    config = llm.llm_engine.vllm_config
    _check_engine(config)
    loaded = llm.__dict__.setdefault(ATTRIBUTE, set())
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
        processor.__dict__.setdefault(ATTRIBUTE, set()).add(name)
    return names[0]
