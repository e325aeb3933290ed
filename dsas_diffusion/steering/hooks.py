"""Attaching steering to a model: named, removable forward hooks scoped to one session.

A :class:`SteeringSession` places one forward hook per steered module, which runs the
session's parts (:mod:`.parts`), and removes all of them on ``detach()`` / on leaving its
``with`` block, also when an exception escapes.
Sessions opened as context managers are *context-scoped* by default: their hooks act
only on forward calls made in the same thread / asyncio task (a ``contextvars`` check),
so concurrent requests sharing one model never see each other's steering.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .decision import SampleDecision
from .errors import SteeringError
from .hookpoints import gate_reading, get_output, replace_output, resolve_module
from .parts import ContextRelay, GateRecorder, LayerSteering, Strengths
from .strengths import STRENGTH_LIMIT, Strength, check_strengths

if TYPE_CHECKING:
    from .layer import SteeringLayer

__all__ = [
    "HOOK_PREFIX",
    "STRENGTH_LIMIT",
    "HookHandles",
    "SteeringSession",
    "active_hook_names",
    "active_in_context",
]

HOOK_PREFIX = "dsas"
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("dsas_active_sessions", default=frozenset())
_COUNTER = itertools.count()
Observer = Callable[[str, torch.Tensor, torch.Tensor | None], None]
#: the batch rows a session steers: a slice or index tensor, a function of the batch size giving one, or all
Rows = slice | torch.Tensor | Callable[[int], slice | torch.Tensor] | None
#: what a gate reads, computed on demand (``None``: the gate reads the steered output)
Reading = Callable[[], torch.Tensor] | None


class _Named:
    """A hook's name on its module (:func:`active_hook_names`), removed as a handle is."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        module.__dict__.setdefault("_dsas_hook_names", []).append(name)

    def remove(self) -> None:
        names = self.module.__dict__.get("_dsas_hook_names", [])
        if self.name in names:
            names.remove(self.name)
        if not names:
            self.module.__dict__.pop("_dsas_hook_names", None)


class _Scope:
    """A session's id among those acting in this context, removed as a handle is (only this
    id: sessions may be detached in any order)."""

    def __init__(self, session_id: int) -> None:
        self.id = session_id

    def remove(self) -> None:
        _ACTIVE.set(_ACTIVE.get() - {self.id})


