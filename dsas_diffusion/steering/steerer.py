"""The :class:`Steerer`: every hooked module's map and gate, applied, saved and loaded."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import IncompatibleSteeringError, SteeringFileError, UnknownModuleError
from .gate import LinearGate
from .hookpoints import HookPoint, resolve_module
from .hooks import SteeringSession, check_strength
from .layer import SteeringLayer, module_signature
from .maps import SteeringMap

__all__ = ["CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "Steerer"]

CONFIG_NAME = "steering_config.json"
WEIGHTS_NAME = "steering.safetensors"
FORMAT_NAME = "dsas-steering"
FORMAT_VERSION = 1


def _library_version() -> str:
    from .. import __version__

    return __version__


class Steerer(nn.Module):
    """Steering maps and DSAS gates for a set of hooked modules.

    Build one with :meth:`Steerer.fit` (or :func:`dsas_diffusion.steering.fit_steerer`),
    apply it with :meth:`apply` (a context manager) or :meth:`attach`, and persist it
    with :meth:`save_pretrained` / :meth:`from_pretrained`.

    Args:
        layers: the per-module :class:`SteeringLayer` objects, in forward order.
        strength: the default global strength λ.
        config: how it was fitted (map name, gate mode, thresholds...); saved as is.
        provenance: where it came from (base model, revision, prompts...); saved as is.

    Example:
        >>> import torch
        >>> from dsas_diffusion.steering import Steerer
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        >>> source = [torch.randn(4, 6, 8) + 1.0 for _ in range(8)]   # batches of 4 samples x 6 tokens
        >>> target = [torch.randn(4, 6, 8) for _ in range(8)]
        >>> control = [torch.randn(4, 6, 8) - 1.0 for _ in range(8)]
        >>> steerer = Steerer.fit(model, ["0"], source, target, control, map="caa", progress=False)
        >>> with steerer.apply(model, strength=1.0):
        ...     steered = model(source[0])
    """

    def __init__(
        self,
        layers: Sequence[SteeringLayer],
        *,
        strength: float = 1.0,
        config: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("a Steerer needs at least one layer")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise ValueError(f"two layers steer the same module: {names}")
        self.layers = nn.ModuleList(layers)
        self.strength = check_strength(strength)
        self.config: dict[str, Any] = dict(config or {})
        self.provenance: dict[str, Any] = dict(provenance or {})

    # -- inspection ----------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def has_gates(self) -> bool:
        return all(layer.gate is not None for layer in self.layers)

    def layer(self, name: str) -> SteeringLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise UnknownModuleError(f"this steerer has no layer {name!r}; it steers {self.module_names}")

    def gate_report(self) -> list[dict[str, Any]]:
        """One row per layer: module, width, map kind, gate accuracy, scale and whether on."""
        rows = []
        for layer in self.layers:
            gate = layer.gate
            rows.append(
                {
                    "module": layer.name,
                    "width": layer.width,
                    "map": layer.map.kind,
                    "accuracy": None if gate is None else gate.accuracy,
                    "scale": None if gate is None else gate.scale,
                    "enabled": True if gate is None else gate.enabled,
                }
            )
        return rows

    def __repr__(self) -> str:
        return (
            f"Steerer(map={self.config.get('map')!r}, gate={self.config.get('gate')!r}, "
            f"layers={len(self.layers)}, strength={self.strength})"
        )

    # -- fitting (implemented in fit.py) -------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: nn.Module,
        hook_points: Sequence[HookPoint | str],
        source_inputs: Sequence[Any],
        target_inputs: Sequence[Any],
        control_inputs: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> Steerer:
        """Fit maps and gates on ``model``; see :func:`dsas_diffusion.steering.fit_steerer`."""
        from .fit import fit_steerer

        return fit_steerer(model, hook_points, source_inputs, target_inputs, control_inputs, **kwargs)

    # -- applying ------------------------------------------------------------------------
    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`IncompatibleSteeringError` naming the first module that differs
        from the one this steerer was fitted on (missing, other class, other size)."""
        for layer in self.layers:
            try:
                module = resolve_module(model, layer.name)
            except UnknownModuleError as error:
                raise IncompatibleSteeringError(
                    f"this steering was made for a model with a module {layer.name!r}, which "
                    f"{type(model).__name__} lacks ({error}). Base model of the steering: "
                    f"{self.provenance.get('base_model', 'unknown')!r}."
                ) from None
            expected = layer.signature
            actual = module_signature(module)
            for key in ("module_class", "n_parameters"):
                if key in expected and expected[key] != actual[key]:
                    raise IncompatibleSteeringError(
                        f"module {layer.name!r} differs from the one this steering was made on: "
                        f"{key} is {actual[key]!r} here but {expected[key]!r} in the steering file "
                        f"(base model {self.provenance.get('base_model', 'unknown')!r}). Fit a "
                        "steering for this model instead."
                    )

    def attach(
        self,
        model: nn.Module,
        *,
        strength: float | None = None,
        gate: bool | None = None,
        record_gates: bool = False,
        scoped: bool = False,
        layers: Sequence[str] | None = None,
    ) -> SteeringSession:
        """Hook this steering into ``model`` until ``session.detach()``.

        Args:
            strength: λ (default: the steerer's ``strength``).
            gate: ``True`` for DSAS gating, ``False`` for uniform steering; ``None`` gates
                whenever the steerer has gates.
            record_gates: keep every gate value computed, in ``session.gate_maps``.
            scoped: act only on forward calls in this thread / asyncio task. ``attach``
                defaults to ``False`` (global until detached), ``apply`` to ``True``.
            layers: steer only these module names (default all).
        """
        self.check_compatible(model)
        gated = self.has_gates if gate is None else bool(gate)
        if gated and not self.has_gates:
            missing = [layer.name for layer in self.layers if layer.gate is None]
            raise IncompatibleSteeringError(
                f"gating requested but layers {missing} have no DSAS gate; refit with gate='dsas' "
                "or steer uniformly with gate=False"
            )
        chosen = list(self.layers)
        if layers is not None:
            chosen = [self.layer(name) for name in layers]
        session = SteeringSession(
            chosen,
            model,
            strength=self.strength if strength is None else strength,
            gated=gated,
            record_gates=record_gates,
            scoped=scoped,
        )
        return session.attach()

    def apply(self, model: nn.Module, **kwargs: Any) -> SteeringSession:
        """Like :meth:`attach` but context-scoped by default; use it in a ``with`` block::

        with steerer.apply(model, strength=0.8) as session:
            output = model(inputs)
        """
        kwargs.setdefault("scoped", True)
        return self.attach(model, **kwargs)

    # -- persistence ---------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            gate = layer.gate
            layers.append(
                {
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
                    },
                }
            )
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "strength": self.strength,
            "config": self.config,
            "provenance": self.provenance,
            "layers": layers,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for index, layer in enumerate(self.layers):
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

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write ``steering_config.json`` and ``steering.safetensors`` into ``save_directory``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.to_config()
        save_file(self._tensors(), str(directory / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, revision: str | None = None) -> Steerer:
        """Load a steerer saved by :meth:`save_pretrained`, from a directory or a hub repo id."""
        directory = _resolve_directory(path, revision)
        config = _read_config(directory)
        tensors = _read_tensors(directory)
        layers = []
        for index, entry in enumerate(config["layers"]):
            layers.append(_layer_from_entry(index, entry, tensors, directory))
        return cls(
            layers,
            strength=config.get("strength", 1.0),
            config=config.get("config", {}),
            provenance=config.get("provenance", {}),
        )


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
            )
        return SteeringLayer(point, steering_map, gate, signature=entry.get("signature"))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, SteeringFileError):
            raise
        raise SteeringFileError(
            f"layer {index} of {directory / CONFIG_NAME} is malformed ({error!r}); the file is corrupt"
        ) from error
