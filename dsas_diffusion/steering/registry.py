"""The loaded steerers of a pipeline or a language model, by name: one registry for both, with
one set of refusal rules and one provenance builder.

A class mixes in :class:`SteererRegistry`, says which kind of model it steers
(``steering_modality``: ``"image"`` or ``"text"``) and which module the steerers hook
(:meth:`SteererRegistry._steering_target`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .errors import IncompatibleSteeringError, SteeringError
from .fit import model_provenance
from .plan import CallPlan, GateArgument, StrengthArgument
from .resident import drop_resident
from .steerer import Steerer

__all__ = [
    "DEFAULT_STEERER",
    "SteererRegistry",
    "check_modality",
    "fit_provenance",
    "unload_by_name",
]

DEFAULT_STEERER = "default"
_KINDS = {"image": "an image pipeline's denoiser", "text": "a language model"}


def _fitted_on(steerer: Steerer) -> str | None:
    """The kind of model a steerer was fitted on, from its provenance (``None``: unknown)."""
    provenance = steerer.provenance
    if provenance.get("modality") in _KINDS:
        return provenance["modality"]
    return "image" if "pipeline_class" in provenance else None


def check_modality(steerer: Steerer, modality: str) -> None:
    """Refuse a steerer fitted on the other kind of model (image pipelines vs language models).

    Examples:
        >>> import torch
        >>> from dsas_diffusion.steering import HookPoint, SteeringLayer, SteeringMap
        >>> layer = SteeringLayer(HookPoint("0", layout="channels_last"), SteeringMap(torch.ones(2)))
        >>> check_modality(Steerer([layer], provenance={"modality": "text", "base_model": "shapes-lm"}), "image")
        Traceback (most recent call last):
        ...
        dsas_diffusion.errors.IncompatibleSteeringError: this steering was fitted on a language model (base model 'shapes-lm'); an image pipeline's denoiser cannot use it. Fit one with fit_steering.
    """
    fitted_on = _fitted_on(steerer)
    if fitted_on is not None and fitted_on != modality:
        base = steerer.provenance.get("base_model")
        where = f"{steerer.provenance['pipeline_class']}, " if "pipeline_class" in steerer.provenance else ""
        raise IncompatibleSteeringError(
            f"this steering was fitted on {_KINDS[fitted_on]} ({where}base model {base!r}); {_KINDS[modality]} "
            "cannot use it. Fit one with fit_steering."
        )


def fit_provenance(modality: str, model: nn.Module, owner: Any = None, **fields: Any) -> dict[str, Any]:
    """What a fitted steerer records of where it came from: the kind of model, its name or
    path (the ``owner``'s, e.g. a pipeline's, else the model's), its class, and ``fields``."""
    base = (
        getattr(owner, "name_or_path", None)
        or getattr(getattr(owner, "config", None), "_name_or_path", None)
        or model_provenance(model)["base_model"]
    )
    return {"modality": modality, "base_model": base or None, **fields}


def unload_by_name(steerers: dict[str, Any], name: str | None) -> None:
    """Remove the loaded steerer ``name`` from ``steerers``, or all of them (``None``); an
    unknown name raises :class:`SteeringError` listing the loaded ones."""
    if name is None:
        steerers.clear()
    elif name not in steerers:
        raise SteeringError(f"no steering named {name!r} is loaded; loaded: {sorted(steerers) or 'none'}")
    else:
        del steerers[name]


class SteererRegistry:
    """Load, unload and look up steerers by name (mixed into the pipelines and
    :class:`~dsas_diffusion.text.DSASLanguageModel`)."""

    #: the kind of model this steers: steerers fitted on the other kind are refused
    steering_modality = "image"

    def _steering_target(self) -> nn.Module:
        """The module the steerers hook (a denoiser, a language model)."""
        raise NotImplementedError

    def _steerer_table(self) -> dict[str, Steerer]:
        return self.__dict__.setdefault("_dsas_steerers", {})

    @property
    def steerers(self) -> dict[str, Steerer]:
        """The loaded steerers by name (a copy; use load / unload to change them)."""
        return dict(self._steerer_table())

    def load_steering(self, steering: Steerer | str | Path, name: str = DEFAULT_STEERER) -> Steerer:
        """Load a steering directory (or take a :class:`Steerer`) under ``name``.

        Refuses steering fitted on the other kind of model, or on another model (naming the
        first module that differs). Loading a second name steers both concepts at once, each
        with its own gates; loading an existing name replaces it.
        """
        steerer = steering if isinstance(steering, Steerer) else Steerer.from_pretrained(steering)
        check_modality(steerer, self.steering_modality)
        steerer.check_compatible(self._steering_target())
        return self._register(name, steerer)

    def unload_steering(self, name: str | None = None) -> None:
        """Remove the steerer ``name``, or all of them."""
        unload_by_name(self._steerer_table(), name)
        drop_resident(self)

    def _register(self, name: str, steerer: Steerer) -> Steerer:
        self._steerer_table()[name] = steerer
        drop_resident(self)  # a compiled model's resident hooks follow the loaded steerers
        return steerer

    def _plan(
        self,
        strength: StrengthArgument,
        gate: GateArgument = "dsas",
        *,
        prompts: int | None = None,
        repeat: int = 1,
        record_gates: bool = False,
    ) -> CallPlan:
        """The plan of a call on ``prompts`` prompts with ``repeat`` samples each, on the loaded
        steerers (:meth:`CallPlan.resolve`)."""
        return CallPlan.resolve(
            self._steerer_table(), strength, gate, prompts=prompts, repeat=repeat, record_gates=record_gates
        )
