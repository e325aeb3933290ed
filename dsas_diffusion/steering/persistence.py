"""Saving and loading steerers: ``steering_config.json`` (what every layer is, how it was
fitted, where it came from) plus ``steering.safetensors`` (the tensors). Never pickle."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SteeringFileError
from .gate import LinearGate
from .hookpoints import HookPoint
from .layer import SteeringLayer
from .maps import SteeringMap

__all__ = ["CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "read_steering", "write_steering"]

CONFIG_NAME = "steering_config.json"
WEIGHTS_NAME = "steering.safetensors"
FORMAT_NAME = "dsas-steering"
FORMAT_VERSION = 1


def library_version() -> str:
    """The installed dsas-diffusion version (from the package metadata)."""
    try:
        return metadata.version("dsas-diffusion")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _layer_entry(layer: SteeringLayer) -> dict[str, Any]:
    gate = layer.gate
    return {
        **layer.hook_point.to_dict(),
        "width": layer.width,
        "map_kind": layer.map.kind,
        "support": layer.map.has_support,
        "signature": layer.signature,
        "gate": None
        if gate is None
        else {
            "accuracy": None if math.isnan(gate.accuracy) else gate.accuracy,
            "scale": gate.scale,
            "enabled": gate.enabled,
            "activation": gate.activation,
            "n_components": gate.n_components,
            "floor": gate.floor,
        },
    }


def _layer_tensors(layers: Sequence[SteeringLayer]) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, layer in enumerate(layers):
        prefix = f"layers.{index}"
        tensors[f"{prefix}.map.bias"] = layer.map.bias.detach()
        if layer.map.weight is not None:
            tensors[f"{prefix}.map.weight"] = layer.map.weight.detach()
        if layer.map.has_support:
            tensors[f"{prefix}.map.support_lo"] = layer.map.support_lo
            tensors[f"{prefix}.map.support_hi"] = layer.map.support_hi
        if layer.gate is not None:
            tensors[f"{prefix}.gate.weight"] = layer.gate.weight.detach()
            tensors[f"{prefix}.gate.bias"] = layer.gate.bias.detach().reshape(1)
    return {key: value.float().cpu().contiguous() for key, value in tensors.items()}


def steering_config(
    layers: Sequence[SteeringLayer],
    *,
    strength: float,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """The content of ``steering_config.json`` for these layers."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "strength": strength,
        "config": dict(config),
        "provenance": dict(provenance),
        "layers": [_layer_entry(layer) for layer in layers],
    }


def write_steering(
    directory: str | os.PathLike[str],
    layers: Sequence[SteeringLayer],
    *,
    strength: float,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``steering_config.json`` and ``steering.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    content = steering_config(layers, strength=strength, config=config, provenance=provenance)
    save_file(_layer_tensors(layers), str(directory / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
    (directory / CONFIG_NAME).write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
    return directory


def read_steering(
    path: str | os.PathLike[str], revision: str | None = None
) -> tuple[list[SteeringLayer], dict[str, Any]]:
    """The layers of a saved steering and its config (``strength``, ``config``, ``provenance``...),
    from a directory or a hub repo id."""
    directory = _resolve_directory(path, revision)
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    layers = [_layer_from_entry(index, entry, tensors, directory) for index, entry in enumerate(config["layers"])]
    return layers, config


def _json_default(value: Any) -> Any:
    if isinstance(value, (Path, HookPoint)):
        return str(value)
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a steering config")


def _resolve_directory(path: str | os.PathLike[str], revision: str | None) -> Path:
    directory = Path(path)
    if directory.is_dir():
        return directory
    if directory.exists():
        raise SteeringFileError(f"{str(path)!r} is a file; pass the directory that holds {CONFIG_NAME}")
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
        except Exception as error:  # offline, unknown repo, ...
            raise SteeringFileError(
                f"no local directory {text!r}, and fetching it from the Hugging Face hub failed "
                f"({type(error).__name__}: {error}). Give the path of a directory saved with "
                "save_pretrained."
            ) from error
    raise SteeringFileError(f"no steering directory at {text!r}; give a directory saved with save_pretrained")


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise SteeringFileError(
            f"{directory} has no {CONFIG_NAME}: it is not a steering directory saved with save_pretrained"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SteeringFileError(
            f"{config_path} is corrupt ({error}); re-save the steering with save_pretrained"
        ) from error
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise SteeringFileError(
            f"{config_path} is not a {FORMAT_NAME} file; give a directory saved with Steerer.save_pretrained"
        )
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise SteeringFileError(
            f"{config_path} has format version {config['format_version']}, newer than this library reads "
            f"({FORMAT_VERSION}); upgrade dsas-diffusion"
        )
    if not isinstance(config.get("layers"), list) or not config["layers"]:
        raise SteeringFileError(f"{config_path} lists no layers; re-save the steering with save_pretrained")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise SteeringFileError(
            f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the save was interrupted, save it again"
        )
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise SteeringFileError(
            f"{weights_path} is corrupt ({error}); re-save the steering with save_pretrained"
        ) from error


def _layer_from_entry(
    index: int, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], directory: Path
) -> SteeringLayer:
    prefix = f"layers.{index}"

    def tensor(key: str) -> torch.Tensor:
        if f"{prefix}.{key}" not in tensors:
            raise SteeringFileError(
                f"{directory / WEIGHTS_NAME} lacks tensor {prefix}.{key} of layer {entry.get('module')!r}; "
                "the file is corrupt, save it again"
            )
        value = tensors[f"{prefix}.{key}"]
        if key != "gate.bias" and value.shape != (entry["width"],):
            raise SteeringFileError(
                f"{prefix}.{key} has shape {tuple(value.shape)}, expected ({entry['width']},); the file is corrupt"
            )
        return value

    try:
        point = HookPoint(entry["module"], entry.get("output_index"), entry["layout"])
        support = (tensor("map.support_lo"), tensor("map.support_hi")) if entry.get("support") else None
        weight = tensor("map.weight") if entry["map_kind"] == "affine" else None
        steering_map = SteeringMap(tensor("map.bias"), weight=weight, support=support)
        gate = None
        if entry.get("gate") is not None:
            meta = entry["gate"]
            accuracy = meta.get("accuracy")
            gate = LinearGate(
                tensor("gate.weight"),
                tensor("gate.bias").reshape(()),
                accuracy=float("nan") if accuracy is None else accuracy,
                scale=meta.get("scale", 1.0),
                enabled=meta.get("enabled", True),
                activation=meta.get("activation", "sigmoid"),
                n_components=meta.get("n_components"),
                floor=meta.get("floor", 0.0),
            )
        return SteeringLayer(point, steering_map, gate, signature=entry.get("signature"))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, SteeringFileError):
            raise
        raise SteeringFileError(
            f"layer {index} of {directory / CONFIG_NAME} is malformed ({error!r}); the file is corrupt"
        ) from error
