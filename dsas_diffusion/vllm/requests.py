"""What a vLLM request asks of the loaded steerings: its strengths, read from its sampling
parameters' ``extra_args`` and checked as it arrives, and the steerings ``vllm serve`` loads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..steering import SteeringError
from ..steering.strengths import check_strengths

__all__ = ["ENVIRONMENT_KEY", "STRENGTH_KEY", "check_request", "request_strength", "steering_from_environment"]

#: the key of ``SamplingParams.extra_args`` that holds a request's strength
STRENGTH_KEY = "dsas"
#: the environment variable naming the steerings the workers load with their model (``vllm serve``)
ENVIRONMENT_KEY = "DSAS_VLLM_STEERING"


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
