"""Attaching steering to a model: named, removable forward hooks scoped to one session.

A :class:`SteeringSession` places one forward hook per steered module and removes all of
them on ``detach()`` / on leaving its ``with`` block, also when an exception escapes.
Sessions opened as context managers are *context-scoped* by default: their hooks act
only on forward calls made in the same thread / asyncio task (a ``contextvars`` check),
so concurrent requests sharing one model never see each other's steering.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..names import GATES
from .decision import SampleDecision
from .errors import ActivationError, SteeringError
from .hookpoints import gate_reading, get_output, replace_output, resolve_module
from .prepared import PreparedLayer
from .strengths import STRENGTH_LIMIT, Strength, check_strength, check_strengths, is_steering, rows_strengths

if TYPE_CHECKING:
    from .layer import SteeringLayer

__all__ = [
    "HOOK_PREFIX",
    "STRENGTH_LIMIT",
    "HookHandles",
    "SteeringSession",
    "active_hook_names",
    "active_in_context",
    "check_strength",
    "gate_word",
]

HOOK_PREFIX = "dsas"
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("dsas_active_sessions", default=frozenset())
_COUNTER = itertools.count()
Observer = Callable[[str, torch.Tensor, torch.Tensor | None], None]


def gate_word(value: str | bool | None, where: str = "gate") -> str | None:
    """A call's gate in the one vocabulary (:data:`~dsas_diffusion.names.GATES`): ``"dsas"`` or
    ``"e2e"`` steer through the steerers' gates, ``"none"`` steers uniformly; ``None`` stays
    ``None``. ``True`` / ``False`` are the former spelling: accepted for one release with a
    ``DeprecationWarning``.

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
            DeprecationWarning,
            stacklevel=3,
        )
        return word
    raise SteeringError(f"{where} must be one of {GATES} ('none': uniform steering), got {value!r}")


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
    :meth:`Steerer.apply`; use it as a context manager or call :meth:`detach`.

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
        strength: float | Sequence[float],
        gated: bool,
        record_gates: bool = False,
        scoped: bool = True,
        observer: Observer | None = None,
        decision: SampleDecision | None = None,
    ) -> None:
        self.layers = list(layers)
        self.model = model
        self._strengths: dict[torch.device, torch.Tensor] = {}  # λ as a tensor per device (compiled calls)
        self._samples: torch.Tensor | None = None  # one λ per sample, or None (CPU, float32)
        self._samples_on_device: dict[torch.device, torch.Tensor] = {}
        self._devices: set[torch.device] = set()  # of the hooked modules
        self.strength = strength
        self.gated = bool(gated)
        self.record_gates = record_gates
        self.scoped = scoped
        self.observer = observer
        self.batch_rows: slice | torch.Tensor | Callable[[int], slice | torch.Tensor] | None = None
        self.active = True
        self.decision = decision
        self.observing = False
        self.gate_maps: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in self.layers}
        self.id = next(_COUNTER)
        self.hook_names: list[str] = []
        self._hooked: list[nn.Module] = []
        self._hooks = HookHandles()
        self._scoped_on = False
        self._prepared: dict[tuple[int, torch.device], PreparedLayer] = {}
        #: what gates reading another module's context read, by key, from that module's last call
        self._relay: dict[str, torch.Tensor] = {}

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    @property
    def in_context(self) -> bool:
        """Whether this session acts on forward calls made here (always, when not scoped)."""
        return not self.scoped or self.id in _ACTIVE.get()

    @property
    def strength(self) -> Strength:
        """The global strength λ, or a tuple of one λ per sample; it may be changed between
        calls, also under ``torch.compile``: compiled code reads λ from a tensor updated in
        place, so a new strength (or new per-sample strengths for as many samples) does not
        recompile."""
        return self._strength if self._samples is None else tuple(self._samples.tolist())

    @strength.setter
    def strength(self, value: float | Sequence[float]) -> None:
        value = check_strengths(value)
        if isinstance(value, tuple):
            samples = torch.tensor(value, dtype=torch.float32)
            if self._samples is not None and self._samples.shape == samples.shape:
                self._samples.copy_(samples)
                for tensor in self._samples_on_device.values():
                    tensor.copy_(samples)
            else:  # (made for the hooked modules' devices now: made in a compiled call, a recompile)
                self._samples, self._samples_on_device = samples, {}
                for device in self._devices:
                    self._samples_on(device)
            self._strength = 1.0 if is_steering(value) else 0.0  # (only its being 0 is read)
            return
        self._samples, self._samples_on_device = None, {}
        self._strength = value
        for tensor in self._strengths.values():
            tensor.fill_(self._strength)

    def _samples_on(self, device: torch.device) -> torch.Tensor:
        """The per-sample λ on ``device`` (made once per device, updated in place)."""
        tensor = self._samples_on_device.get(device)
        if tensor is None:
            tensor = self._samples_on_device[device] = self._samples.to(device)
        return tensor

    def _sample_strengths(self, device: torch.device, rows: int) -> torch.Tensor:
        """``(rows,)``: the per-sample λ on ``device`` for a batch of ``rows`` rows."""
        return rows_strengths(self._samples_on(device), rows)

    def _strength_on(self, device: torch.device) -> torch.Tensor:
        tensor = self._strengths.get(device)
        if tensor is None:
            tensor = self._strengths[device] = torch.full((), self._strength, device=device)
        return tensor

    def attach(self, *, activate: bool = True) -> SteeringSession:
        """Place the hooks. A scoped session acts from here on in the attaching context; with
        ``activate=False`` only inside :func:`active_in_context` blocks (sessions kept attached
        across calls)."""
        if self._hooks:
            raise SteeringError("this steering session is already attached")
        self.active = True
        try:
            self._place_relays()
            for layer in self.layers:
                module = resolve_module(self.model, layer.name)
                # λ's tensor and the prepared layer for the module's device are made before any
                # compiled call: made inside one, they would change the guarded state (a recompile)
                weight = next(module.parameters(), None)
                device = torch.device("cpu") if weight is None else weight.device
                self._strength_on(device)
                self._devices.add(device)
                if self._samples is not None:
                    self._samples_on(device)
                if not any(p.requires_grad for p in layer.parameters()):
                    self._steer_function(layer, device)
                reads_more = layer.gate_reads != "output"
                self._hooks.add(module.register_forward_hook(self._make_hook(layer, module), with_kwargs=reads_more))
                hook_name = f"{HOOK_PREFIX}:{self.id}:{layer.name}"
                self.hook_names.append(hook_name)
                self._hooked.append(module)
                _register_name(module, hook_name)
            if self.scoped and activate:
                _ACTIVE.set(_ACTIVE.get() | {self.id})
                self._scoped_on = True
        except BaseException:
            self.detach()
            raise
        return self

    def _place_relays(self) -> None:
        """Hooks computing, per call, the context that gates of other modules read (before any
        steering hook, so that a module's own steering hook finds its context computed)."""
        points = {layer.gate_point.key: layer.gate_point for layer in self.layers if layer.gate_relayed}
        for key, point in points.items():
            module = resolve_module(self.model, point.module)
            before: list[Any] = []
            reading = gate_reading(module, point, before)
            for handle in before:
                self._hooks.add(handle)

            def relay(module: nn.Module, args: Any, kwargs: Any, output: Any, key=key, reading=reading) -> None:
                # (compiled: always, without reading λ, whose value would be guarded)
                needed = torch.compiler.is_compiling() or self.record_gates or self.observing or self._strength != 0.0
                if self.gated and (self.active or self.observing) and self.in_context and needed:
                    self._relay[key] = reading(args, kwargs, output)

            self._hooks.add(module.register_forward_hook(relay, with_kwargs=True))

    def _relayed(self, key: str, name: str) -> torch.Tensor:
        value = self._relay.get(key)
        if value is None:
            raise ActivationError(
                f"layer {name!r}: its gate reads the context of {key.split(':')[0]!r}, which did not run before it "
                "in this call; a gate reads the context of a module called before its own"
            )
        return value

    def detach(self) -> None:
        """Remove every hook of this session (idempotent, exception-safe). The session also
        turns inactive: code compiled while it was attached (which dynamo does not re-check
        for removed hooks) then lets activations through untouched."""
        self.active = False
        self._hooks.remove()
        for module, hook_name in zip(self._hooked, self.hook_names, strict=True):
            _unregister_name(module, hook_name)
        self._hooked.clear()
        self.hook_names.clear()
        self._relay.clear()
        if self._scoped_on:
            # remove only our id: sessions may be detached in any order
            _ACTIVE.set(_ACTIVE.get() - {self.id})
            self._scoped_on = False

    def __enter__(self) -> SteeringSession:
        if not self._hooks:
            self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _steer_function(self, layer: SteeringLayer, device: torch.device) -> Callable[..., Any]:
        """How to steer ``layer`` on ``device``: the differentiable reference while its tensors
        are being trained (LinEAS), else its :class:`PreparedLayer` (made once per device)."""
        if self.decision is None and torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters()):
            if layer.map.bias.device != device:  # a copy would take the gradients away from the layer
                raise SteeringError(
                    f"layer {layer.name!r} is being trained on {layer.map.bias.device} but its module runs on "
                    f"{device}; move the steering layers to the model's device before training them"
                )
            return layer.steer
        key = (id(layer), device)
        if key not in self._prepared:
            self._prepared[key] = PreparedLayer(layer, device)
        return self._prepared[key]

    def _make_hook(self, layer: SteeringLayer, module: nn.Module):
        point = layer.hook_point
        before: list[Any] = []  # what the reading places before each call (a context reader's cache)
        reading = None
        if layer.gate_relayed:
            key = layer.gate_point.key
            reading = lambda args, kwargs, output: self._relayed(key, layer.name)  # noqa: E731
        elif layer.gate_reads != "output":
            reading = gate_reading(module, layer.gate_point, before)
        for handle in before:
            self._hooks.add(handle)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return steer_output(output, None)

        def input_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if not (self.active or self.observing) or not self.in_context:
                return None
            # what the gate reads, computed only where it is used (not for a deselected layer or at λ 0)
            return steer_output(output, (lambda: reading(args, kwargs, output)) if self.gated else None)

        def observe(output: Any, gate_input: torch.Tensor | None) -> None:
            tensor = get_output(output, point.output_index, layer.name)
            rows = self.batch_rows(tensor.shape[0]) if callable(self.batch_rows) else self.batch_rows
            if rows is not None:
                tensor = tensor[rows]
                gate_input = None if gate_input is None else gate_input[rows]
            prepared = self._steer_function(layer, tensor.device)
            self.decision.observe(layer.name, prepared.sample_logits(tensor, gate_input))

        def steer_output(output: Any, read: Callable[[], torch.Tensor] | None) -> Any:
            if not self.in_context:
                return None
            if not self.active:
                if self.observing and self.gated and self.decision is not None and layer.sample_gate is not None:
                    observe(output, None if read is None else read())
                return None
            gated = self.gated
            if gated and layer.gate is not None and not layer.gate.enabled:
                return None  # layer deselected by its gate accuracy
            tensor = get_output(output, point.output_index, layer.name)
            steer = self._steer_function(layer, tensor.device)
            rows = self.batch_rows
            if callable(rows):
                rows = rows(tensor.shape[0])
            # compiled: λ is a tensor read in the graph (no guard on its value, no recompile
            # when it changes); eager: a Python number, and λ = 0 skips the work exactly
            compiling = torch.compiler.is_compiling()
            if self._samples is not None:  # one λ per row, a tensor: one graph for every mix of strengths
                if not isinstance(steer, PreparedLayer):
                    raise SteeringError(f"layer {layer.name!r} is being trained: train it with one strength")
                strength = self._sample_strengths(tensor.device, (tensor if rows is None else tensor[rows]).shape[0])
            else:  # (on CUDA also eager: the fused kernel reads λ from the device, no copy per call)
                strength = self._strength_on(tensor.device) if compiling or tensor.is_cuda else self._strength
            # the call's per-sample decision, where it replaces the layers' sample gates
            decided = (lambda: (self.decision.factor(tensor.device),)) if gated and self.decision is not None else tuple
            if not compiling and self._strength == 0.0 and self.observer is None:
                # exactly the identity; compute the gates only if they are being recorded
                if self.record_gates and gated and layer.gate is not None:
                    gate_input = None if read is None else read()
                    reading = gate_input if rows is None or gate_input is None else gate_input[rows]
                    _, values = steer(tensor if rows is None else tensor[rows], 0.0, True, reading, *decided())
                    self.gate_maps[layer.name].append(values.detach().to("cpu", torch.float16))
                return None
            gate_input = None if read is None else read()
            # the gate values are made only for whoever reads them
            wanted = self.record_gates or self.observer is not None
            wanted = {"return_gates": wanted} if isinstance(steer, PreparedLayer) else {}
            if rows is None:
                steered, gate_values = steer(tensor, strength, gated, gate_input, *decided(), **wanted)
            else:
                reading = None if gate_input is None else gate_input[rows]
                part, gate_values = steer(tensor[rows], strength, gated, reading, *decided(), **wanted)
                steered = tensor.clone()
                steered[rows] = part
            if self.observer is not None:
                self.observer(layer.name, steered, gate_values)
            if self.record_gates and gate_values is not None:
                self.gate_maps[layer.name].append(gate_values.detach().to("cpu", torch.float16))
            return replace_output(output, point.output_index, steered)

        return hook if reading is None else input_hook


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


def _register_name(module: nn.Module, name: str) -> None:
    names = module.__dict__.setdefault("_dsas_hook_names", [])
    names.append(name)


def _unregister_name(module: nn.Module, name: str) -> None:
    names = module.__dict__.get("_dsas_hook_names", [])
    if name in names:
        names.remove(name)
    if not names:
        module.__dict__.pop("_dsas_hook_names", None)


def active_hook_names(model: nn.Module) -> list[str]:
    """Names of the steering hooks currently attached anywhere in ``model``.

    Examples:
        >>> import torch
        >>> active_hook_names(torch.nn.Linear(2, 2))
        []
    """
    return [name for module in model.modules() for name in module.__dict__.get("_dsas_hook_names", [])]
