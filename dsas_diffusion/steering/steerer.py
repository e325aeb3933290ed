"""The :class:`Steerer`: every hooked module's map and gate, applied, saved and loaded."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FitConfig
from .decision import DECISION_KEY, SampleDecision
from .errors import IncompatibleSteeringError, SteeringError, UnknownModuleError
from .hookpoints import resolve_module
from .hooks import SteeringSession
from .layer import SteeringLayer, module_signature
from .persistence import read_steering, write_steering
from .plan import SteererCall
from .strengths import check_strength

__all__ = ["Steerer"]


class Steerer(nn.Module):
    """Steering maps and DSAS gates for a set of hooked modules.

    Build one with :func:`dsas_diffusion.steering.fit_steerer` (or a pipeline's
    ``fit_steering``), apply it with :meth:`apply` (a context manager) or :meth:`attach`, and persist it
    with :meth:`save_pretrained` / :meth:`from_pretrained`.

    Args:
        layers: the per-module :class:`SteeringLayer` objects, in forward order.
        strength: the default global strength λ.
        config: how it was fitted (map name, gate mode, thresholds...); saved as is.
        provenance: where it came from (base model, revision, prompts...); saved as is.

    Examples:
        >>> import torch
        >>> from dsas_diffusion.steering import fit_steerer
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        >>> source = [torch.randn(4, 6, 8) + 1.0 for _ in range(8)]   # batches of 4 samples x 6 tokens
        >>> target = [torch.randn(4, 6, 8) for _ in range(8)]
        >>> control = [torch.randn(4, 6, 8) - 1.0 for _ in range(8)]
        >>> steerer = fit_steerer(model, ["0"], source, target, control, map="caa", progress=False)
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
    def max_strength(self) -> float | None:
        """The largest |λ| this steering accepts (``config["max_strength"]``), or ``None``."""
        bound = self.config.get("max_strength")
        return None if bound is None else float(bound)

    @property
    def steering_steps(self) -> tuple[float, float] | None:
        """The denoising steps a pipeline steers in unless a call says otherwise
        (``config["steering_steps"]``: ``(start, end)`` fractions of the schedule), or ``None``
        for every step."""
        window = self.config.get("steering_steps")
        return None if window is None else (float(window[0]), float(window[1]))

    @property
    def decision_threshold(self) -> float | None:
        """The threshold of the per-sample decision taken over layers and the denoising steps
        before the steering window (``FitConfig(sample_decision="accumulated")``, calibrated by a
        pipeline's ``fit_steering``), or ``None`` where each layer's sample gate decides alone."""
        saved = self.config.get(DECISION_KEY)
        return None if saved is None or saved.get("threshold") is None else float(saved["threshold"])

    def new_decision(self) -> SampleDecision | None:
        """A fresh per-sample decision for one call, or ``None`` (each layer decides alone);
        :class:`SteeringError` if the decision was never calibrated."""
        saved = self.config.get(DECISION_KEY)
        if saved is None:
            return None
        if saved.get("threshold") is None:
            raise SteeringError(
                "this steerer decides per sample over layers and denoising steps (sample_decision='accumulated' or "
                "'stacked') but its decision was never calibrated: fit it with a diffusion pipeline's fit_steering, which "
                "calibrates it on the control prompts' denoising runs"
            )
        return SampleDecision(
            float(saved["threshold"]), saved.get("scales"), saved.get("weights"), saved.get("bias", 0.0)
        )

    @property
    def has_gates(self) -> bool:
        return all(layer.gate is not None for layer in self.layers)

    def non_finite_layers(self) -> list[str]:
        """Names of the layers holding a NaN or infinite value in any of their tensors."""
        return [
            layer.name
            for layer in self.layers
            if not all(bool(torch.isfinite(t).all()) for t in layer.state_dict().values() if t.is_floating_point())
        ]

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

    @property
    def fit_config(self) -> FitConfig:
        """The settings this steerer was fitted with (:class:`~dsas_diffusion.config.FitConfig`),
        read from its config; for files saved before the config was recorded, rebuilt from the
        settings they stored."""
        return FitConfig.from_saved_config(self.config)

    def __repr__(self) -> str:
        return (
            f"Steerer(map={self.config.get('map')!r}, gate={self.config.get('gate')!r}, "
            f"layers={len(self.layers)}, strength={self.strength})"
        )

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
        strength: float | Sequence[float] | None = None,
        gate: str | bool | None = None,
        record_gates: bool = False,
        scoped: bool = False,
        layers: Sequence[str] | None = None,
        activate: bool = True,
    ) -> SteeringSession:
        """Hook this steering into ``model`` until ``session.detach()``.

        Args:
            strength: λ (default: the steerer's ``strength``), or one λ per sample of the
                batch (see :mod:`~dsas_diffusion.steering.strengths`).
            gate: ``"dsas"`` (or ``"e2e"``) to steer through the gates, ``"none"`` for uniform
                steering; ``None`` gates whenever the steerer has gates.
            record_gates: keep every gate value computed, in ``session.gate_maps``.
            scoped: act only on forward calls in this thread / asyncio task. ``attach``
                defaults to ``False`` (global until detached), ``apply`` to ``True``.
            layers: steer only these module names (default all).
            activate: with ``scoped``, act from now on in this context (``True``) or only
                inside :func:`~dsas_diffusion.steering.hooks.active_in_context` blocks.
        """
        call = SteererCall.of(self, strength, gate, record_gates=record_gates)
        return call.session(model, scoped=scoped, activate=activate, layers=layers)

    def apply(self, model: nn.Module, **kwargs: Any) -> SteeringSession:
        """Like :meth:`attach` but context-scoped by default; use it in a ``with`` block::

        with steerer.apply(model, strength=0.8) as session:
            output = model(inputs)
        """
        kwargs.setdefault("scoped", True)
        return self.attach(model, **kwargs)

    # -- persistence (steering/persistence.py) -------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write ``steering_config.json`` and ``steering.safetensors`` into ``save_directory``."""
        return write_steering(
            save_directory, list(self.layers), strength=self.strength, config=self.config, provenance=self.provenance
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, revision: str | None = None) -> Steerer:
        """Load a steerer saved by :meth:`save_pretrained`, from a directory or a hub repo id."""
        layers, config = read_steering(path, revision)
        return cls(
            layers,
            strength=config.get("strength", 1.0),
            config=config.get("config", {}),
            provenance=config.get("provenance", {}),
        )
