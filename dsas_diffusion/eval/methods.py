"""The methods an evaluation compares: a steering map and a gate, written ``<map>/<gate>``
(``caa/none`` is CAA steering every position alike, ``caa/dsas`` the same map through its
DSAS gates, ``lineas/e2e`` LinEAS with end-to-end gates)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..names import GATES, MAP_NAMES

__all__ = ["ALL_METHODS", "ConfigError", "Method", "parse_method"]


#: every map uniform and with DSAS, plus end-to-end DSAS + LinEAS
ALL_METHODS = (*(f"{m}/{g}" for m in MAP_NAMES for g in ("none", "dsas")), "lineas/e2e")


class ConfigError(ValueError):
    """An evaluation config that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class Method:
    """One steering method: a map and how it is gated.

    ``gating``: the gate vocabulary (:data:`~dsas_diffusion.names.GATES`): ``"none"`` (uniform
    steering, every position), ``"dsas"`` (the fitted DSAS gates) or ``"e2e"`` (LinEAS map and
    gates trained end to end).
    """

    map: str
    gating: str

    @property
    def name(self) -> str:
        return f"{self.map}/{self.gating}"

    @property
    def fit_gate(self) -> str:
        """The ``gate`` argument of ``fit_steering`` that fits this method's steerer; the
        uniform and DSAS methods of one map share a steerer (uniform ignores its gates)."""
        return "e2e" if self.gating == "e2e" else "dsas"

    @property
    def steerer_name(self) -> str:
        return f"{self.map}-{self.fit_gate}"

    @property
    def gate(self) -> str:  # the call's steering_gate
        return self.gating


def parse_method(text: str) -> Method:
    """``"linear-act/dsas"`` -> :class:`Method`; ``<map>/uniform`` is the former spelling of
    ``<map>/none`` (accepted for one release, with a ``DeprecationWarning``)."""
    parts = str(text).strip().lower().split("/")
    if len(parts) == 2 and parts[1] == "uniform":
        warnings.warn(f"method {text!r}: write '{parts[0]}/none' ('uniform' goes in the next release)",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        parts[1] = "none"
    if len(parts) != 2 or parts[0] not in MAP_NAMES or parts[1] not in GATES:
        raise ConfigError(
            f"unknown method {text!r}: write <map>/<gate> with map one of {', '.join(MAP_NAMES)} and "
            f"gate one of {', '.join(GATES)} ('none': uniform steering; e.g. 'linear-act/dsas'), or 'all'"
        )
    method = Method(*parts)
    if method.gating == "e2e" and method.map != "lineas":
        raise ConfigError(f"{text!r}: end-to-end gates are trained with the LinEAS map only; use 'lineas/e2e'")
    return method
