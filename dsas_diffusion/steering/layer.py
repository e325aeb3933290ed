"""One hooked module's steering: its map, its gate and the arithmetic that combines them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ActivationError, IncompatibleSteeringError
from .gate import LinearGate
from .hookpoints import HookPoint, feature_dim
from .maps import SteeringMap

__all__ = ["SteeringLayer", "module_signature"]


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
        signature: ``module_signature`` of the module it was fitted on, if known.
    """

    def __init__(
        self,
        hook_point: HookPoint,
        steering_map: SteeringMap,
        gate: LinearGate | None = None,
        signature: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if hook_point.layout == "auto":
            raise ValueError(f"layer {hook_point.module!r}: resolve the layout before building a SteeringLayer")
        if gate is not None and gate.width != steering_map.width:
            raise ValueError(f"layer {hook_point.module!r}: gate width {gate.width} != map width {steering_map.width}")
        self.hook_point = hook_point
        self.map = steering_map
        self.gate = gate
        self.signature = dict(signature or {})

    @property
    def name(self) -> str:
        return self.hook_point.module

    @property
    def width(self) -> int:
        return self.map.width

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The gate at every position of ``x`` (float32, ``x``'s shape without its features)."""
        if self.gate is None:
            raise ActivationError(f"layer {self.name!r} has no gate; steer it with gating off")
        dim = feature_dim(self.hook_point.layout)
        return self.gate(x.float(), dim).squeeze(dim)

    def steer(self, x: torch.Tensor, strength: float, gated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steer activation ``x``; return the result (in ``x``'s dtype) and the gate values
        (``x`` without its feature dimension, float32) when ``gated``."""
        layout = self.hook_point.layout
        dim = feature_dim(layout)
        if x.ndim < 2 or x.shape[dim] != self.width:
            raise IncompatibleSteeringError(
                f"module {self.name!r} produced an activation of shape {tuple(x.shape)} but its "
                f"steering expects {self.width} features on dimension {dim} ({layout}); "
                "this steering was made for another model or another hook point."
            )
        shape = (self.width,) if dim == -1 else (1, self.width) + (1,) * (x.ndim - 2)
        xf = x.float()
        delta = self.map.delta(xf, shape)
        gate_values = None
        if gated:
            if self.gate is None:
                raise ActivationError(f"layer {self.name!r} has no gate; steer it with gating off")
            gate_values = self.gate(xf, dim)
            steered = torch.addcmul(xf, gate_values, delta, value=strength)  # x + λ·s(x)·δ in one kernel
        else:
            steered = torch.add(xf, delta, alpha=strength)
        if gate_values is not None:
            gate_values = gate_values.squeeze(dim)
        return steered.to(x.dtype), gate_values