class HookHandles:
    """Forward hooks placed together and removed together (newest first, idempotent).

    Examples:
        >>> model = nn.Linear(2, 2)
        >>> hooks = HookHandles().place([(model, lambda module, args, output: None)])
        >>> len(model._forward_hooks), hooks.remove(), len(model._forward_hooks)
        (1, None, 0)
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        """Keep a handle registered elsewhere (e.g. a pre-hook) for removal with the others."""
        self._handles.append(handle)
        return handle

    def name(self, module: nn.Module, name: str) -> None:
        """Name a hook placed on ``module`` (:func:`active_hook_names`) until removal."""
        self._handles.append(_Named(module, name))

    @property
    def names(self) -> list[str]:
        return [handle.name for handle in self._handles if isinstance(handle, _Named)]

    def place(self, pairs: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> HookHandles:
        """Register each ``(module, hook)`` as a forward hook; if one fails, remove every
        hook placed so far (those kept by :meth:`add` too) and re-raise."""
        try:
            for module, hook in pairs:
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


class SteeringSession:
    """Steering applied to one model until detached. Made by :meth:`Steerer.attach` /
    :meth:`Steerer.apply` (through a :class:`~.plan.CallPlan`); use it as a context manager or
    call :meth:`detach`.

    One forward hook per steered module runs the session's parts (:mod:`.parts`): the layer's
    steering (map × gate × λ on the steered rows), and only where a call uses them a gate
    recorder, a per-sample decision and a relay of another module's context.

    Attributes (may be changed while attached):
        ``strength``: the global strength λ, or one λ per sample (a sequence; see
            :mod:`.strengths` for how rows map to samples).
        ``gated``: ``True`` scales by the DSAS gates, ``False`` steers uniformly.
        ``batch_rows``: steer only these batch rows (e.g. the conditional half of a CFG
            batch): a slice or index tensor, or a function of the batch size returning one;
            ``None`` steers all rows.
        ``active``: ``False`` lets forward calls through untouched (and records no gates),
            e.g. at denoising steps outside a steering window.
        ``decision``: a per-sample decision (:class:`~.decision.SampleDecision`) taken over
            layers, in place of each layer's sample gate; ``observing``: while inactive, add
            every layer's sample-gate logits to it (the pipelines observe the denoising steps
            before the window).
        ``gate_maps``: with ``record_gates=True``, per module a list with one gate tensor
            per forward call (float16, CPU; the activation's shape without its features).
    """

    def __init__(
        self,
        layers: Sequence[SteeringLayer],
        model: nn.Module,
        *,
        strength: Strength,
        gated: bool,
        record_gates: bool = False,
        scoped: bool = True,
        observer: Observer | None = None,
        decision: SampleDecision | None = None,
    ) -> None:
        self.layers = list(layers)
        self.model = model
        self._strengths = Strengths(strength)
        self.gated = bool(gated)
        self.scoped = scoped
        self.batch_rows: Rows = None
        self.active = True
        self.decision = decision
        #: called after each layer is steered with (module name, steered, gates), e.g. LinEAS' loss
        self.observer = observer
        self.recorder = GateRecorder(layer.name for layer in self.layers) if record_gates else None
        relayed = [layer.gate_point for layer in self.layers if layer.gate_relayed]
        self.relay = ContextRelay(model, relayed, self._relay_wanted) if relayed else None
        #: each steered module's steering part, by name (made on attach)
        self.steerings: dict[str, LayerSteering] = {}
        self.id = next(_COUNTER)
        self._hooks = HookHandles()

    # -- what a call reads ------------------------------------------------------------------
    @property
    def strength(self) -> Strength:
        """The global strength λ, or a tuple of one λ per sample; it may be changed between
        calls, also under ``torch.compile``: compiled code reads λ from a tensor updated in
        place, so a new strength (or new per-sample strengths for as many samples) does not
        recompile."""
        return self._strengths.value

    @strength.setter
    def strength(self, value: float | Sequence[float]) -> None:
        self._strengths.set(check_strengths(value))

    @property
    def record_gates(self) -> bool:
        return self.recorder is not None

    @property
    def gate_maps(self) -> dict[str, list[torch.Tensor]]:
        """Per module, the gates recorded in each forward call (empty unless ``record_gates``)."""
        return self.recorder.maps if self.recorder is not None else {layer.name: [] for layer in self.layers}

    @property
    def observing(self) -> bool:
        """Whether the session adds sample-gate logits to its decision (while inactive)."""
        return self.decision is not None and self.decision.observing

    @observing.setter
    def observing(self, value: bool) -> None:
        if self.decision is not None:
            self.decision.observing = bool(value)
        elif value:
            raise SteeringError("this session has no per-sample decision to observe for")

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    @property
    def hook_names(self) -> list[str]:
        return self._hooks.names

    @property
    def in_context(self) -> bool:
        """Whether this session acts on forward calls made here (always, when not scoped)."""
        return not self.scoped or self.id in _ACTIVE.get()

    def _relay_wanted(self) -> bool:
        # (compiled: always, without reading λ, whose value would be guarded)
        needed = (
            torch.compiler.is_compiling()
            or self.recorder is not None
            or self.observing
            or self._strengths.number != 0.0
        )
        return self.gated and (self.active or self.observing) and self.in_context and needed

    # -- attaching ------------------------------------------------------------------------------
    def attach(self, *, activate: bool = True) -> SteeringSession:
        """Place the hooks. A scoped session acts from here on in the attaching context; with
        ``activate=False`` only inside :func:`active_in_context` blocks (sessions kept attached
        across calls)."""
        if self._hooks:
            raise SteeringError("this steering session is already attached")
        self.active = True
        try:
            if self.relay is not None:
                self.relay.place(self._hooks.add)
            for layer in self.layers:
                module = resolve_module(self.model, layer.name)
                steering = self.steerings[layer.name] = LayerSteering(layer)
                # λ's tensors and the formula for the module's device are made before any
                # compiled call: made inside one, they would change the guarded state (a recompile)
                weight = next(module.parameters(), None)
                device = torch.device("cpu") if weight is None else weight.device
                self._strengths.prepare(device)
                steering.prepare(device)
                reads_more = layer.gate_reads != "output"
                hook = self._make_hook(layer, module, steering)
                self._hooks.add(module.register_forward_hook(hook, with_kwargs=reads_more))
                self._hooks.name(module, f"{HOOK_PREFIX}:{self.id}:{layer.name}")
            if self.scoped and activate:
                _ACTIVE.set(_ACTIVE.get() | {self.id})
                self._hooks.add(_Scope(self.id))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook of this session (idempotent, exception-safe). The session also
        turns inactive: code compiled while it was attached (which dynamo does not re-check
        for removed hooks) then lets activations through untouched."""
        self.active = False
        self._hooks.remove()
        if self.relay is not None:
            self.relay.values.clear()

    def __enter__(self) -> SteeringSession:
        if not self._hooks:
            self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- the hook -----------------------------------------------------------------------------
    def _make_hook(self, layer: SteeringLayer, module: nn.Module, steering: LayerSteering) -> Callable[..., Any]:
        """The forward hook of ``layer``'s module: what its gate reads, then the session's parts."""
        read = None  # what the gate reads, when it is not the output: computed only where used
        if layer.gate_relayed:
            key = layer.gate_point.key
            read = lambda args, kwargs, output: self.relay.read(key, layer.name)  # noqa: E731
        elif layer.gate_reads != "output":
            before: list[Any] = []  # what the reading places before each call (a context reader's cache)
            read = gate_reading(module, layer.gate_point, before)
            for handle in before:
                self._hooks.add(handle)

        if read is None:

            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                return self._run(layer, steering, output, None) if self.in_context else None

            return hook

        def input_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if not (self.active or self.observing) or not self.in_context:
                return None
            return self._run(layer, steering, output, (lambda: read(args, kwargs, output)) if self.gated else None)

        return input_hook

    def _run(self, layer: SteeringLayer, steering: LayerSteering, output: Any, read: Reading) -> Any:
        """One call of ``layer``'s module: observe for the decision before the window, else steer."""
        if not self.active:
            if self.observing and self.gated and layer.sample_gate is not None:
                self._observe(layer, steering, output, read)
            return None
        if self.gated and layer.gate is not None and not layer.gate.enabled:
            return None  # layer deselected by its gate accuracy
        return self._steer(layer, steering, output, read)

    def _observe(self, layer: SteeringLayer, steering: LayerSteering, output: Any, read: Reading) -> None:
        """Add the layer's sample-gate logits of the steered rows to the call's decision."""
        tensor = get_output(output, layer.hook_point.output_index, layer.name)
        gate_input = None if read is None else read()
        rows = self.batch_rows(tensor.shape[0]) if callable(self.batch_rows) else self.batch_rows
        if rows is not None:
            tensor = tensor[rows]
            gate_input = None if gate_input is None else gate_input[rows]
        formula = steering.on(tensor.device, decision=True)
        self.decision.observe(layer.name, formula.sample_logits(tensor, gate_input))

    def _steer(self, layer: SteeringLayer, steering: LayerSteering, output: Any, read: Reading) -> Any:
        """Steer the module's output on the call's rows: ``t + λ·s·(T(t) − t)``."""
        index = layer.hook_point.output_index
        tensor = get_output(output, index, layer.name)
        rows = self.batch_rows(tensor.shape[0]) if callable(self.batch_rows) else self.batch_rows
        part = tensor if rows is None else tensor[rows]
        gated, decided = self.gated, self.gated and self.decision is not None
        formula = steering.on(tensor.device, decision=decided)
        # compiled: λ is a tensor read in the graph (no guard on its value, no recompile when it
        # changes); eager: a Python number, and λ = 0 is exactly the identity
        compiling = torch.compiler.is_compiling()
        strength = self._strengths.for_rows(tensor.device, part.shape[0], compiling or tensor.is_cuda)
        # what the gate reads, on the steered rows (computed only now: not at λ 0 unless recorded)
        gate_input = (lambda: None) if read is None else (lambda: read() if rows is None else read()[rows])
        if not compiling and self._strengths.number == 0.0 and self.observer is None:
            if self.recorder is not None and gated and layer.gate is not None:  # the gates, recorded at λ 0
                factor = self.decision.factor(tensor.device) if decided else None
                self.recorder(layer.name, None, formula(part, 0.0, True, gate_input(), factor)[1])
            return None
        gate_input = gate_input()
        factor = self.decision.factor(tensor.device) if decided else None
        wanted = self.recorder is not None or self.observer is not None  # the gates are made only if read
        steered, gates = formula(part, strength, gated, gate_input, factor, return_gates=wanted)
        if rows is not None:
            part, steered = steered, tensor.clone()
            steered[rows] = part
        if self.observer is not None:
            self.observer(layer.name, steered, gates)
        if self.recorder is not None:
            self.recorder(layer.name, steered, gates)
        return replace_output(output, index, steered)


@contextlib.contextmanager
def active_in_context(sessions: Iterable[SteeringSession]) -> Iterator[None]:
    """Let scoped ``sessions`` act on forward calls made in this thread / task inside the block.

    Examples:
        >>> session = SteeringSession([], nn.Linear(2, 2), strength=1.0, gated=False).attach(activate=False)
        >>> with active_in_context([session]):
        ...     session.in_context
        True
        >>> session.in_context
        False
    """
    token = _ACTIVE.set(_ACTIVE.get() | {session.id for session in sessions})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_hook_names(model: nn.Module) -> list[str]:
    """Names of the steering hooks currently attached anywhere in ``model``.

    Examples:
        >>> import torch
        >>> active_hook_names(torch.nn.Linear(2, 2))
        []
    """
    return [name for module in model.modules() for name in module.__dict__.get("_dsas_hook_names", [])]
