"""The parts a steering session composes per hooked module, one job each.

* :class:`Strengths`: the session's λ, one number or one per sample, and the tensors compiled
  code reads it from;
* :class:`LayerSteering`: steer one module's activation (map × gate × λ) on the call's rows,
  with the layer's formula prepared once per device;
* :class:`GateRecorder`: keep every gate value computed (present only when gates are recorded);
* :class:`ContextRelay`: compute, once per call, the context that gates of other modules read
  (present only when a gate reads another module's context);
* the per-sample decision (:class:`~.decision.SampleDecision`, present only when the steerer
  decides per sample) observes the steps before the window and then scales the gates.

The step window, which switches a session on and off per denoising step, is a part of the
diffusion pipelines (``dsas_diffusion.diffusion.steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ActivationError, SteeringError
from .hookpoints import HookPoint, gate_reading, resolve_module
from .prepared import PreparedLayer
from .strengths import Strength, is_steering, rows_strengths

if TYPE_CHECKING:
    from .layer import SteeringLayer

__all__ = ["ContextRelay", "GateRecorder", "LayerSteering", "Strengths"]


class Strengths:
    """A session's strength: one λ, or one per sample (see :mod:`.strengths` for how rows map
    to samples). Compiled code reads λ from tensors made per device and updated in place, so a
    new strength does not recompile; eager code reads the number, and λ = 0 skips the work.

    Examples:
        >>> strengths = Strengths(2.0)
        >>> strengths.set((0.0, 1.0)); strengths.value, strengths.number
        ((0.0, 1.0), 1.0)
    """

    def __init__(self, value: Strength) -> None:
        self._tensors: dict[torch.device, torch.Tensor] = {}  # the one λ per device (compiled calls)
        self._samples: torch.Tensor | None = None  # one λ per sample, or None (CPU, float32)
        self._samples_on_device: dict[torch.device, torch.Tensor] = {}
        self._devices: set[torch.device] = set()
        #: the one λ; with one λ per sample, 1.0 if any sample is steered, else 0.0 (eager code
        #: only: compiled code must not read it, dynamo would guard on its value)
        self.number = 0.0
        self.set(value)

    @property
    def value(self) -> Strength:
        return self.number if self._samples is None else tuple(self._samples.tolist())

    @property
    def per_sample(self) -> bool:
        return self._samples is not None

    def set(self, value: Strength) -> None:
        """Set a checked strength (:func:`~.strengths.check_strengths`); tensors are updated in place."""
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
            self.number = 1.0 if is_steering(value) else 0.0
            return
        self._samples, self._samples_on_device = None, {}
        self.number = value
        for tensor in self._tensors.values():
            tensor.fill_(value)

    def prepare(self, device: torch.device) -> None:
        """Make λ's tensors on ``device`` before any compiled call (made inside one, they
        would change the guarded state: a recompile)."""
        self._devices.add(device)
        self._on(device)
        if self._samples is not None:
            self._samples_on(device)

    def _on(self, device: torch.device) -> torch.Tensor:
        tensor = self._tensors.get(device)
        if tensor is None:
            tensor = self._tensors[device] = torch.full((), self.number, device=device)
        return tensor

    def _samples_on(self, device: torch.device) -> torch.Tensor:
        tensor = self._samples_on_device.get(device)
        if tensor is None:
            tensor = self._samples_on_device[device] = self._samples.to(device)
        return tensor

    def for_rows(self, device: torch.device, rows: int, as_tensor: bool) -> float | torch.Tensor:
        """λ for a batch of ``rows`` rows on ``device``: ``(rows,)`` with one λ per sample, else
        a 0-dim tensor (``as_tensor``: compiled, or CUDA, whose fused kernel reads λ on the
        device) or the number."""
        if self._samples is not None:
            return rows_strengths(self._samples_on(device), rows)
        return self._on(device) if as_tensor else self.number


class LayerSteering:
    """Steer one module's activation through its layer's formula: the :class:`PreparedLayer`
    made once per device, or, while the layer is being trained (LinEAS), its differentiable
    form made per call on the layer's own tensors."""

    def __init__(self, layer: SteeringLayer) -> None:
        self.layer = layer
        self._prepared: dict[torch.device, PreparedLayer] = {}

    @property
    def trained(self) -> bool:
        return any(p.requires_grad for p in self.layer.parameters())

    def prepare(self, device: torch.device) -> None:
        """Make the formula for ``device`` before any compiled call (unless being trained)."""
        if not self.trained:
            self.on(device)

    def on(self, device: torch.device, decision: bool = False) -> PreparedLayer:
        """The formula on ``device`` (the differentiable form while the layer is being trained
        and gradients are on, unless a per-sample ``decision`` steers)."""
        if not decision and torch.is_grad_enabled() and self.trained:
            if self.layer.map.bias.device != device:  # a copy would take the gradients away from the layer
                raise SteeringError(
                    f"layer {self.layer.name!r} is being trained on {self.layer.map.bias.device} but its module runs "
                    f"on {device}; move the steering layers to the model's device before training them"
                )
            return PreparedLayer(self.layer, device, differentiable=True)
        prepared = self._prepared.get(device)
        if prepared is None:
            prepared = self._prepared[device] = PreparedLayer(self.layer, device)
        return prepared

    @property
    def kernels(self) -> list[bool]:
        """Whether each prepared formula steers with the fused kernel."""
        return [prepared.kernel for prepared in self._prepared.values()]


class GateRecorder:
    """Every gate value a session computes, per module: a list with one tensor per forward call
    (float16, CPU; the activation's shape without its features)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.maps: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def __call__(self, name: str, steered: torch.Tensor | None, gates: torch.Tensor | None) -> None:
        if gates is not None:
            self.maps[name].append(gates.detach().to("cpu", torch.float16))


class ContextRelay:
    """Hooks computing, per call, the context that gates of other modules read (placed before
    any steering hook, so that a module's own steering hook finds its context computed). What
    they read is kept by key until the session ends; ``wanted()`` says whether a call needs it."""

    def __init__(self, model: nn.Module, points: Sequence[HookPoint], wanted: Callable[[], bool]) -> None:
        self.model, self.points, self.wanted = model, {point.key: point for point in points}, wanted
        self.values: dict[str, torch.Tensor] = {}

    def place(self, add: Callable[[Any], Any]) -> None:
        """Register the hooks, handing each handle to ``add``."""
        for key, point in self.points.items():
            module = resolve_module(self.model, point.module)
            before: list[Any] = []
            reading = gate_reading(module, point, before)
            for handle in before:
                add(handle)

            def relay(module: nn.Module, args: Any, kwargs: Any, output: Any, key=key, reading=reading) -> None:
                if self.wanted():
                    self.values[key] = reading(args, kwargs, output)

            add(module.register_forward_hook(relay, with_kwargs=True))

    def read(self, key: str, name: str) -> torch.Tensor:
        value = self.values.get(key)
        if value is None:
            raise ActivationError(
                f"layer {name!r}: its gate reads the context of {key.split(':')[0]!r}, which did not run before it "
                "in this call; a gate reads the context of a module called before its own"
            )
        return value
