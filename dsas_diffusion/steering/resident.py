"""Steering kept attached to a compiled model across calls, changed per call through what the
traced hooks read.

Dynamo traces forward hooks into a compiled graph, but it guards a module's hook dictionary
only if it was non-empty when traced: hooks added to a module traced without any are never
run by the graph already compiled, and a hook replaced on every call (as per-call sessions
do) recompiles on every call. :class:`ResidentSteering` therefore attaches one scoped session
per steerer once and keeps it while the set of steerers stays the same. A call changes only:

* λ, a 0-dim tensor per steerer filled in place (no guard on its value): a new strength, a
  steerer switched off (λ = 0) and a new call reuse the graph;
* which sessions act in the calling context (a ``ContextVar`` dynamo guards by value): one
  graph for steered calls and one for unsteered calls;
* gating on or off and which batch rows are steered (plain attributes, guarded): switching
  either compiles one more graph, once.

Attaching to a model that runs compiled drops dynamo's compiled code once
(:func:`~.compiled.forget_compiled_code`), so that no graph traced without the hooks runs on.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from torch import nn

from .compiled import forget_compiled_code, is_compiled, unwrap_compiled
from .errors import ActivationError
from .hooks import Rows, SteeringSession, active_in_context
from .plan import CallPlan
from .strengths import Strength, is_steering

if TYPE_CHECKING:
    from .steerer import Steerer

__all__ = ["ResidentSteering", "drop_resident", "resident_for"]

_KEY = "_dsas_resident"


class ResidentSteering:
    """One scoped session per steerer, attached once to ``model`` and steered call by call.

    Examples:
        >>> import torch
        >>> from dsas_diffusion.steering import HookPoint, Steerer, SteeringLayer, SteeringMap
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> layer = SteeringLayer(HookPoint("0", layout="channels_last"), SteeringMap(torch.ones(2)))
        >>> resident = ResidentSteering(model, {"shift": Steerer([layer])})
        >>> x = torch.zeros(1, 2)
        >>> with resident.steer({"shift": 2.0}, gate="none"):
        ...     steered = model(x)
        >>> torch.equal(steered, model(x) + 2.0)  # outside the block the hooks let calls through
        True
        >>> resident.detach()
    """

    def __init__(self, model: nn.Module, steerers: Mapping[str, Steerer]) -> None:
        self.model = unwrap_compiled(model)
        self.steerers = dict(steerers)
        self.sessions: dict[str, SteeringSession] = {}
        # every steerer runs at every call (λ = 0 when off), and 0 times NaN is NaN
        broken = [f"{name}:{layer}" for name, steerer in self.steerers.items() for layer in steerer.non_finite_layers()]
        if broken:
            raise ActivationError(f"layers {broken} hold NaN or infinite values: refit or reload the steering")
        self._lock = threading.Lock()
        try:
            for name, steerer in self.steerers.items():
                self.sessions[name] = steerer.attach(self.model, strength=0.0, gate=None, scoped=True, activate=False)
        except BaseException:
            self.detach()
            raise
        if is_compiled(model):
            forget_compiled_code()

    def serves(self, model: nn.Module, steerers: Mapping[str, Steerer]) -> bool:
        """Whether this is attached to ``model`` with exactly these steerers under these names."""
        return (
            bool(self.sessions)
            and self.model is unwrap_compiled(model)
            and self.steerers.keys() == steerers.keys()
            and all(self.steerers[name] is steerer for name, steerer in steerers.items())
        )

    @contextlib.contextmanager
    def steer(
        self,
        strengths: Mapping[str, Strength],
        *,
        gate: str | bool | Mapping[str, str] | None = "dsas",
        batch_rows: Rows = None,
    ) -> Iterator[dict[str, SteeringSession]]:
        """Steer the forward calls made in this thread / task inside the block: each steerer at
        its strength in ``strengths`` (missing names: 0; one λ or one per sample), gated or
        not (``gate``: one word, one per name, or ``None``: through the gates where a steerer has
        them), on ``batch_rows``. Yields the sessions of
        the steerers with a non-zero strength."""
        unknown = sorted(set(strengths) - set(self.sessions))
        if unknown:
            raise KeyError(f"no resident session for {unknown}; attached: {sorted(self.sessions)}")
        asked = {name: strengths.get(name, 0.0) for name in self.sessions}
        if gate is None:  # through the gates where a steerer has them
            gate = {name: "dsas" if steerer.has_gates else "none" for name, steerer in self.steerers.items()}
        with self.run(CallPlan.resolve(self.steerers, asked, gate), batch_rows) as sessions:
            yield sessions

    @contextlib.contextmanager
    def run(self, plan: CallPlan, batch_rows: Rows = None) -> Iterator[dict[str, SteeringSession]]:
        """Steer the forward calls made in this thread / task inside the block as ``plan`` says
        (made on these steerers), on ``batch_rows``. Yields the sessions of the steerers that
        steer. Calls from several threads take turns (the strengths are shared tensors)."""
        with self._lock:
            for name, session in self.sessions.items():
                call = plan.calls[name]
                session._strengths.set(call.strength)
                session.gated = call.gated
                session.batch_rows = batch_rows
            with active_in_context(self.sessions.values()):
                yield {
                    name: session for name, session in self.sessions.items() if is_steering(plan.calls[name].strength)
                }

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        for session in self.sessions.values():
            session.detach()
        self.sessions.clear()


class _Resident(Protocol):
    def serves(self, model: nn.Module, steerers: Mapping[str, Steerer]) -> bool: ...

    def detach(self) -> None: ...


R = TypeVar("R", bound=_Resident)


def resident_for(
    owner: Any, model: nn.Module, steerers: Mapping[str, Steerer], make: Callable[[nn.Module, dict], R]
) -> R:
    """``owner``'s (a pipeline's, a language model's) resident steering of ``model`` with these
    steerers, made by ``make(model, steerers)`` and kept in ``owner.__dict__``; one for other
    steerers is detached first. The hooks are removed when ``owner`` is garbage-collected."""
    entry = owner.__dict__.get(_KEY)
    current = None if entry is None else entry[0]
    if current is not None and current.serves(model, steerers):
        return current
    drop_resident(owner)
    current = make(model, dict(steerers))
    # the finalizer detaches the hooks if the owner goes first; run (and so released) on drop
    owner.__dict__[_KEY] = current, weakref.finalize(owner, current.detach)
    return current


def drop_resident(owner: Any) -> None:
    """Detach ``owner``'s resident steering, if any (after its steerers changed)."""
    entry = owner.__dict__.pop(_KEY, None)
    if entry is not None:
        entry[1]()
