"""The schema of ``steering_config.json`` and its tensors, checked on every load.

Every violation is a :class:`SteeringFileError` that names the field and what to do. A
steering file is data: loading one never executes code (JSON and safetensors only), never
switches a layer on because of a string (booleans are JSON booleans), and never accepts a
non-finite number or a tensor of the wrong width.

Examples:
    >>> check_config({"format": "dsas-steering", "format_version": 1, "strength": 1.0, "layers": []}, "f.json")
    Traceback (most recent call last):
    ...
    dsas_diffusion.errors.SteeringFileError: f.json: layers must be a non-empty list of layer entries; re-save the steering with save_pretrained
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..config import is_step_window
from ..names import GATE_ACTIVATIONS, GATE_READS
from .errors import SteeringFileError
from .hooks import STRENGTH_LIMIT

__all__ = ["GATE_KINDS", "MAP_KINDS", "MAX_CONFIG_BYTES", "check_config", "check_tensors"]

MAP_KINDS = ("additive", "affine")
#: a layer's gates, by their field in a layer entry: the positional gate, and the sample gate
#: (on the mean over a sample's positions) that multiplies it
GATE_KINDS = ("gate", "sample_gate")
LAYOUTS = ("channels_last", "channels_first")
#: a steering config above this size is refused before parsing (a real one is a few KB
#: per layer; this allows thousands of layers with long provenance)
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_FIX = "re-save the steering with save_pretrained"


def _fail(where: str, field: str, problem: str, fix: str = _FIX) -> SteeringFileError:
    return SteeringFileError(f"{where}: {field} {problem}; {fix}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: Any, where: str) -> None:
    """Raise :class:`SteeringFileError` naming the first field of ``config`` (the parsed
    ``steering_config.json`` at ``where``) that is missing, of the wrong type or out of range."""
    if not isinstance(config, dict):
        raise _fail(where, "the file", "must hold a JSON object")
    version = config.get("format_version")
    if not _integer(version) or version < 1:
        raise _fail(where, "format_version", f"must be a positive integer, got {version!r}")
    strength = config.get("strength", 1.0)
    if not _number(strength) or abs(strength) > STRENGTH_LIMIT:
        raise _fail(
            where, "strength", f"must be a finite number of at most {STRENGTH_LIMIT:g} in size, got {strength!r}"
        )
    for name in ("config", "provenance"):
        if not isinstance(config.get(name, {}), dict):
            raise _fail(where, name, f"must be a JSON object, got {type(config.get(name)).__name__}")
    bound = config.get("config", {}).get("max_strength")
    if bound is not None and not (_number(bound) and bound > 0):
        raise _fail(where, "config.max_strength", f"must be a positive finite number or null, got {bound!r}")
    window = config.get("config", {}).get("steering_steps")
    if window is not None and not (isinstance(window, list) and is_step_window(window)):
        raise _fail(
            where, "config.steering_steps", f"must be null or [start, end] with 0 <= start < end <= 1, got {window!r}"
        )
    decision = config.get("config", {}).get("decision")
    if decision is not None and not (
        isinstance(decision, dict)
        and (decision.get("threshold") is None or _number(decision["threshold"]))
        and isinstance(decision.get("scales", {}), dict)
        and all(_number(v) and v > 0 for v in decision.get("scales", {}).values())
        and (
            decision.get("weights") is None
            or (isinstance(decision["weights"], dict) and all(_number(v) for v in decision["weights"].values()))
        )
        and _number(decision.get("bias", 0.0))
    ):
        raise _fail(
            where,
            "config.decision",
            f"must be null or an object with a finite threshold, positive scales and finite weights per layer and a "
            f"finite bias, got {decision!r}",
        )
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _fail(where, "layers", "must be a non-empty list of layer entries")
    seen: set[str] = set()
    for index, entry in enumerate(layers):
        _check_layer(entry, f"layers[{index}]", where)
        if entry["module"] in seen:
            raise _fail(where, f"layers[{index}].module", f"{entry['module']!r} appears twice; each module once")
        seen.add(entry["module"])


def _check_layer(entry: Any, field: str, where: str) -> None:
    if not isinstance(entry, dict):
        raise _fail(where, field, "must be a JSON object")
    module = entry.get("module")
    if not isinstance(module, str):  # "" is the model itself
        raise _fail(where, f"{field}.module", f"must be a module name (a string), got {module!r}")
    checks: list[tuple[str, bool, str]] = [
        ("width", _integer(entry.get("width")) and entry["width"] > 0, "a positive integer"),
        ("layout", entry.get("layout") in LAYOUTS, f"one of {LAYOUTS}"),
        ("map_kind", entry.get("map_kind") in MAP_KINDS, f"one of {MAP_KINDS}"),
        (
            "output_index",
            entry.get("output_index") is None or (_integer(entry["output_index"]) and entry["output_index"] >= 0),
            "null or an integer >= 0",
        ),
        ("support", isinstance(entry.get("support", False), bool), "true or false"),
        ("signature", isinstance(entry.get("signature") or {}, dict), "a JSON object or null"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise _fail(where, f"{field}.{key}", f"must be {expected}, got {entry.get(key)!r}")
    if entry.get("support") and entry.get("map_kind") != "affine":
        raise _fail(where, f"{field}.support", "is only valid for affine maps")
    for kind in GATE_KINDS:
        _check_gate(entry, kind, f"{field}.{kind}", where)
    if entry.get("sample_gate") is not None:
        gate, sample = entry.get("gate"), entry["sample_gate"]
        if gate is None:
            raise _fail(where, f"{field}.sample_gate", "multiplies the layer's gate, which is null")
        for key, default in (("reads", "output"), ("width", None), ("source", None)):
            if sample.get(key, default) != gate.get(key, default):
                raise _fail(where, f"{field}.sample_gate.{key}", f"must be the gate's ({gate.get(key, default)!r})")


def _check_gate(entry: dict[str, Any], kind: str, field: str, where: str) -> None:
    gate = entry.get(kind)
    if gate is None:
        return
    if not isinstance(gate, dict):
        raise _fail(where, field, "must be a JSON object or null")
    accuracy, components = gate.get("accuracy"), gate.get("n_components")
    checks = [
        ("accuracy", accuracy is None or (_number(accuracy) and 0 <= accuracy <= 1), "null or a number in [0, 1]"),
        ("scale", _number(gate.get("scale", 1.0)) and gate.get("scale", 1.0) >= 0, "a finite number >= 0"),
        ("enabled", isinstance(gate.get("enabled", True), bool), "true or false (a JSON boolean)"),
        ("activation", gate.get("activation", "sigmoid") in GATE_ACTIVATIONS, f"one of {GATE_ACTIVATIONS}"),
        ("n_components", components is None or (_integer(components) and components > 0), "null or an integer > 0"),
        ("floor", _number(gate.get("floor", 0.0)) and 0 <= gate.get("floor", 0.0) < 1, "a number in [0, 1)"),
        ("reads", gate.get("reads", "output") in GATE_READS, f"one of {GATE_READS}"),
        ("width", gate.get("width") is None or (_integer(gate["width"]) and gate["width"] > 0), "a positive integer"),
        (
            "source",
            gate.get("source") is None or (isinstance(gate["source"], str) and gate.get("reads") == "context"),
            "null, or a module name for a gate reading the context",
        ),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise _fail(where, f"{field}.{key}", f"must be {expected}, got {gate.get(key)!r}")
    if gate.get("reads", "output") == "output" and gate.get("width") not in (None, entry["width"]):
        raise _fail(
            where, f"{field}.width", f"must be the layer's width ({entry['width']}) for a gate reading the output"
        )


def check_tensors(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Every tensor a layer needs is present, of the layer's width (the gate bias a single
    value), a floating-point type, and finite; no tensor is left over."""
    expected: dict[str, tuple[int, ...]] = {}
    for index, entry in enumerate(config["layers"]):
        prefix, width = f"layers.{index}", (entry["width"],)
        expected[f"{prefix}.map.bias"] = width
        if entry["map_kind"] == "affine":
            expected[f"{prefix}.map.weight"] = width
        if entry.get("support"):
            expected[f"{prefix}.map.support_lo"] = width
            expected[f"{prefix}.map.support_hi"] = width
        for kind in GATE_KINDS:  # a gate reading the module's input has the input's width
            if entry.get(kind) is not None:
                expected[f"{prefix}.{kind}.weight"] = (entry[kind].get("width") or entry["width"],)
                expected[f"{prefix}.{kind}.bias"] = (1,)
    for key, shape in expected.items():
        module = config["layers"][int(key.split(".")[1])]["module"]
        if key not in tensors:
            raise _fail(where, key, f"(layer {module!r}) is missing")
        value = tensors[key]
        if tuple(value.shape) != shape and not (shape == (1,) and value.numel() == 1):
            raise _fail(where, key, f"(layer {module!r}) has shape {tuple(value.shape)}, expected {shape}")
        if not value.is_floating_point():
            raise _fail(where, key, f"(layer {module!r}) has dtype {value.dtype}, expected a float type")
        if not bool(torch.isfinite(value).all()):
            raise _fail(where, key, f"(layer {module!r}) holds NaN or infinite values", "refit the steering")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise _fail(where, "the tensor file", f"holds tensors no layer uses ({', '.join(extra[:5])})")
