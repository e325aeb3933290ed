"""A call's steering, resolved once: which steerers act, at which strength, through their gates
or not, and whether their gates are recorded.

Every steered call (a pipeline call, :class:`~dsas_diffusion.text.DSASLanguageModel`'s
``generate``, a compiled model's resident sessions, :meth:`Steerer.attach`) turns its
arguments into a :class:`CallPlan` with :meth:`CallPlan.resolve` and then only reads it: the
strengths are checked here (:func:`~.strengths.check_strengths` and each steerer's bound), the
gate words normalised here (:func:`gate_word`), and the sessions opened from here
(:meth:`CallPlan.open`).

Examples:
    >>> import torch
    >>> from dsas_diffusion.steering import HookPoint, Steerer, SteeringLayer, SteeringMap
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> steerer = Steerer([SteeringLayer(HookPoint("0", layout="channels_last"), SteeringMap(torch.ones(2)))])
    >>> plan = CallPlan.resolve({"shift": steerer}, {"shift": [0.0, 2.0]}, "none", prompts=2)
    >>> plan.calls["shift"].strength, plan.calls["shift"].gated, list(plan.active)
    ((0.0, 2.0), False, ['shift'])
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..names import GATES
from .errors import DSASDeprecationWarning, IncompatibleSteeringError, SteeringError
from .strengths import Strength, check_strengths, is_steering, per_sample

if TYPE_CHECKING:
    from .hooks import Rows, SteeringSession
    from .steerer import Steerer

__all__ = ["CallPlan", "SteererCall", "bounded_strength", "gate_word", "gating"]

#: a call's strength argument: one λ, one per prompt, or either by steerer name (``None``: the saved ones)
StrengthArgument = float | Sequence[float] | Mapping[str, Any] | None
#: a call's gate argument: one word, or one by steerer name
GateArgument = str | bool | Mapping[str, str] | None


def gate_word(value: str | bool | None, where: str = "gate") -> str | None:
    """A call's gate in the one vocabulary (:data:`~dsas_diffusion.names.GATES`): ``"dsas"`` or
    ``"e2e"`` steer through the steerers' gates, ``"none"`` steers uniformly; ``None`` stays
    ``None``. ``True`` / ``False`` are the former spelling: accepted for one release with a
    :class:`~dsas_diffusion.errors.DSASDeprecationWarning`.

    Examples:
        >>> gate_word("none"), gate_word(None)
        ('none', None)
    """
    if value is None or (isinstance(value, str) and value in GATES):
        return value
    if isinstance(value, bool):
        word = "dsas" if value else "none"
        warnings.warn(
            f"{where}={value} is deprecated and goes in the next release; use {where}={word!r} "
            "('dsas' or 'e2e': through the gates, 'none': uniform steering)",
            DSASDeprecationWarning,
            stacklevel=4,
        )
        return word
    raise SteeringError(f"{where} must be one of {GATES} ('none': uniform steering), got {value!r}")


def gating(steerer: Steerer, word: str | None, steering: bool = True) -> bool:
    """Whether ``steerer`` steers through its gates under the gate ``word`` (``None``: through
    the gates if it has any); :class:`IncompatibleSteeringError` if a call that steers
    (``steering``) asks for gates some layer lacks. A call that does not steer is gated where it
    could be, so that a compiled graph traced for it is the one a steered call reuses."""
    has_gates = steerer.has_gates
    if not steering:
        return word != "none" and has_gates
    gated = has_gates if word is None else word != "none"
    if gated and not has_gates:
        missing = [layer.name for layer in steerer.layers if layer.gate is None]
        raise IncompatibleSteeringError(
            f"gating requested but layers {missing} have no DSAS gate; refit with gate='dsas' "
            "or steer uniformly with gate='none'"
        )
    return gated


def bounded_strength(steerer: Steerer, value: float | Sequence[float], prompts: int | None = None) -> Strength:
    """``value`` checked (:func:`~.strengths.check_strengths`: a float, or a tuple of one λ per
    sample, ``prompts`` of them when given) and within ``steerer``'s ``max_strength``, else
    :class:`SteeringError`."""
    strength = check_strengths(value, prompts)
    largest = max(abs(v) for v in strength) if isinstance(strength, tuple) else abs(strength)
    bound = steerer.max_strength
    if bound is not None and largest > bound:
        raise SteeringError(
            f"steering strength {largest:g} is above this steering's bound {bound:g}: beyond it the "
            "few unrelated positions whose gate opens are steered hard enough to change unrelated outputs, and "
            "outputs with the concept are long destroyed. Use a strength within the bound, or fit with "
            "max_strength=None to lift it."
        )
    return strength


@dataclass(frozen=True)
class SteererCall:
    """One steerer in one call: its strength (checked, one λ per sample where given per
    prompt), its gate word, whether it steers through its gates and whether they are recorded."""

    name: str
    steerer: Steerer
    strength: Strength
    gate: str | None
    gated: bool
    record_gates: bool = False

    @classmethod
    def of(
        cls,
        steerer: Steerer,
        strength: float | Sequence[float] | None = None,
        gate: str | bool | None = None,
        *,
        name: str = "",
        record_gates: bool = False,
    ) -> SteererCall:
        """``steerer`` at ``strength`` (default: its saved one) with ``gate`` (``None``: through
        its gates if it has any), checked; gates asked of a steerer without them are refused
        also at λ 0."""
        value = bounded_strength(steerer, steerer.strength if strength is None else strength)
        word = gate_word(gate)
        return cls(name, steerer, value, word, gating(steerer, word), record_gates)

    @property
    def acts(self) -> bool:
        """Whether this call needs the steerer's hooks: it steers, or records its gates."""
        return is_steering(self.strength) or self.record_gates

    def session(
        self,
        model: nn.Module,
        *,
        scoped: bool = True,
        activate: bool = True,
        layers: Sequence[str] | None = None,
        rows: Rows = None,
    ) -> SteeringSession:
        """Hook the steerer into ``model`` for this call (attached; detach it, or use it as a
        context manager)."""
        from .hooks import SteeringSession  # (hooks read plans' values only)

        steerer = self.steerer
        steerer.check_compatible(model)
        chosen = list(steerer.layers) if layers is None else [steerer.layer(name) for name in layers]
        session = SteeringSession(
            chosen,
            model,
            strength=self.strength,
            gated=self.gated,
            record_gates=self.record_gates,
            scoped=scoped,
            decision=steerer.new_decision() if self.gated else None,
        )
        session.batch_rows = rows
        return session.attach(activate=activate)


