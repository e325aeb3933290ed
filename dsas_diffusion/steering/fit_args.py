"""The names and numbers :func:`~.fit.fit_steerer` accepts, checked in one place before any
activation is collected (the pipelines call it before their collection runs too)."""

from __future__ import annotations

import math
from typing import Any

from ..names import FIT_GATES, GATE_ACTIVATIONS, GATE_CALIBRATIONS, GATE_FIT_ON, MAP_NAMES
from .errors import SteeringError

__all__ = ["check_fit_arguments"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SteeringError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fit_arguments(
    *,
    map: str = "linear-act",
    gate: str = "dsas",
    gate_fit_on: str = "pooled",
    gate_calibration: str = "none",
    gate_activation: str = "sigmoid",
    max_strength: float | None = None,
    gate_floor: float = 0.0,
    n_components: int = 5,
    cv_folds: int = 5,
    gate_threshold: float | None = 0.75,
    calibration_quantile: float = 0.99,
    concept_level: float = 0.9,
    contrast_level: float = 0.5,
    positions_per_sample: int = 16,
    max_imbalance: float = 4.0,
    on_no_gate: str = "raise",
    incremental_gates: bool = False,
    **ignored: Any,
) -> None:
    """Check :func:`fit_steerer`'s names and numbers, raising :class:`SteeringError` naming the
    first bad one; the pipelines call it before their collection runs start.

    Example:
        >>> check_fit_arguments(map="linear_act")
        Traceback (most recent call last):
        ...
        dsas_diffusion.steering.errors.SteeringError: map must be one of ('caa', 'iti', 'linear-act', 'lineas'), got 'linear_act'
    """
    for name, value, allowed in (
        ("map", map, MAP_NAMES),
        ("gate", gate, FIT_GATES),
        ("gate_fit_on", gate_fit_on, GATE_FIT_ON),
        ("gate_calibration", gate_calibration, GATE_CALIBRATIONS),
        ("gate_activation", gate_activation, GATE_ACTIVATIONS),
        ("on_no_gate", on_no_gate, ("raise", "warn")),
    ):
        _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")
    _check(gate != "e2e" or map == "lineas", "gate='e2e' trains gates jointly with LinEAS maps: use map='lineas'")
    _check(
        max_strength is None or (_is_number(max_strength) and max_strength > 0),
        f"max_strength must be a positive number or None, got {max_strength!r}",
    )
    _check(_is_number(gate_floor) and 0.0 <= gate_floor < 1.0, f"gate_floor must lie in [0, 1), got {gate_floor!r}")
    _check(_is_int(n_components) and n_components >= 1, f"n_components must be an integer >= 1, got {n_components!r}")
    _check(_is_int(cv_folds) and cv_folds >= 2, f"cv_folds must be an integer >= 2, got {cv_folds!r}")
    _check(
        _is_int(positions_per_sample) and positions_per_sample >= 1,
        f"positions_per_sample must be an integer >= 1, got {positions_per_sample!r}",
    )
    _check(
        gate_threshold is None or (_is_number(gate_threshold) and 0 <= gate_threshold <= 1),
        f"gate_threshold must be None or a number in [0, 1], got {gate_threshold!r}",
    )
    for name, value in (
        ("calibration_quantile", calibration_quantile),
        ("concept_level", concept_level),
        ("contrast_level", contrast_level),
    ):
        _check(_is_number(value) and 0 < value < 1, f"{name} must lie in (0, 1), got {value!r}")
    _check(_is_number(max_imbalance) and max_imbalance >= 1, f"max_imbalance must be >= 1, got {max_imbalance!r}")
    uses_contrast = gate == "dsas" and (gate_fit_on == "contrast" or gate_calibration == "two-sided")
    _check(
        not (uses_contrast and incremental_gates),
        "incremental_gates refits gates on upstream-steered activations; it does not combine with "
        "gate_fit_on='contrast' or gate_calibration='two-sided'",
    )
