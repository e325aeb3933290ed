"""One hooked module's steering: its map, its gate and the arithmetic that combines them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ActivationError, IncompatibleSteeringError
from .gate import LinearGate
from .hookpoints import HookPoint, feature_dim, pool, same_positions
from .maps import SteeringMap

__all__ = ["SteeringLayer", "module_signature", "same_positions"]


def _adapter_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer (peft's LoRA and kin, as loaded by
    ``load_lora_weights``) wrapping the original module as ``base_layer``."""
    return callable(getattr(module, "get_base_layer", None)) and isinstance(
        getattr(module, "base_layer", None), nn.Module
    )


def module_signature(module: nn.Module) -> dict[str, Any]:
    """What a steering file records of a hooked module to refuse foreign models: its class
    and parameter count, both as without adapters (a LoRA-wrapped module is the module it
    wraps: steering fitted on a model applies to it with a LoRA loaded, and vice versa)."""
    base = module.get_base_layer() if _adapter_wrapper(module) else module
    adapter: set[int] = set()
    for sub in base.modules():
        if _adapter_wrapper(sub):
            kept = {id(p) for p in sub.get_base_layer().parameters()}
            adapter |= {id(p) for p in sub.parameters() if id(p) not in kept}
    return {
        "module_class": type(base).__name__,
        "n_parameters": int(sum(p.numel() for p in base.parameters() if id(p) not in adapter)),
    }


class SteeringLayer(nn.Module):
    """The steering of one hooked module: ``t' = t + strength * s(t) * (T(t) - t)``.

    Args:
        hook_point: where it applies; its layout must be resolved (not ``"auto"``).
        steering_map: ``T`` (see :class:`SteeringMap`).
        gate: the DSAS gate ``s``; ``None`` if the layer has none (uniform steering only).
            A gate with ``reads="input"`` reads the module's input ``u`` at each position
            instead: ``t' = t + strength * s(u) * (T(t) - t)``; input and output must have
            the same positions (as an attention's query input and its output). A gate with
            ``reads="context"`` reads the mean of the cached attention values each token
            attends to (:mod:`.context`).
        signature: ``module_signature`` of the module it was fitted on, if known.
        sample_gate: a second gate, reading the mean over a sample's positions of what
            ``gate`` reads (whether this sample shows the concept at all); its value multiplies
            ``gate`` at every position of the sample: ``s = s_sample(mean u) * s(u)``.

    Examples:
        >>> layer = SteeringLayer(HookPoint("attn", layout="channels_last"), SteeringMap(torch.ones(2)),
        ...                       LinearGate(torch.tensor([1.0, 0.0, 0.0]), 0.0, reads="input"))
        >>> layer.gate_point
        HookPoint(module='attn', output_index=None, layout='channels_last', reads='input')
        >>> steered, gates = layer.steer(torch.zeros(1, 2, 2), 1.0, True, gate_input=torch.tensor([[[9.0, 0, 0], [-9, 0, 0]]]))
        >>> steered[0, :, 0].round(decimals=3)     # steered where the input opens the gate
        tensor([1., 0.])
    """

    def __init__(
        self,
        hook_point: HookPoint,
        steering_map: SteeringMap,
        gate: LinearGate | None = None,
        signature: dict[str, Any] | None = None,
        sample_gate: LinearGate | None = None,
    ) -> None:
        super().__init__()
        if hook_point.layout == "auto":
            raise ValueError(f"layer {hook_point.module!r}: resolve the layout before building a SteeringLayer")
        if gate is not None and gate.reads == "output" and gate.width != steering_map.width:
            raise ValueError(f"layer {hook_point.module!r}: gate width {gate.width} != map width {steering_map.width}")
        if sample_gate is not None:
            if gate is None:
                raise ValueError(f"layer {hook_point.module!r}: a sample gate multiplies a gate; give the gate too")
            if sample_gate.reads != gate.reads or sample_gate.width != gate.width:
                raise ValueError(
                    f"layer {hook_point.module!r}: the sample gate reads the {sample_gate.reads} "
                    f"({sample_gate.width} features), its gate the {gate.reads} ({gate.width}); they must read the same"
                )
        self.hook_point = hook_point
        self.map = steering_map
        self.gate = gate
        self.sample_gate = sample_gate
        self.signature = dict(signature or {})

    @property
    def name(self) -> str:
        return self.hook_point.module

    @property
    def width(self) -> int:
        return self.map.width

    @property
    def gate_reads(self) -> str:
        """What the layer's gate reads: ``"output"`` (the steered activation; also without a
        gate), ``"input"`` (its module's input) or ``"context"`` (its tokens' context)."""
        return "output" if self.gate is None else self.gate.reads

    @property
    def gate_point(self) -> HookPoint:
        """Where the gate reads: the hook point itself, its module's input or its context (or
        the context of the module named by the gate's ``source``)."""
        return self.hook_point.reading(self.gate_reads, None if self.gate is None else self.gate.source)

    @property
    def gate_relayed(self) -> bool:
        """Whether the gate reads a context that one hook computes per call for every gate
        reading it (``gate.source``, which may be the layer's own module)."""
        return self.gate is not None and self.gate.source is not None

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The gate at every position of ``x``, the activation it reads (float32, ``x``'s
        shape without its features): the gate module, times the sample gate on the mean over
        positions, as they were fitted."""
        if self.gate is None:
            raise ActivationError(f"layer {self.name!r} has no gate; steer it with gating off")
        dim = feature_dim(self.hook_point.layout)
        if x.ndim < 2 or x.shape[dim] != self.gate.width:
            raise IncompatibleSteeringError(
                f"module {self.name!r}: its {self.gate_reads} has shape {tuple(x.shape)} but its gate reads "
                f"{self.gate.width} features on dimension {dim}; this steering was made for another model"
            )
        reading = x.float()
        values = self.gate(reading, dim)
        if self.sample_gate is not None:
            sample = self.sample_gate(pool(reading, self.hook_point.layout))
            values = values * sample.view((-1,) + (1,) * (reading.ndim - 1))
        return values.squeeze(dim)

    def steer(
        self, x: torch.Tensor, strength: float, gated: bool, gate_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steer activation ``x`` with the steering formula (:class:`~.prepared.PreparedLayer`, on
        this layer's own tensors: differentiable, LinEAS trains through it); return the result
        (in ``x``'s dtype) and the gate values (``x`` without its feature dimension, float32)
        when ``gated``. ``gate_input``: the module's input, needed when the gate reads it."""
        from .prepared import PreparedLayer  # (the formula reads layers)

        return PreparedLayer(self, x.device, differentiable=True)(x, strength, gated, gate_input)