@dataclass(frozen=True)
class CallPlan:
    """Every loaded steerer's part in one call, by name (in loading order)."""

    calls: dict[str, SteererCall] = field(default_factory=dict)
    record_gates: bool = False

    @classmethod
    def resolve(
        cls,
        steerers: Mapping[str, Steerer],
        strength: StrengthArgument = None,
        gate: GateArgument = "dsas",
        *,
        prompts: int | None = None,
        repeat: int = 1,
        record_gates: bool = False,
    ) -> CallPlan:
        """The plan of a call with these arguments on the loaded ``steerers``.

        Args:
            strength: one λ for all, one λ per prompt (a sequence of ``prompts`` numbers), a
                ``{name: λ or [λ per prompt]}`` mapping (the others at their saved strength),
                or ``None`` (every saved strength).
            gate: one word for all (:func:`gate_word`; ``None`` is ``"dsas"``), or a ``{name:
                word}`` mapping (the others ``"dsas"``).
            repeat: the samples of each prompt (``num_images_per_prompt``, beams), adjacent
                rows: a per-prompt λ is repeated for each (:func:`~.strengths.per_sample`).
            record_gates: record the gates of every steerer whose gates are on, also at λ 0.

        A name that is not loaded raises :class:`SteeringError`.

        Examples:
            >>> class Saved:
            ...     strength, max_strength, has_gates = 1.0, None, True
            >>> plan = CallPlan.resolve({"a": Saved(), "b": Saved()}, {"a": 2.0}, {"b": "none"})
            >>> [(call.strength, call.gate, call.gated) for call in plan.calls.values()]
            [(2.0, 'dsas', True), (1.0, 'none', False)]
        """
        for argument, value in (("steering_strength", strength), ("steering_gate", gate)):
            unknown = sorted(set(value) - set(steerers)) if isinstance(value, Mapping) else []
            if unknown:
                raise SteeringError(f"{argument} names {unknown}, which are not loaded; loaded: {sorted(steerers)}")
        if isinstance(gate, Mapping):
            words = {name: gate_word(gate.get(name, "dsas"), "steering_gate") or "dsas" for name in steerers}
        else:  # (checked also where no steerer is loaded)
            words = dict.fromkeys(steerers, gate_word(gate, "steering_gate") or "dsas")
        calls = {}
        for name, steerer in steerers.items():
            asked = strength.get(name, steerer.strength) if isinstance(strength, Mapping) else strength
            value = per_sample(bounded_strength(steerer, steerer.strength if asked is None else asked, prompts), repeat)
            gated = gating(steerer, words[name], is_steering(value) or record_gates)
            calls[name] = SteererCall(name, steerer, value, words[name], gated, record_gates)
        return cls(calls, record_gates)

    @functools.cached_property
    def active(self) -> dict[str, SteererCall]:
        """The steerers this call hooks: those that steer, or whose gates are recorded."""
        return {name: call for name, call in self.calls.items() if call.acts}

    @property
    def steering(self) -> bool:
        """Whether any steerer steers in this call."""
        return any(is_steering(call.strength) for call in self.calls.values())

    def open(self, model: nn.Module, stack: contextlib.ExitStack, *, rows: Rows = None) -> dict[str, SteeringSession]:
        """Hook every active steerer into ``model`` (scoped to this thread / task) until
        ``stack`` closes; the sessions by name."""
        return {name: stack.enter_context(call.session(model, rows=rows)) for name, call in self.active.items()}
