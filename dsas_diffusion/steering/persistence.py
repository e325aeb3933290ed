"""Saving and loading steerers: ``steering_config.json`` (what every layer is, how it was
fitted, where it came from) plus ``steering.safetensors`` (the tensors). Never pickle.

Saves are atomic per file and checked as a pair: both files are written under temporary
names and renamed into place (other files in the directory are never touched), and the
config records the SHA-256 of the tensor file, which loading verifies, so a save that
failed half way can never be loaded as a mix of two steerers. Loading validates the config
against one schema and every tensor (:mod:`.schema`)."""

from __future__ import annotations

import hashlib
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
from safetensors.torch import load, save

from .._extras import require
from .errors import SteeringFileError
from .gate import LinearGate
from .hookpoints import HookPoint
from .layer import SteeringLayer
from .maps import SteeringMap
from .schema import GATE_KINDS, MAX_CONFIG_BYTES, check_config, check_tensors

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


def _gate_entry(gate: LinearGate | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {
        "accuracy": None if math.isnan(gate.accuracy) else gate.accuracy,
        "scale": gate.scale,
        "enabled": gate.enabled,
        "activation": gate.activation,
        "n_components": gate.n_components,
        "floor": gate.floor,
        **({} if gate.reads == "output" else {"reads": gate.reads, "width": gate.width}),
        **({} if gate.source is None else {"source": gate.source}),
    }


def _layer_entry(layer: SteeringLayer) -> dict[str, Any]:
    entry = {
        **layer.hook_point.to_dict(),
        "width": layer.width,
        "map_kind": layer.map.kind,
        "support": layer.map.has_support,
        "signature": layer.signature,
        "gate": _gate_entry(layer.gate),
    }
    if layer.sample_gate is not None:
        entry["sample_gate"] = _gate_entry(layer.sample_gate)
    return entry


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
        for kind in GATE_KINDS:
            gate = getattr(layer, kind)
            if gate is not None:
                tensors[f"{prefix}.{kind}.weight"] = gate.weight.detach()
                tensors[f"{prefix}.{kind}.bias"] = gate.bias.detach().reshape(1)
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


def _write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` beside ``path`` under a temporary name; return that name (renamed into
    place by the caller once every file of the save is written)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return temporary


def write_steering(
    directory: str | os.PathLike[str],
    layers: Sequence[SteeringLayer],
    *,
    strength: float,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``steering_config.json`` and ``steering.safetensors`` into ``directory``: both
    under temporary names first, then renamed into place, tensors before config; the config
    records the tensor file's SHA-256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    content = steering_config(layers, strength=strength, config=config, provenance=provenance)
    weights = save(_layer_tensors(layers), metadata={"format": FORMAT_NAME})
    content["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    text = json.dumps(content, indent=2, default=_json_default, allow_nan=False) + "\n"
    written: list[Path] = []
    try:
        written.append(_write_atomically(directory / WEIGHTS_NAME, weights))
        written.append(_write_atomically(directory / CONFIG_NAME, text.encode()))
        os.replace(written[0], directory / WEIGHTS_NAME)
        os.replace(written[1], directory / CONFIG_NAME)
    finally:
        for temporary in written:
            temporary.unlink(missing_ok=True)
    return directory


def read_steering(
    path: str | os.PathLike[str], revision: str | None = None
) -> tuple[list[SteeringLayer], dict[str, Any]]:
    """The layers of a saved steering and its config (``strength``, ``config``, ``provenance``...),
    from a directory or a hub repo id; :class:`SteeringFileError` naming the field for a file
    that breaks the schema, a tensor that is missing, misshapen or not finite, or a tensor
    file that is not the one its config was saved with."""
    directory = _resolve_directory(path, revision)
    config = _read_config(directory)
    data = _read_weights(directory)
    recorded = config.get("weights_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise SteeringFileError(
            f"{directory / WEIGHTS_NAME} is not the tensor file {CONFIG_NAME} was saved with (checksum mismatch): "
            "the directory mixes two saves or a file was altered; save the steering again"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as error:
        raise SteeringFileError(
            f"{directory / WEIGHTS_NAME} is corrupt ({error}); re-save the steering with save_pretrained"
        ) from error
    check_tensors(config, tensors, str(directory / WEIGHTS_NAME))
    layers = [_layer_from_entry(index, entry, tensors) for index, entry in enumerate(config["layers"])]
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
            require("loading a steering from the Hugging Face Hub", "diffusers", "huggingface_hub")
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
        except Exception as error:  # offline, unknown repo, ...
            raise SteeringFileError(
                f"no local directory {text!r}, and fetching it from the Hugging Face hub failed "
                f"({type(error).__name__}: {error}). Give the path of a directory saved with "
                "save_pretrained."
            ) from error
    raise SteeringFileError(f"no steering directory at {text!r}; give a directory saved with save_pretrained")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a steering file may hold")


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise SteeringFileError(
            f"{directory} has no {CONFIG_NAME}: it is not a steering directory saved with save_pretrained"
        )
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise SteeringFileError(
            f"{config_path} is {size} bytes, above the {MAX_CONFIG_BYTES} a steering config may have; "
            "it is not a steering saved with save_pretrained"
        )
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        problem = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise SteeringFileError(
            f"{config_path} is corrupt ({problem}); re-save the steering with save_pretrained"
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise SteeringFileError(
            f"{config_path} is not a {FORMAT_NAME} file; give a directory saved with Steerer.save_pretrained"
        )
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise SteeringFileError(
            f"{config_path} has format version {version}, newer than this library reads "
            f"({FORMAT_VERSION}); upgrade dsas-diffusion"
        )
    check_config(config, str(config_path))
    return config


def _read_weights(directory: Path) -> bytes:
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise SteeringFileError(
            f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the save was interrupted, save it again"
        )
    return weights_path.read_bytes()


def _layer_from_entry(index: int, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> SteeringLayer:
    """A layer from a config entry and tensors already checked by :mod:`.schema`."""
    prefix = f"layers.{index}"
    point = HookPoint(entry["module"], entry.get("output_index"), entry["layout"])
    support = (
        (tensors[f"{prefix}.map.support_lo"], tensors[f"{prefix}.map.support_hi"]) if entry.get("support") else None
    )
    weight = tensors[f"{prefix}.map.weight"] if entry["map_kind"] == "affine" else None
    steering_map = SteeringMap(tensors[f"{prefix}.map.bias"], weight=weight, support=support)
    gate, sample_gate = (_gate_from_entry(entry.get(kind), f"{prefix}.{kind}", tensors) for kind in GATE_KINDS)
    return SteeringLayer(point, steering_map, gate, signature=entry.get("signature"), sample_gate=sample_gate)


def _gate_from_entry(
    meta: Mapping[str, Any] | None, prefix: str, tensors: Mapping[str, torch.Tensor]
) -> LinearGate | None:
    if meta is None:
        return None
    accuracy = meta.get("accuracy")
    return LinearGate(
        tensors[f"{prefix}.weight"],
        tensors[f"{prefix}.bias"].reshape(()),
        accuracy=float("nan") if accuracy is None else accuracy,
        scale=meta.get("scale", 1.0),
        enabled=meta.get("enabled", True),
        activation=meta.get("activation", "sigmoid"),
        n_components=meta.get("n_components"),
        floor=meta.get("floor", 0.0),
        reads=meta.get("reads", "output"),
        source=meta.get("source"),
    )
