"""The methods an evaluation compares.

Steering methods are a map and a gate, written ``<map>/<gate>``: ``caa/none`` is CAA steering
every position alike, ``caa/dsas`` the same map through its DSAS gates, ``lineas/e2e`` LinEAS
with end-to-end gates, and ``caa/prompt`` the map on the whole image when a classifier on the
prompt's embedding says the concept is asked for (a prompt-level gate: no activation of the
denoiser is read). Their strength is λ.

Baselines a user would pick instead of steering: ``negative-prompt`` (the concept as the
pipeline's ``negative_prompt``; its strength is the guidance scale) and ``sld`` (diffusers'
Safe Latent Diffusion with the concept as ``safety_concept``; its strength is
``sld_guidance_scale``) for images, ``bad-words`` (the concept's words banned at decoding;
one setting, 1) for text. They fit nothing and are swept over a fixed grid
(``sweep.grids``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import DSASDeprecationWarning
from ..names import GATES, MAP_NAMES

__all__ = ["ALL_METHODS", "BASELINES", "ConfigError", "Method", "parse_method"]


#: every map uniform and with DSAS, plus end-to-end DSAS + LinEAS
ALL_METHODS = (*(f"{m}/{g}" for m in MAP_NAMES for g in ("none", "dsas")), "lineas/e2e")
#: the methods that steer nothing: a negative prompt, Safe Latent Diffusion, banned words
BASELINES = ("negative-prompt", "sld", "bad-words")
#: the baselines for images; ``bad-words`` is for language models
IMAGE_BASELINES = ("negative-prompt", "sld")
#: the evaluation's gate word for a prompt-level gate (not a gate of the steerer)
PROMPT_GATE = "prompt"


class ConfigError(ValueError):
    """An evaluation config that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class Method:
    """One method: a steering map and how it is gated, or a baseline.

    ``gating``: the gate vocabulary (:data:`~dsas_diffusion.names.GATES`): ``"none"`` (uniform
    steering, every position), ``"dsas"`` (the fitted DSAS gates) or ``"e2e"`` (LinEAS map and
    gates trained end to end); or ``"prompt"`` (the prompt-level gate). A baseline has
    ``map=""`` and its name as ``gating``.
    """

    map: str
    gating: str

    @property
    def name(self) -> str:
        return self.gating if self.is_baseline else f"{self.map}/{self.gating}"

    @property
    def is_baseline(self) -> bool:
        """A method that fits and steers nothing (``negative-prompt``, ``sld``, ``bad-words``)."""
        return self.map == ""

    @property
    def prompt_gated(self) -> bool:
        return self.gating == PROMPT_GATE

    @property
    def fit_gate(self) -> str:
        """The ``gate`` argument of ``fit_steering`` that fits this method's steerer; the
        uniform, DSAS and prompt-gated methods of one map share a steerer (uniform steering
        ignores its gates)."""
        return "e2e" if self.gating == "e2e" else "dsas"

    @property
    def steerer_name(self) -> str | None:
        return None if self.is_baseline else f"{self.map}-{self.fit_gate}"

    @property
    def gate(self) -> str:
        """The call's ``steering_gate``: a prompt-level gate steers uniformly where it opens."""
        return "none" if self.prompt_gated else self.gating

    @property
    def uniform(self) -> Method:
        """The uniform method of the same map (what a prompt-level gate runs where it opens)."""
        return Method(self.map, "none")


def parse_method(text: str) -> Method:
    """``"linear-act/dsas"`` -> :class:`Method`; ``<map>/uniform`` is the former spelling of
    ``<map>/none`` (accepted for one release, with a ``DSASDeprecationWarning``).

    Examples:
        >>> parse_method("caa/prompt").gate, parse_method("sld").is_baseline
        ('none', True)
    """
    word = str(text).strip().lower()
    if word in BASELINES:
        return Method("", word)
    parts = word.split("/")
    if len(parts) == 2 and parts[1] == "uniform":
        message = f"method {text!r}: write '{parts[0]}/none' ('uniform' goes in the next release)"
        warnings.warn(message, DSASDeprecationWarning, stacklevel=2)
        parts[1] = "none"
    if len(parts) != 2 or parts[0] not in MAP_NAMES or parts[1] not in (*GATES, PROMPT_GATE):
        raise ConfigError(
            f"unknown method {text!r}: write <map>/<gate> with map one of {', '.join(MAP_NAMES)} and "
            f"gate one of {', '.join((*GATES, PROMPT_GATE))} ('none': uniform steering, 'prompt': a "
            f"prompt-level gate; e.g. 'linear-act/dsas'), a baseline ({', '.join(BASELINES)}), or 'all'"
        )
    method = Method(*parts)
    if method.gating == "e2e" and method.map != "lineas":
        raise ConfigError(f"{text!r}: end-to-end gates are trained with the LinEAS map only; use 'lineas/e2e'")
    return method
