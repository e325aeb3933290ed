"""Fitting a :class:`Steerer`: collect activations, fit maps, fit gates, select layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import FitConfig, LinEASConfig
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
from .decision import DECISION_KEY
from .errors import InputSetError
from .gate_fit import calibrate_layers, calibrate_sample_gates, fit_layer_gate, select_layers
from .hookpoints import HookPoint, resolve_module
from .hooks import SteeringSession
from .layer import SteeringLayer, module_signature
from .lineas import train_lineas
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


def _settings(config: FitConfig) -> dict[str, Any]:
    """The per-layer fitting settings the maps and gates read."""
    names = (
        "n_components",
        "gate_l2",
        "cv_folds",
        "gate_activation",
        "gate_fit_on",
        "support_quantiles",
        "iti_alpha",
        "iti_probe",
        "seed",
    )
    return {name: getattr(config, name) for name in names}


def fit_from_activations(
    hook_points: Sequence[HookPoint],
    source: Activations,
    target: Activations,
    control: Activations | None = None,
    config: FitConfig | None = None,
    *,
    signatures: Mapping[str, dict[str, Any]] | None = None,
    contrast: ContrastPositions | None = None,
    context_source: str | None = None,
    **settings: Any,
) -> list[SteeringLayer]:
    """Fit closed-form maps (and gates) per layer from already collected activations
    (``contrast``: the concept's positions, for ``gate_fit_on="contrast"``; ``context_source``:
    the module whose context every gate reads, with ``gate_reads="context"``); ``settings``
    override fields of ``config`` (default: :class:`FitConfig`'s)."""
    config = FitConfig.build(config, **settings)
    per_layer = _settings(config)
    layers = []
    for point in hook_points:
        name = point.module
        layout = source.layouts.get(name) or point.layout
        resolved = HookPoint(name, point.output_index, layout)
        steering_map = _fit_map(config.map, source.pooled[name], target.pooled[name], per_layer)
        layer_gate = sample_gate = None
        if config.gate in ("dsas", "e2e"):
            if control is None:
                raise InputSetError("gate='dsas' needs control inputs; give a control set or use gate='none'")
            # the activations the gate reads: the output's (the module name), the input's or a context
            reading = resolved.reading(config.gate_reads, context_source).key
            layer_gate = fit_layer_gate(reading, source, control, contrast, per_layer)
            layer_gate.reads, layer_gate.source = config.gate_reads, context_source
            if config.sample_gate:  # on one mean row per sample of what the gate reads
                sample_gate = fit_layer_gate(reading, source, control, None, {**per_layer, "gate_fit_on": "pooled"})
                sample_gate.reads, sample_gate.source = config.gate_reads, context_source
        layers.append(
            SteeringLayer(resolved, steering_map, layer_gate, (signatures or {}).get(name), sample_gate=sample_gate)
        )
    return layers


def _check_source_first(order: Sequence[str], source: str, points: Sequence[HookPoint]) -> None:
    """Refuse a context source called after a steered module (its gate would read the last call's)."""
    modules = [key.split(":")[0] for key in order]
    first = modules.index(source) if source in modules else len(modules)
    late = [point.module for point in points if point.module in modules and modules.index(point.module) < first]
    if late:
        raise InputSetError(
            f"the gates read the context of {source!r}, which runs after {late}; choose a layer that runs before "
            "every steered one (e.g. the first steered layer or one before it)"
        )


def _checked_points(model: nn.Module, hook_points: Sequence[HookPoint | str] | None) -> list[HookPoint]:
    """The hook points, each naming a module of ``model``."""
    if hook_points is None:
        raise ValueError("give hook_points, or a config with hook_points")
    points = [HookPoint.coerce(point) for point in hook_points]
    if not points:
        raise ValueError("give at least one hook point")
    for point in points:
        resolve_module(model, point.module)
    return points


def fit_steerer(
    model: nn.Module,
    hook_points: Sequence[HookPoint | str] | None,
    source_inputs: Sequence[Any],
    target_inputs: Sequence[Any],
    control_inputs: Sequence[Any] | None = None,
    config: FitConfig | None = None,
    *,
    forward: Forward | None = None,
    mask_fn: Callable[[Any], torch.Tensor | None] = default_mask,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
    context_source: str | None = None,
    **settings: Any,
) -> Steerer:
    """Fit a :class:`Steerer` on ``model`` from three input sets.

    Args:
        model: any ``nn.Module``; only its hooked submodules are read.
        hook_points: module names or :class:`HookPoint` objects, in forward order.
        source_inputs: a sequence of batches, each passed to ``forward``, showing the concept.
        target_inputs: batches of the desired version.
        control_inputs: batches steering must leave alone (needed when ``gate`` is on).
        config: what to fit (:class:`~dsas_diffusion.config.FitConfig`; default its core
            defaults); ``settings`` (e.g. ``map="caa"``, ``n_components=20``) override its fields.
        hook_points: ``None`` takes ``config.hook_points``.
        forward: runs one batch (default: ``model(batch)`` / ``model(**batch)``).
        mask_fn: returns the ``(B, positions)`` padding mask of a batch, or ``None``.
        provenance: recorded in the saved file (base model, revision, prompts...).
        context_source: with ``gate_reads="context"``, the module (a decoder layer run before
            every steered one) whose context every gate reads; ``None``: each its own module's.
    """
    config = FitConfig.build(config, **settings)
    points = _checked_points(model, hook_points if hook_points is not None else config.hook_points)
    sets = {"source": source_inputs, "target": target_inputs, "control": control_inputs}
    for label in ("source", "target", "control") if config.gate != "none" else ("source", "target"):
        check_not_empty(sets[label], label)
    forward = forward or default_forward(model)
    per_layer = _settings(config)
    wants_positions = config.gate_fit_on != "pooled" or config.gate_calibration != "none"
    positions = config.positions_per_sample if wants_positions else None
    collect = dict(
        forward=forward, mask_fn=mask_fn, positions_per_sample=positions, progress=progress, seed=config.seed
    )
    found = _collect(model, points, sets, config, collect, context_source)
    layers = fit_from_activations(
        points,
        found.source,
        found.target,
        found.control,
        config,
        signatures=found.signatures,
        contrast=found.contrast,
        context_source=context_source,
    )
    if config.incremental and config.map in CLOSED_FORM_MAPS:
        _refit_maps_upstream(model, layers, source_inputs, found.target.pooled, config, per_layer, collect)
    lineas = config.lineas or LinEASConfig(seed=config.seed)
    if config.map == "lineas":
        train_lineas(
            model,
            layers,
            forward,
            source_inputs,
            found.target.pooled,
            control_inputs=control_inputs,
            train_gates=config.gate == "e2e",
            config=lineas,
            mask_fn=mask_fn,
            progress=progress,
        )
    calibration_rows = found.control.positions if found.control is not None else {}
    if config.incremental_gates and config.gate == "dsas":
        calibration_rows = _refit_gates_upstream(model, layers, sets, per_layer, collect, calibration_rows)
    outcomes = _finish_gates(layers, config, calibration_rows, found) if config.gate == "dsas" else ({}, {})
    saved = _saved_config(config, layers, per_layer, positions, found.counts, outcomes, lineas)
    return Steerer(
        layers, strength=config.strength, config=saved, provenance={**model_provenance(model), **(provenance or {})}
    )


class _Collected(NamedTuple):
    """What a fit reads of the model: activations of each set, the concept located by
    contrast, the set sizes and the hooked modules' signatures."""

    source: Any
    target: Any
    control: Any
    contrast: Any
    counts: dict[str, int]
    signatures: dict[str, dict[str, Any]]


def _collect(
    model: nn.Module,
    points: list[HookPoint],
    sets: Mapping[str, Sequence[Any] | None],
    config: FitConfig,
    collect: Mapping[str, Any],
    context_source: str | None,
) -> _Collected:
    """Collect the sets' activations at ``points`` (and what the gates read, in the same
    passes), the contrast positions, check the sets' balance, and sort ``points`` in forward
    order as observed (incremental fitting steers upstream layers first)."""
    # gates reading the modules' inputs (or context) need those too, collected in the same passes
    gate = config.gate
    gate_points = [point.reading(config.gate_reads, context_source) for point in points] if gate == "dsas" else points
    gate_points = list({point.key: point for point in gate_points}.values())  # one source read once
    read = points + [point for point in gate_points if point.reads != "output"]
    source = collect_activations(model, read, sets["source"], name="source", **collect)
    target = collect_activations(model, points, sets["target"], name="target", **collect)
    control = None
    if gate != "none":
        control = collect_activations(model, read, sets["control"], name="control", **collect)
    contrast = None
    if config.uses_contrast:
        contrast = collect_contrast_positions(
            model,
            gate_points,
            sets["source"],
            sets["target"],
            forward=collect["forward"],
            mask_fn=collect["mask_fn"],
            level=config.contrast_level,
            per_sample=config.positions_per_sample,
            seed=config.seed,
            progress=collect["progress"],
        )
    if context_source is not None:
        _check_source_first(source.call_order, context_source, points)
    counts = {"source": source.num_samples, "target": target.num_samples}
    if control is not None:
        counts["control"] = control.num_samples
    _check_balance(counts, config.max_imbalance)
    order = {name: i for i, name in enumerate(source.call_order)}
    points.sort(key=lambda point: order.get(point.module, len(order)))
    signatures = {point.module: module_signature(resolve_module(model, point.module)) for point in points}
    return _Collected(source, target, control, contrast, counts, signatures)


def _refit_maps_upstream(
    model: nn.Module,
    layers: list[SteeringLayer],
    source_inputs: Sequence[Any],
    target_pooled: Mapping[str, torch.Tensor],
    config: FitConfig,
    per_layer: Mapping[str, Any],
    collect: Mapping[str, Any],
) -> None:
    """Refit each layer's map on the source activations with the layers upstream steered."""
    for index in tqdm(range(1, len(layers)), desc="incremental maps", disable=not collect["progress"]):
        upstream = SteeringSession(layers[:index], model, strength=1.0, gated=False)
        steered = collect_activations(
            model,
            [layers[index].hook_point],
            source_inputs,
            steering=upstream,
            name="source (steered upstream)",
            **collect,
        )
        name = layers[index].name
        layers[index].map = _fit_map(config.map, steered.pooled[name], target_pooled[name], per_layer)


def _refit_gates_upstream(
    model: nn.Module,
    layers: list[SteeringLayer],
    sets: Mapping[str, Sequence[Any] | None],
    per_layer: Mapping[str, Any],
    collect: Mapping[str, Any],
    calibration_rows: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Refit each layer's gate with the layers upstream steered through their gates; returns the
    control positions the calibration reads, those of the refitted layers replaced."""
    calibration_rows = dict(calibration_rows)
    for index in tqdm(range(1, len(layers)), desc="incremental gates", disable=not collect["progress"]):
        point = [layers[index].hook_point]
        steered = {}
        for label in ("source", "control"):
            upstream = SteeringSession(layers[:index], model, strength=1.0, gated=True)
            steered[label] = collect_activations(
                model, point, sets[label], steering=upstream, name=f"{label} (steered upstream)", **collect
            )
        layers[index].gate = fit_layer_gate(layers[index].name, steered["source"], steered["control"], None, per_layer)
        calibration_rows.update(steered["control"].positions)
    return calibration_rows


def _finish_gates(
    layers: list[SteeringLayer], config: FitConfig, calibration_rows: Mapping[str, torch.Tensor], found: _Collected
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate the DSAS gates and the sample gates, select the layers by gate accuracy and set
    the floors; returns the two calibrations' outcomes."""
    calibration = {}
    if config.gate_calibration != "none":
        calibration = calibrate_layers(
            layers,
            config.gate_calibration,
            calibration_rows,
            found.contrast,
            quantile=config.calibration_quantile,
            concept_level=config.concept_level,
        )
    samples = {}
    if config.sample_gate:
        samples = calibrate_sample_gates(
            layers,
            found.source.pooled,
            found.control.pooled,
            quantile=config.sample_quantile,
            concept_quantile=config.sample_concept_quantile,
            concept_level=config.concept_level,
        )
    select_layers(layers, threshold=config.gate_threshold, accuracy_scaling=config.accuracy_scaling)
    for layer in layers:
        layer.gate.floor = float(config.gate_floor)
        if layer.sample_gate is not None:
            layer.sample_gate.floor = float(config.gate_floor)
    if not any(layer.gate.enabled for layer in layers):
        _no_gate(layers, config.gate_threshold, config.on_no_gate)
    return calibration, samples


def _saved_config(
    config: FitConfig,
    layers: Sequence[SteeringLayer],
    per_layer: Mapping[str, Any],
    positions: int | None,
    counts: Mapping[str, int],
    outcomes: tuple[Mapping[str, Any], Mapping[str, Any]],
    lineas: LinEASConfig,
) -> dict[str, Any]:
    """What a fitted steerer's config records: the settings it was fitted with and what the fit
    produced (calibration outcomes, set sizes)."""
    gate, calibrated = config.gate, config.gate_calibration
    calibration, samples = outcomes
    return {
        "map": config.map,
        "gate": gate,
        "incremental": config.incremental,
        "incremental_gates": config.incremental_gates,
        "gate_threshold": config.gate_threshold,
        "accuracy_scaling": config.accuracy_scaling,
        "pooling": "mean",
        "gate_calibration": calibrated,
        "calibration_quantile": config.calibration_quantile if calibrated != "none" else None,
        "concept_level": config.concept_level if calibrated == "two-sided" else None,
        "calibration_outcome": calibration or None,
        "sample_calibration_outcome": samples or None,
        "steering_steps": None if config.steering_steps is None else list(config.steering_steps),
        # calibrated by a diffusion pipeline's fit_steering on the control prompts' denoising runs
        DECISION_KEY: None
        if config.sample_decision == "per-layer"
        else {"kind": config.sample_decision, "threshold": None},
        "gate_floor": config.gate_floor if gate == "dsas" else None,
        "contrast_level": config.contrast_level if config.uses_contrast else None,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in per_layer.items()},
        "positions_per_sample": positions,
        "samples": dict(counts),
        "lineas": lineas.to_dict() if config.map == "lineas" else None,
        "max_strength": None if config.max_strength is None else float(config.max_strength),
        "fit_config": config.replace(hook_points=tuple(layer.hook_point for layer in layers)).to_dict(),
    }


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
