"""Steering strengths: one λ for a whole call, or one per sample of a batch.

A call's strength for one steerer is a number (every row of the batch) or a sequence of
numbers, one per prompt. The pipelines and the language model expand a per-prompt sequence to
one λ per sample (``num_images_per_prompt``, ``num_return_sequences``, beams: each prompt's
samples are adjacent rows), and the hooks read it per row: a model batch with ``k`` times as
many rows as samples (the ``[unconditional; conditional]`` halves of classifier-free guidance)
repeats it ``k`` times, half after half.

Examples:
    >>> check_strengths([0.0, 2.0, 2.0])
    (0.0, 2.0, 2.0)
    >>> check_strengths([1.5, 1.5])                      # the same λ everywhere: one number
    1.5
    >>> per_sample((0.0, 2.0), 2)                        # two samples per prompt
    (0.0, 0.0, 2.0, 2.0)
    >>> rows_strengths(torch.tensor([0.0, 2.0]), 4)      # a batch of [unconditional; conditional]
    tensor([0., 2., 0., 2.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

from .errors import SteeringError

__all__ = [
    "STRENGTH_LIMIT",
    "Strength",
    "check_strength",
    "check_strengths",
    "describe_strength",
    "is_steering",
    "per_sample",
    "rows_strengths",
]

#: a steerer's strength in one call: one λ, or one per sample
Strength = Union[float, tuple[float, ...]]  # noqa: UP007 (a runtime alias)

#: no steering strength beyond this is accepted anywhere: outputs with the concept are destroyed
#: long before (``docs/removal.md``), and far larger values only overflow to NaN or infinity
STRENGTH_LIMIT = 1000.0


def check_strength(strength: float) -> float:
    """``strength`` as a float, or :class:`SteeringError` if it is not a finite number with
    ``|strength| <= STRENGTH_LIMIT``."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise SteeringError(f"steering strength must be a number, got {strength!r}") from None
    if not math.isfinite(value):
        raise SteeringError(f"steering strength must be finite, got {strength!r}; use e.g. 0.0 to 2.0")
    if abs(value) > STRENGTH_LIMIT:
        raise SteeringError(
            f"steering strength {value:g} is beyond any useful value (at most {STRENGTH_LIMIT:g} is accepted; "
            "outputs are destroyed long before); use e.g. 0.0 to 2.0"
        )
    return value


def check_strengths(value: float | Sequence[float] | torch.Tensor, count: int | None = None) -> Strength:
    """One λ (a float) or one per sample (a tuple of floats; ``count`` of them when given), each
    checked by :func:`check_strength`. A sequence with one value repeated is that value: the
    call is then the same as with one number."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return check_strength(value.item())
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return check_strength(value)  # type: ignore[arg-type]
    values = tuple(check_strength(v) for v in value)
    if not values:
        raise SteeringError("steering strength is an empty sequence; give one λ, or one per prompt")
    if count is not None and len(values) != count:
        raise SteeringError(
            f"steering strength has {len(values)} values for {count} prompts; give one λ for all, or one per prompt"
        )
    return values[0] if all(v == values[0] for v in values) else values


def describe_strength(strength: Strength) -> str:
    """``strength`` for a message.

    Examples:
        >>> describe_strength(1.5), describe_strength((0.0, 2.0))
        ('1.5', '[0, 2] (per sample)')
    """
    if isinstance(strength, tuple):
        return "[" + ", ".join(f"{v:g}" for v in strength) + "] (per sample)"
    return f"{strength:g}"


def is_steering(strength: Strength) -> bool:
    """Whether ``strength`` steers any sample."""
    return any(v != 0.0 for v in strength) if isinstance(strength, tuple) else strength != 0.0


def per_sample(strength: Strength, repeat: int) -> Strength:
    """A per-prompt ``strength`` with each prompt's value repeated for its ``repeat`` adjacent
    samples (one λ stays one λ)."""
    if not isinstance(strength, tuple) or repeat == 1:
        return strength
    return tuple(v for v in strength for _ in range(repeat))


def rows_strengths(samples: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows,)``: the per-sample strengths ``samples`` for a batch of ``rows`` rows, repeated
    half after half when the batch holds several copies of the samples."""
    count = samples.shape[0]
    if rows == count:
        return samples
    if rows % count:
        raise SteeringError(
            f"{count} per-sample steering strengths for a batch of {rows} rows: the batch must hold the "
            f"{count} samples (or whole copies of them, as the halves of classifier-free guidance)"
        )
    return samples.repeat(rows // count)
