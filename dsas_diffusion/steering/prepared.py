"""The steering formula, written once: ``t' = t + λ·s·(T(t) − t)`` for one hooked module.

:class:`PreparedLayer` is the one implementation of the formula. Every path steers through it:
the hooks at inference, the vLLM worker, and :meth:`SteeringLayer.steer`, the differentiable
form LinEAS trains through (``differentiable=True``: the layer's own tensors, no in-place
operations). At inference every hook call pays a fixed cost per tensor operation, which
dominates when the activation is small (one decoding step of a language model: a few thousand
numbers per hook), so the formula reads the layer's tensors once per session and device,
already shaped for broadcasting, and steers with seven kernels for a gated affine map with a
support (three for a gated shift, one for a uniform shift). On CUDA with Triton installed it
steers with one kernel instead (:mod:`.fused`, tested against this formula).
"""

from __future__ import annotations

import copy

import torch

from .errors import ActivationError, IncompatibleSteeringError
from .fused import ACTIVATION_CODES, fused_steer, uses_kernel
from .gate import gate_opening
from .hookpoints import feature_dim, pool, same_positions

__all__ = ["PreparedLayer"]


class PreparedLayer:
    """The steering formula of one :class:`~dsas_diffusion.steering.layer.SteeringLayer` on one
    device. At inference the layer's tensors are copied when it is made: a later edit of the layer
    is seen only by the next session (sessions are made per call by the pipelines and the language
    model). With ``differentiable=True`` it reads the layer's own tensors and computes without
    in-place operations, so that gradients reach them (:meth:`SteeringLayer.steer`).

    Examples:
        >>> from dsas_diffusion.steering import HookPoint, LinearGate, SteeringLayer, SteeringMap
        >>> layer = SteeringLayer(HookPoint("h", layout="channels_last"),
        ...                       SteeringMap(torch.ones(2)), LinearGate(torch.ones(2), 0.0))
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 3.0]])
        >>> steered, gates = PreparedLayer(layer, x.device)(x, 1.0, gated=True)
        >>> torch.equal(steered, layer.steer(x, 1.0, True)[0])
        True
    """

    def __init__(self, layer, device: torch.device, differentiable: bool = False) -> None:  # layer: SteeringLayer
        self.name = layer.name
        self.width = layer.width
        self.layout = layer.hook_point.layout
        self.dim = feature_dim(self.layout)
        steering_map, gate = layer.map, layer.gate

        self.inplace = not differentiable

        def vector(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor if differentiable else tensor.detach()
            return tensor.to(device=device, dtype=torch.float32).reshape(-1)

        self.bias = vector(steering_map.bias)
        self.slope = None if steering_map.weight is None else vector(steering_map.weight) - 1.0
        self.support = None
        if steering_map.support_lo is not None:
            self.support = (vector(steering_map.support_lo), vector(steering_map.support_hi))
        self.zero = torch.zeros((), device=device)
        self._views: dict[int, tuple[torch.Tensor | None, ...]] = {}
        self.gate_column = self.gate_bias = None
        self.half_floor = False
        #: what the gate reads; anything but the output is passed as ``gate_input``, of this width
        self.reads = "output" if gate is None else gate.reads
        self.gate_width = None if gate is None else gate.width
        if gate is not None:
            self.gate_column = vector(gate.weight).view(-1, 1)
            self.gate_bias = vector(gate.bias)
            self.activation = gate.activation
            self.floor = gate.floor
            #: s(t) = gate_scale · max(0, g − floor) with g the opening
            self.gate_scale = gate.scale / (1.0 - gate.floor)
            #: a sigmoid floored at ½, as tanh(z/2)⁺ = 2·max(0, σ(z) − ½): one operation less per call
            self.half_floor = gate.activation == "sigmoid" and gate.floor == 0.5
            if self.half_floor:
                self.half_gate = (self.gate_column * 0.5, self.gate_bias * 0.5, gate.scale)
        #: a copy of the sample gate on the device, or ``None`` (one small product per sample)
        self.sample_gate = None
        if layer.sample_gate is not None:
            self.sample_gate = layer.sample_gate if differentiable else copy.deepcopy(layer.sample_gate)
            self.sample_gate = self.sample_gate.to(device=device, dtype=torch.float32)
        #: steer with the fused kernel (CUDA with Triton; see :mod:`.fused`)
        self.kernel = uses_kernel(device) and not differentiable
        # the layer's tensors viewed to broadcast over activations of 2 to 5 dimensions
        self._views = {ndim: self._terms(ndim) for ndim in range(2, 6)}

    def _terms(self, ndim: int) -> tuple[torch.Tensor | None, ...]:
        """Bias, slope, support bounds viewed to broadcast over an activation with ``ndim``
        dimensions (made at init for 2 to 5 dimensions)."""
        terms = self._views.get(ndim)
        if terms is None:  # never stored: compiled code guards on this dict, which must not change
            shape = (-1,) if self.dim == -1 else (1, self.width) + (1,) * (ndim - 2)
            lo, hi = self.support if self.support is not None else (None, None)
            terms = tuple(None if t is None else t.view(shape) for t in (self.bias, self.slope, lo, hi))
        return terms

    def _logits(self, xf: torch.Tensor, column: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``column · t + bias`` at every position of ``xf``, with a size-1 feature dimension."""
        if self.dim == -1:  # one matrix-vector product per position, the bias added in it
            return torch.addmm(bias, xf.reshape(-1, self.gate_width), column).view(*xf.shape[:-1], 1)
        # (B, C, *positions): one batched matrix-vector product, no transposed copy
        batch, width = xf.shape[0], self.gate_width
        weight = column.view(1, 1, width).expand(batch, 1, width)
        logits = torch.baddbmm(bias.view(1, 1, 1), weight, xf.reshape(batch, width, -1))
        return logits.view(batch, 1, *xf.shape[2:])

    def _gate(self, xf: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(f, c)`` with ``s = c · f`` the gate at every position of ``xf`` (what it reads),
        ``f`` with a size-1 feature dimension."""
        if self.half_floor:
            column, bias, scale = self.half_gate
            logits = self._logits(xf, column, bias)
            return (logits.tanh_().clamp_(min=0.0) if self.inplace else logits.tanh().clamp(min=0.0)), scale
        logits = self._logits(xf, self.gate_column, self.gate_bias)
        opening = gate_opening(logits, self.activation, inplace=self.inplace)
        if self.floor > 0.0:
            opening = (
                opening.sub_(self.floor).clamp_(min=0.0) if self.inplace else (opening - self.floor).clamp(min=0.0)
            )
        return opening, self.gate_scale

    def __call__(
        self,
        x: torch.Tensor,
        strength: float | torch.Tensor,
        gated: bool,
        gate_input: torch.Tensor | None = None,
        sample_factor: torch.Tensor | None = None,
        return_gates: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steer ``x``; return the result (``x``'s dtype) and, when ``gated`` and
        ``return_gates``, the gate values (``x``'s shape without the feature dimension,
        float32), as :meth:`SteeringLayer.steer`. ``strength``: a number, a 0-dim tensor on
        ``x``'s device (compiled calls) or a ``(B,)`` tensor, one λ per sample;
        ``gate_input``: the module's input, when the gate reads it; ``sample_factor``: ``(B,)``
        per-sample factors of the gates (a decision taken over layers), in place of this
        layer's own sample gate."""
        ndim = x.ndim
        if ndim < 2 or x.shape[self.dim] != self.width:
            raise IncompatibleSteeringError(
                f"module {self.name!r} produced an activation of shape {tuple(x.shape)} but its "
                f"steering expects {self.width} features on dimension {self.dim} ({self.layout}); "
                "this steering was made for another model or another hook point."
            )
        if gated and self.gate_column is None:
            raise ActivationError(f"layer {self.name!r} has no gate; steer it with gating off")
        per_row = isinstance(strength, torch.Tensor) and strength.ndim == 1  # one λ per sample of x
        if per_row and strength.shape[0] != x.shape[0]:
            raise ActivationError(f"layer {self.name!r}: {strength.shape[0]} strengths for {x.shape[0]} samples")
        reading = None
        if gated and self.reads != "output":
            reading = self._checked_input(gate_input, x)
        factor = None
        if gated and sample_factor is not None:
            factor = sample_factor.to(device=x.device, dtype=torch.float32).view(-1)
        elif gated and self.sample_gate is not None:  # (B,): the sample gate on each sample's mean
            factor = self.sample_gate(pool(x if reading is None else reading, self.layout)).view(-1)
        if self.kernel and not (x.requires_grad and torch.is_grad_enabled()):
            if x.device.type == "cuda" or not torch.compiler.is_compiling():  # CPU: only the interpreter
                steered, gates = self._fused(x, strength, gated, reading, factor)
                return steered, gates if return_gates else None
        if per_row:
            strength = strength.view((-1,) + (1,) * (ndim - 1))
        xf = x if x.dtype == torch.float32 else x.float()
        bias, slope, lo, hi = self._terms(ndim)
        if slope is None:
            delta = bias
        else:
            delta = torch.addcmul(bias, slope, xf)  # (w − 1)·t + b
            if lo is not None:  # identity outside [lo, hi]; NaN is outside
                delta = torch.where(torch.clamp(xf, lo, hi) == xf, delta, self.zero)
        if not gated:
            steered = (
                xf + strength * delta if isinstance(strength, torch.Tensor) else torch.add(xf, delta, alpha=strength)
            )
            return (steered if x.dtype == torch.float32 else steered.to(x.dtype)), None
        if reading is None:
            opening, scale = self._gate(xf)
        else:
            opening, scale = self._gate(reading if reading.dtype == torch.float32 else reading.float())
        if factor is not None:
            factor = factor.view((-1,) + (1,) * (ndim - 1))
            opening = opening.mul_(factor) if self.inplace else opening * factor
        if isinstance(strength, torch.Tensor):
            steered = torch.addcmul(xf, opening * strength, delta, value=scale)
        else:
            steered = torch.addcmul(xf, opening, delta, value=strength * scale)
        steered = steered if x.dtype == torch.float32 else steered.to(x.dtype)
        if not return_gates:
            return steered, None
        if scale == 1.0:
            gates = opening
        else:
            gates = opening.mul_(scale) if self.inplace else opening * scale
        return steered, gates.squeeze(self.dim)

    def sample_logits(self, x: torch.Tensor, gate_input: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)``: the sample gate's logit on each sample's mean of what the gate reads (the
        evidence of a per-sample decision; see :mod:`.decision`)."""
        if self.sample_gate is None:
            raise ActivationError(f"layer {self.name!r} has no sample gate")
        reading = self._checked_input(gate_input, x) if self.reads != "output" else x
        return self.sample_gate.logits(pool(reading, self.layout), -1).view(-1)

    def _checked_input(self, gate_input: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The module's input (or context) the gate reads, checked: present, of the gate's width, with the
        positions of the output ``x``."""
        if gate_input is None:
            raise ActivationError(f"layer {self.name!r}: its gate reads the module's {self.reads}; pass gate_input")
        if not same_positions(gate_input, x, self.dim) or gate_input.shape[self.dim] != self.gate_width:
            raise IncompatibleSteeringError(
                f"module {self.name!r}: its gate reads the {self.reads}, of shape {tuple(gate_input.shape)}, with "
                f"{self.gate_width} features on dimension {self.dim} and the positions of the output it steers, "
                f"of shape {tuple(x.shape)}; this steering was made for another model or another hook point"
            )
        return gate_input

    def _fused(
        self,
        x: torch.Tensor,
        strength: float | torch.Tensor,
        gated: bool,
        reading: torch.Tensor | None,
        factor: torch.Tensor | None,
    ):
        if not isinstance(strength, torch.Tensor):
            strength = torch.full((), float(strength), device=x.device)
        gate = (self.gate_column.view(-1), self.gate_bias) if gated else None
        floor, scale = (self.floor, self.gate_scale) if gated else (0.0, 1.0)
        activation = ACTIVATION_CODES[self.activation if gated else "sigmoid"]
        return fused_steer(
            x,
            self.bias,
            self.slope,
            self.support,
            gate,
            strength,
            floor=floor,
            gate_scale=scale,
            activation=activation,
            channels_last=self.dim == -1,
            gate_input=reading,
            sample_factor=factor,
        )
