"""Fitting a :class:`Steerer`: collect activations, fit maps, fit gates, select layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..names import CLOSED_FORM_MAPS, MAP_NAMES
from .collect import (
    Activations,
    ContrastPositions,
    Forward,
    check_not_empty,
    collect_activations,
    collect_contrast_positions,
    default_forward,
    default_mask,
)
from .errors import InputSetError
from .fit_args import check_fit_arguments
from .gate_fit import calibrate_layers, fit_layer_gate, select_layers
from .hookpoints import HookPoint, resolve_module
from .hooks import SteeringSession
from .layer import SteeringLayer, module_signature
from .lineas import LinEASConfig, train_lineas
from .maps import SteeringMap, fit_caa, fit_iti, fit_linear_act, identity_affine_map
from .steerer import Steerer

__all__ = ["fit_from_activations", "fit_steerer", "model_provenance", "select_layers"]


def _check_balance(counts: Mapping[str, int], max_imbalance: float) -> None:
    smallest, largest = min(counts.values()), max(counts.values())
    if largest > max_imbalance * smallest:
        listing = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise InputSetError(
            f"the input sets are unbalanced ({listing} samples): the largest is more than "
            f"{max_imbalance:g}x the smallest. Give sets of similar size, or raise max_imbalance."
        )


def _fit_map(name: str, source: torch.Tensor, target: torch.Tensor, settings: Mapping[str, Any]) -> SteeringMap:
    if name == "caa":
        return fit_caa(source, target)
    if name == "iti":
        return fit_iti(source, target, alpha=settings["iti_alpha"], probe=settings["iti_probe"])
    if name == "linear-act":
        return fit_linear_act(source, target, support_quantiles=settings["support_quantiles"])
    if name == "lineas":
        return identity_affine_map(source.shape[1])
    raise ValueError(f"map must be one of {MAP_NAMES}, got {name!r}")


def fit_from_activations(
    hook_points: Sequence[HookPoint],
    source: Activations,
    target: Activations,
    control: Activations | None = None,
    *,
    map: str = "linear-act",
    gate: str = "dsas",
    signatures: Mapping[str, dict[str, Any]] | None = None,
    contrast: ContrastPositions | None = None,
    **settings: Any,
) -> list[SteeringLayer]:
    """Fit closed-form maps (and gates) per layer from already collected activations
    (``contrast``: the concept's positions, for ``gate_fit_on="contrast"``)."""
    settings = {**_DEFAULTS, **settings}
    layers = []
    for point in hook_points:
        name = point.module
        layout = source.layouts.get(name) or point.layout
        resolved = HookPoint(name, point.output_index, layout)
        steering_map = _fit_map(map, source.pooled[name], target.pooled[name], settings)
        layer_gate = None
        if gate in ("dsas", "e2e"):
            if control is None:
                raise InputSetError("gate='dsas' needs control inputs; give a control set or use gate='none'")
            layer_gate = fit_layer_gate(name, source, control, contrast, settings)
        layers.append(SteeringLayer(resolved, steering_map, layer_gate, (signatures or {}).get(name)))
    return layers


_DEFAULTS: dict[str, Any] = {
    "n_components": 5,
    "gate_l2": 1.0,
    "cv_folds": 5,
    "gate_activation": "sigmoid",
    "gate_fit_on": "pooled",
    "support_quantiles": (0.0, 1.0),
    "iti_alpha": "auto",
    "iti_probe": "logistic",
    "seed": 0,
}


def fit_steerer(
    model: nn.Module,
    hook_points: Sequence[HookPoint | str],
    source_inputs: Sequence[Any],
    target_inputs: Sequence[Any],
    control_inputs: Sequence[Any] | None = None,
    *,
    map: str = "linear-act",
    gate: str = "dsas",
    forward: Forward | None = None,
    mask_fn: Callable[[Any], torch.Tensor | None] = default_mask,
    incremental: bool = False,
    incremental_gates: bool = False,
    n_components: int = 5,
    gate_l2: float = 1.0,
    cv_folds: int = 5,
    gate_threshold: float | None = 0.75,
    accuracy_scaling: bool = False,
    gate_fit_on: str = "pooled",
    gate_calibration: str = "none",
    calibration_quantile: float = 0.99,
    concept_level: float = 0.9,
    gate_floor: float = 0.0,
    contrast_level: float = 0.5,
    positions_per_sample: int = 16,
    gate_activation: str = "sigmoid",
    support_quantiles: tuple[float, float] | None = (0.0, 1.0),
    iti_alpha: float | str = "auto",
    iti_probe: str = "logistic",
    lineas: LinEASConfig | None = None,
    strength: float = 1.0,
    max_strength: float | None = None,
    max_imbalance: float = 4.0,
    on_no_gate: str = "raise",
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> Steerer:
    """Fit a :class:`Steerer` on ``model`` from three input sets.

    Args:
        model: any ``nn.Module``; only its hooked submodules are read.
        hook_points: module names or :class:`HookPoint` objects, in forward order.
        source_inputs / target_inputs / control_inputs: sequences of batches, each passed
            to ``forward``. Source shows the concept, target is the desired version,
            control holds inputs steering must leave alone (needed when ``gate`` is on).
        map: ``"caa"``, ``"iti"``, ``"linear-act"`` or ``"lineas"``.
        gate: ``"dsas"`` (PCA + logistic gate fitted on source vs control), ``"none"``
            (uniform steering only) or ``"e2e"`` (gates trained jointly with LinEAS maps).
        forward: runs one batch (default: ``model(batch)`` / ``model(**batch)``).
        mask_fn: returns the ``(B, positions)`` padding mask of a batch, or ``None``.
        incremental: fit closed-form maps layer by layer with earlier layers steered.
        incremental_gates: refit each gate with upstream layers steered (default: gates
            are fitted on unsteered activations).
        n_components, gate_l2, cv_folds, gate_activation: the gate's PCA rank, L2 weight,
            cross-validation folds and ``"sigmoid"`` / ``"relu"`` (clipped at 1).
        gate_threshold: layers whose gate accuracy is below it are not steered when gated
            (``None`` keeps all). ``accuracy_scaling`` scales each gate by its accuracy.
        gate_fit_on: ``"pooled"`` (one row per sample, the method as published),
            ``"positions"`` (sampled positions, ``positions_per_sample`` per sample) or
            ``"contrast"`` (the source positions where each source input differs most from
            its paired target input, against control and background positions; needs
            source and target paired batch by batch, see :func:`collect_contrast_positions`;
            ``contrast_level`` is its relative threshold).
        gate_calibration: ``"none"``, ``"control-positions"`` (lower each gate's bias so that
            at most ``1 - calibration_quantile`` of control positions open it past 0.05) or
            ``"two-sided"`` (also rescale it so that the median concept position, located by
            contrast, opens it to ``concept_level``; see :func:`calibrate_gate_two_sided`).
        gate_floor: gates opened less than this are exactly 0 (see :class:`LinearGate`), so
            closed positions stay unsteered at any strength; 0 keeps the plain sigmoid.
        support_quantiles: Linear-AcT's source support, ``None`` for everywhere.
        iti_alpha / iti_probe: ITI's step and direction (see :func:`fit_iti`).
        lineas: LinEAS training settings (:class:`LinEASConfig`).
        strength: the saved default λ.
        max_strength: the largest |λ| the steerer will accept (``None``: no bound); applying it
            with a larger strength raises :class:`SteeringError`.
        max_imbalance: refuse sets whose sizes differ by more than this factor.
        on_no_gate: ``"raise"`` (default) when no layer's gate reaches ``gate_threshold`` (the
            steerer would change nothing with gating on), or ``"warn"`` to return it anyway.
        provenance: recorded in the saved file (base model, revision, prompts...).
    """
    check_fit_arguments(
        map=map,
        gate=gate,
        gate_fit_on=gate_fit_on,
        gate_calibration=gate_calibration,
        gate_activation=gate_activation,
        max_strength=max_strength,
        gate_floor=gate_floor,
        n_components=n_components,
        cv_folds=cv_folds,
        gate_threshold=gate_threshold,
        calibration_quantile=calibration_quantile,
        concept_level=concept_level,
        contrast_level=contrast_level,
        positions_per_sample=positions_per_sample,
        max_imbalance=max_imbalance,
        on_no_gate=on_no_gate,
        incremental_gates=incremental_gates,
    )
    uses_contrast = gate == "dsas" and (gate_fit_on == "contrast" or gate_calibration == "two-sided")
    points = [HookPoint.coerce(point) for point in hook_points]
    if not points:
        raise ValueError("give at least one hook point")
    for point in points:
        resolve_module(model, point.module)
    check_not_empty(source_inputs, "source")
    check_not_empty(target_inputs, "target")
    needs_control = gate != "none"
    if needs_control:
        check_not_empty(control_inputs, "control")
    forward = forward or default_forward(model)
    settings = {
        "n_components": n_components,
        "gate_l2": gate_l2,
        "cv_folds": cv_folds,
        "gate_activation": gate_activation,
        "gate_fit_on": gate_fit_on,
        "support_quantiles": support_quantiles,
        "iti_alpha": iti_alpha,
        "iti_probe": iti_probe,
        "seed": seed,
    }
    wants_positions = gate_fit_on != "pooled" or gate_calibration != "none"
    positions = positions_per_sample if wants_positions else None
    collect = dict(forward=forward, mask_fn=mask_fn, positions_per_sample=positions, progress=progress, seed=seed)

    source = collect_activations(model, points, source_inputs, name="source", **collect)
    target = collect_activations(model, points, target_inputs, name="target", **collect)
    control = collect_activations(model, points, control_inputs, name="control", **collect) if needs_control else None
    contrast = None
    if uses_contrast:
        contrast = collect_contrast_positions(
            model,
            points,
            source_inputs,
            target_inputs,
            forward=forward,
            mask_fn=mask_fn,
            level=contrast_level,
            per_sample=positions_per_sample,
            seed=seed,
            progress=progress,
        )
    counts = {"source": source.num_samples, "target": target.num_samples}
    if control is not None:
        counts["control"] = control.num_samples
    _check_balance(counts, max_imbalance)
    # forward order as observed, so that incremental fitting steers upstream layers first
    order = {name: i for i, name in enumerate(source.call_order)}
    points.sort(key=lambda point: order.get(point.module, len(order)))
    signatures = {point.module: module_signature(resolve_module(model, point.module)) for point in points}

    layers = fit_from_activations(
        points, source, target, control, map=map, gate=gate, signatures=signatures, contrast=contrast, **settings
    )
    if incremental and map in CLOSED_FORM_MAPS:
        for index in tqdm(range(1, len(layers)), desc="incremental maps", disable=not progress):
            upstream = SteeringSession(layers[:index], model, strength=1.0, gated=False)
            steered = collect_activations(
                model,
                [layers[index].hook_point],
                source_inputs,
                steering=upstream,
                name="source (steered upstream)",
                **collect,
            )
            layers[index].map = _fit_map(
                map, steered.pooled[layers[index].name], target.pooled[layers[index].name], settings
            )

    lineas = lineas or LinEASConfig(seed=seed)
    if map == "lineas":
        train_lineas(
            model,
            layers,
            forward,
            source_inputs,
            target.pooled,
            control_inputs=control_inputs,
            train_gates=gate == "e2e",
            config=lineas,
            mask_fn=mask_fn,
            progress=progress,
        )

    calibration_rows = control.positions if control is not None else {}
    if incremental_gates and gate == "dsas":
        for index in tqdm(range(1, len(layers)), desc="incremental gates", disable=not progress):
            point = [layers[index].hook_point]
            sets = {}
            for label, inputs in (("source", source_inputs), ("control", control_inputs)):
                upstream = SteeringSession(layers[:index], model, strength=1.0, gated=True)
                sets[label] = collect_activations(
                    model, point, inputs, steering=upstream, name=f"{label} (steered upstream)", **collect
                )
            layers[index].gate = fit_layer_gate(layers[index].name, sets["source"], sets["control"], None, settings)
            calibration_rows = {**calibration_rows, **sets["control"].positions}

    calibration = {}
    if gate == "dsas" and gate_calibration != "none":
        calibration = calibrate_layers(
            layers,
            gate_calibration,
            calibration_rows,
            contrast,
            quantile=calibration_quantile,
            concept_level=concept_level,
        )

    if gate == "dsas":  # end-to-end gates were trained to decide for themselves
        select_layers(layers, threshold=gate_threshold, accuracy_scaling=accuracy_scaling)
        for layer in layers:
            layer.gate.floor = float(gate_floor)
        if not any(layer.gate.enabled for layer in layers):
            _no_gate(layers, gate_threshold, on_no_gate)

    config = {
        "map": map,
        "gate": gate,
        "incremental": incremental,
        "incremental_gates": incremental_gates,
        "gate_threshold": gate_threshold,
        "accuracy_scaling": accuracy_scaling,
        "pooling": "mean",
        "gate_calibration": gate_calibration,
        "calibration_quantile": calibration_quantile if gate_calibration != "none" else None,
        "concept_level": concept_level if gate_calibration == "two-sided" else None,
        "calibration_outcome": calibration or None,
        "gate_floor": gate_floor if gate == "dsas" else None,
        "contrast_level": contrast_level if uses_contrast else None,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        "positions_per_sample": positions,
        "samples": counts,
        "lineas": lineas.to_dict() if map == "lineas" else None,
        "max_strength": None if max_strength is None else float(max_strength),
    }
    return Steerer(
        layers, strength=strength, config=config, provenance={**model_provenance(model), **(provenance or {})}
    )


def _no_gate(layers: Sequence[SteeringLayer], threshold: float | None, on_no_gate: str) -> None:
    accuracies = ", ".join(f"{layer.name} {layer.gate.accuracy:.2f}" for layer in layers)
    message = (
        f"no layer's DSAS gate separates source from control inputs (held-out accuracy per layer: {accuracies}; "
        f"threshold {threshold}), so with gating on this steerer changes nothing. Give source inputs that show "
        "the concept and control inputs that lack it (they may be too alike, or the same), more of each, or a "
        "lower gate_threshold; on_no_gate='warn' returns the steerer anyway"
    )
    if on_no_gate == "raise":
        raise InputSetError(message)
    warnings.warn(message, stacklevel=3)


def model_provenance(model: nn.Module) -> dict[str, Any]:
    """What can be read off a model about where it came from (class, name or path)."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if config is not None and not name and isinstance(config, Mapping):
        name = config.get("_name_or_path")
    return {"base_model": name or None, "model_class": type(model).__name__}
