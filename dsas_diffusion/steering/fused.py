"""Gate, map and blend in one pass over the activation: a Triton kernel for CUDA devices.

:class:`~dsas_diffusion.steering.prepared.PreparedLayer` computes ``t + λ·s(t)·(T(t) − t)``
with eight PyTorch kernels for a gated affine map with a support; each reads and writes the
activation (or a tensor of its size). :func:`fused_steer` does it in one kernel: every
program loads a block of positions with all their features once, computes the gate's dot
product, the map and the blend in registers and writes the steered activation (and the gate
values) once. It is registered as the custom op ``dsas::fused_steer`` with
``torch.library.triton_op``, so ``torch.compile`` keeps it in the graph (no graph break) and
passes λ, a 0-dim tensor read by the kernel, without recompiling when λ changes.

It is used on CUDA when Triton is installed (``DSAS_FUSED_KERNEL=0`` turns it off); everywhere
else, and while gradients flow through the activation, the PyTorch path runs (under
``torch.compile`` inductor fuses that path itself). With ``TRITON_INTERPRET=1`` set before
Triton is imported, the kernel also runs, slowly, on CPU tensors: that is how the tests check
it on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["ACTIVATION_CODES", "KERNEL_AVAILABLE", "fused_steer", "uses_kernel"]

#: the gate activations as the kernel's ``ACTIVATION`` constant
ACTIVATION_CODES = {"sigmoid": 0, "relu": 1, "step": 2}

#: Triton is installed (the CPU-only wheels of torch come without it); the kernel itself, in
#: :mod:`.fused_kernel`, is imported on first use
KERNEL_AVAILABLE = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def uses_kernel(device: torch.device) -> bool:
    """Whether activations on ``device`` are steered by the fused kernel: CUDA with Triton
    installed, unless the environment sets ``DSAS_FUSED_KERNEL=0`` (CPU tensors too under
    ``TRITON_INTERPRET=1``, for testing).

    Examples:
        >>> uses_kernel(torch.device("cpu")) == (KERNEL_AVAILABLE and _INTERPRETED)
        True
    """
    if not KERNEL_AVAILABLE or os.environ.get("DSAS_FUSED_KERNEL", "1") == "0":
        return False
    return device.type == "cuda" or (_INTERPRETED and device.type == "cpu")


def fused_steer(
    x: torch.Tensor,
    bias: torch.Tensor,
    slope: torch.Tensor | None,
    support: tuple[torch.Tensor, torch.Tensor] | None,
    gate: tuple[torch.Tensor, torch.Tensor] | None,
    strength: torch.Tensor,
    *,
    floor: float = 0.0,
    gate_scale: float = 1.0,
    activation: int = 0,
    channels_last: bool = True,
    gate_input: torch.Tensor | None = None,
    sample_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x + λ·s(x)·(T(x) − x)`` in one kernel, with the tensors of a :class:`PreparedLayer`
    (float32 vectors on ``x``'s device): ``bias`` and ``slope`` (``w − 1``, ``None`` for a
    shift) of the map, its ``support`` bounds or ``None``, ``gate`` as ``(weight, bias)`` or
    ``None`` for uniform steering, ``strength`` a 0-dim float32 tensor or a ``(B,)`` one (one λ
    per sample); ``gate_input``: what
    the gate reads when not ``x`` (the module's input: ``x``'s positions, the gate's width),
    giving ``x + λ·s(u)·(T(x) − x)``; ``sample_factor``: a float32 ``(B,)`` tensor multiplying
    the gate of every position of each sample (a sample gate's values); ``activation``: the
    gate's, as its :data:`ACTIVATION_CODES` value. Returns the steered activation (``x``'s
    dtype) and the gate values (``x``'s shape without the feature dimension), ``None`` when not
    gated.
    """
    if not KERNEL_AVAILABLE:
        raise RuntimeError("the fused steering kernel needs Triton (pip install triton); use PreparedLayer instead")
    from .fused_kernel import fused_steer_op

    lo, hi = support if support is not None else (None, None)
    weight, gate_bias = gate if gate is not None else (None, None)
    out, gates = fused_steer_op(
        x,
        bias,
        slope,
        lo,
        hi,
        weight,
        gate_bias,
        strength,
        floor,
        gate_scale,
        activation,
        channels_last,
        gate_input if gate is not None else None,
        sample_factor if gate is not None else None,
    )
    if gate is None:
        return out, None
    return out, gates.view(x.shape[:-1] if channels_last else x.shape[:1] + x.shape[2:])
