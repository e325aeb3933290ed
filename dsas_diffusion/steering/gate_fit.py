"""Fitting, calibrating and selecting the DSAS gates of a steerer's layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .collect import Activations, ContrastPositions
from .errors import InputSetError
from .gate import LinearGate, calibrate_gate_on_positions, calibrate_gate_two_sided, fit_gate, gate_accuracy_scale
from .layer import SteeringLayer

__all__ = ["calibrate_layers", "calibrate_sample_gates", "fit_layer_gate", "select_layers"]


def _balanced(positive: torch.Tensor, negative: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger class subsampled (seeded) to the size of the smaller, so that neither
    dominates the logistic fit."""
    generator = torch.Generator().manual_seed(seed)
    count = min(len(positive), len(negative))

    def take(rows: torch.Tensor) -> torch.Tensor:
        return rows if len(rows) == count else rows[torch.randperm(len(rows), generator=generator)[:count]]

    return take(positive), take(negative)


def fit_layer_gate(
    name: str,
    source: Activations,
    control: Activations,
    contrast: ContrastPositions | None,
    settings: Mapping[str, Any],
) -> LinearGate:
    """The gate reading ``name`` (a :attr:`HookPoint.key`), fitted on what
    ``settings["gate_fit_on"]`` names:

    * ``"pooled"``: one mean row per source and control sample (the method as published);
    * ``"positions"``: sampled single positions of source and control samples;
    * ``"contrast"``: the source positions located by contrast with the paired target
      (label 1) against single control positions and the source images' background
      positions (label 0), the classes balanced.
    """
    fit_on = settings["gate_fit_on"]
    if fit_on == "positions":
        if name not in source.positions:
            raise ValueError("gate_fit_on='positions' needs activations collected with positions_per_sample")
        positive, negative = source.positions[name], control.positions[name]
    elif fit_on == "contrast":
        if contrast is None or name not in contrast.concept:
            raise ValueError("gate_fit_on='contrast' needs contrast positions (collect_contrast_positions)")
        negatives = torch.cat([control.positions[name], contrast.background[name]])
        positive, negative = _balanced(contrast.concept[name], negatives, settings["seed"])
    else:
        positive, negative = source.pooled[name], control.pooled[name]
    return fit_gate(
        positive,
        negative,
        n_components=settings["n_components"],
        l2=settings["gate_l2"],
        cv_folds=settings["cv_folds"],
        seed=settings["seed"],
        activation=settings["gate_activation"],
    )


def calibrate_layers(
    layers: Sequence[SteeringLayer],
    mode: str,
    control_positions: Mapping[str, torch.Tensor],
    contrast: ContrastPositions | None,
    *,
    quantile: float = 0.99,
    concept_level: float = 0.9,
) -> dict[str, str]:
    """Calibrate every layer's gate on single positions (``mode``: ``"control-positions"``
    or ``"two-sided"``, see :mod:`.gate`); returns, per layer, which calibration held
    (``"two-sided"``, or ``"control-only"`` where the fitted direction ranks the concept's
    median below the control quantile)."""
    outcome = {}
    for layer in layers:
        reading = layer.gate_point.key  # the activations the gate reads
        rows = control_positions.get(reading)
        if rows is None:
            raise InputSetError(f"gate calibration needs control positions of {reading!r}")
        if mode == "two-sided":
            if contrast is None:
                raise ValueError("gate_calibration='two-sided' needs the concept's positions (contrast)")
            met = calibrate_gate_two_sided(
                layer.gate, rows, contrast.concept[reading], control_quantile=quantile, concept_level=concept_level
            )
            outcome[layer.name] = "two-sided" if met else "control-only"
        else:
            calibrate_gate_on_positions(layer.gate, rows, quantile=quantile)
            outcome[layer.name] = "control-only"
    return outcome


def calibrate_sample_gates(
    layers: Sequence[SteeringLayer],
    source: Mapping[str, torch.Tensor],
    control: Mapping[str, torch.Tensor],
    *,
    quantile: float = 0.99,
    concept_quantile: float = 0.25,
    concept_level: float = 0.9,
) -> dict[str, str]:
    """Calibrate every layer's sample gate on one mean row per sample (``source`` and
    ``control``: pooled rows by :attr:`HookPoint.key`): at the ``quantile`` of control samples
    it opens 0.05, at the ``concept_quantile`` of source samples ``concept_level``. Returns, per
    layer, ``"two-sided"`` or ``"control-only"`` (where the fitted direction does not rank those
    source samples above the control quantile)."""
    outcome = {}
    for layer in layers:
        if layer.sample_gate is None:
            continue
        reading = layer.gate_point.key
        met = calibrate_gate_two_sided(
            layer.sample_gate,
            control[reading],
            source[reading],
            control_quantile=quantile,
            concept_quantile=concept_quantile,
            concept_level=concept_level,
        )
        outcome[layer.name] = "two-sided" if met else "control-only"
    return outcome


def select_layers(layers: Sequence[SteeringLayer], *, threshold: float | None, accuracy_scaling: bool) -> None:
    """Switch off gates below ``threshold`` accuracy; optionally scale the others by accuracy."""
    for layer in layers:
        gate = layer.gate
        if gate is None or math.isnan(gate.accuracy):
            continue
        gate.enabled = threshold is None or gate.accuracy >= threshold
        gate.scale = gate_accuracy_scale(gate.accuracy) if accuracy_scaling else 1.0
