"""Checking every request of the demo: bounds, types, prompts. Violations raise
:class:`InputError`, whose message is meant for the user as it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..prompts import prompt_lines

__all__ = [
    "LIMITS",
    "GenerateSettings",
    "InputError",
    "Limits",
    "check_prompt",
    "integer",
    "number",
    "parse_prompt_list",
    "validate_settings",
]


class TokenCounter(Protocol):
    model_max_length: int

    def count(self, text: str) -> int: ...


class InputError(ValueError):
    """A request the demo refuses; the message says what to change and is shown to the user."""


@dataclass(frozen=True)
class Limits:
    """Bounds the demo enforces on every request."""

    max_prompt_chars: int = 300
    min_steps: int = 1
    max_steps: int = 50
    min_strength: float = 0.0
    max_strength: float = 10.0
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_seed: int = 2**32 - 1
    min_size: int = 64
    max_size: int = 1024
    max_fit_prompts: int = 200
    min_fit_steps: int = 2
    max_fit_steps: int = 30
    max_sweep_points: int = 9


LIMITS = Limits()


@dataclass(frozen=True)
class GenerateSettings:
    """One request's generation settings (validate with :func:`validate_settings`)."""

    prompt: str
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    strength: float = 2.0
    size: int = 0  # 0: the model's default size


def number(value: Any, name: str) -> float:
    """``value`` as a finite float, or an :class:`InputError` naming ``name``."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(result):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    return result


def integer(value: Any, name: str) -> int:
    value_as_number = number(value, name)
    if value_as_number != int(value_as_number):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    return int(value_as_number)


def check_prompt(
    prompt: Any, name: str = "The prompt", tokenizer: TokenCounter | None = None, limits: Limits = LIMITS
) -> str:
    text = str(prompt or "").strip()
    if not text:
        raise InputError(f"{name} is empty: describe the image to generate.")
    if len(text) > limits.max_prompt_chars:
        raise InputError(f"{name} is {len(text)} characters long; at most {limits.max_prompt_chars} are allowed.")
    if tokenizer is not None:
        tokens = tokenizer.count(text)
        if tokens > tokenizer.model_max_length:
            raise InputError(
                f"{name} is {tokens} tokens long; the model reads at most {tokenizer.model_max_length}: shorten it."
            )
    return text


def validate_settings(
    settings: GenerateSettings,
    *,
    tokenizer: TokenCounter | None = None,
    size_multiple: int = 8,
    max_size: int | None = None,
    limits: Limits = LIMITS,
) -> GenerateSettings:
    """``settings`` checked against ``limits`` (and the model's tokenizer), numbers coerced;
    raises :class:`InputError` naming the first bad field and its bounds. ``max_size``: the
    model's own bound on the image side (see ``actions.size_bound``), if below the limits'."""

    def bounded(value: float, low: float, high: float, name: str) -> None:
        if not low <= value <= high:
            raise InputError(f"{name} must be between {low} and {high}, got {value}.")

    prompt = check_prompt(settings.prompt, tokenizer=tokenizer, limits=limits)
    steps = integer(settings.steps, "Steps")
    bounded(steps, limits.min_steps, limits.max_steps, "Steps")
    seed = integer(settings.seed, "The seed")
    bounded(seed, 0, limits.max_seed, "The seed")
    guidance = number(settings.guidance, "Guidance")
    bounded(guidance, limits.min_guidance, limits.max_guidance, "Guidance")
    strength = number(settings.strength, "The strength λ")
    bounded(strength, limits.min_strength, limits.max_strength, "The strength λ")
    size = integer(settings.size, "The image size")
    if size != 0:
        bounded(size, limits.min_size, min(limits.max_size, max_size or limits.max_size), "The image size")
        if size % size_multiple:
            raise InputError(f"The image size must be a multiple of {size_multiple} (or 0 for the model's default).")
    return GenerateSettings(prompt, seed, steps, guidance, strength, size)


def parse_prompt_list(text: str | None, name: str, *, limits: Limits = LIMITS) -> list[str]:
    """Prompts pasted one per line (blank lines and ``#`` comments skipped), each checked."""
    prompts = prompt_lines(str(text or ""))
    if not prompts:
        raise InputError(f"The {name} prompt list is empty: paste one prompt per line.")
    if len(prompts) > limits.max_fit_prompts:
        raise InputError(f"The {name} prompt list has {len(prompts)} prompts; at most {limits.max_fit_prompts}.")
    for i, prompt in enumerate(prompts, 1):
        check_prompt(prompt, name=f"Line {i} of the {name} prompts", limits=limits)
    return prompts
