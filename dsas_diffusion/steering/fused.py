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

import os

import torch

__all__ = ["KERNEL_AVAILABLE", "fused_steer", "uses_kernel"]

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only wheels of torch come without Triton
    triton = None

KERNEL_AVAILABLE = triton is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def uses_kernel(device: torch.device) -> bool:
    """Whether activations on ``device`` are steered by the fused kernel: CUDA with Triton
    installed, unless the environment sets ``DSAS_FUSED_KERNEL=0`` (CPU tensors too under
    ``TRITON_INTERPRET=1``, for testing).

    Example:
        >>> uses_kernel(torch.device("cpu")) == (KERNEL_AVAILABLE and _INTERPRETED)
        True
    """
    if not KERNEL_AVAILABLE or os.environ.get("DSAS_FUSED_KERNEL", "1") == "0":
        return False
    return device.type == "cuda" or (_INTERPRETED and device.type == "cpu")


if KERNEL_AVAILABLE:

    @triton.jit
    def _steer_kernel(
        x_ptr,
        out_ptr,
        gates_ptr,
        bias_ptr,
        slope_ptr,
        lo_ptr,
        hi_ptr,
        weight_ptr,
        gate_bias_ptr,
        strength_ptr,
        rows,
        width,
        positions,
        floor,
        gate_scale,
        HAS_SLOPE: tl.constexpr,
        HAS_SUPPORT: tl.constexpr,
        GATED: tl.constexpr,
        SIGMOID: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # row r is one position: batch r // positions, position r % positions; feature c of it
        # lies at (batch·width + c)·positions + position (channels last: positions == 1)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        row_ok = r < rows
        col_ok = c < width
        ok = row_ok[:, None] & col_ok[None, :]
        batch = (r // positions).to(tl.int64)
        base = batch * width * positions + (r % positions)
        offsets = base[:, None] + c[None, :].to(tl.int64) * positions
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        delta = tl.load(bias_ptr + c, mask=col_ok, other=0.0)[None, :]
        if HAS_SLOPE:  # the affine map: T(t) − t = (w − 1)·t + b
            delta = delta + tl.load(slope_ptr + c, mask=col_ok, other=0.0)[None, :] * x
        if HAS_SUPPORT:  # the identity outside [lo, hi]; NaN is outside
            lo = tl.load(lo_ptr + c, mask=col_ok, other=0.0)[None, :]
            hi = tl.load(hi_ptr + c, mask=col_ok, other=0.0)[None, :]
            delta = tl.where((x >= lo) & (x <= hi), delta, 0.0)
        strength = tl.load(strength_ptr)
        if GATED:
            weight = tl.load(weight_ptr + c, mask=col_ok, other=0.0)
            logit = tl.sum(x * weight[None, :], axis=1) + tl.load(gate_bias_ptr)
            # NaN stays NaN, as in torch.clamp (the enum is passed inline: it is not a tensor)
            if SIGMOID:
                opening = tl.sigmoid(logit)
            else:
                opening = tl.maximum(logit, 0.0, propagate_nan=tl.PropagateNan.ALL)
                opening = tl.minimum(opening, 1.0, propagate_nan=tl.PropagateNan.ALL)
            gate = tl.maximum(opening - floor, 0.0, propagate_nan=tl.PropagateNan.ALL) * gate_scale
            tl.store(gates_ptr + r, gate, mask=row_ok)
            steered = x + (strength * gate)[:, None] * delta
        else:
            steered = x + strength * delta
        tl.store(out_ptr + offsets, steered.to(out_ptr.dtype.element_ty), mask=ok)

    @torch.library.triton_op("dsas::fused_steer", mutates_args=())
    def _fused_steer_op(
        x: torch.Tensor,
        bias: torch.Tensor,
        slope: torch.Tensor | None,
        lo: torch.Tensor | None,
        hi: torch.Tensor | None,
        weight: torch.Tensor | None,
        gate_bias: torch.Tensor | None,
        strength: torch.Tensor,
        floor: float,
        gate_scale: float,
        sigmoid: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        width = x.shape[-1] if channels_last else x.shape[1]
        positions = 1 if channels_last else x.numel() // max(1, x.shape[0] * width)
        rows = x.numel() // max(1, width)
        out = torch.empty_like(x)
        gated = weight is not None
        gates = torch.empty(rows if gated else 0, device=x.device, dtype=torch.float32)
        if rows == 0:  # an empty batch: no program to launch
            return out, gates
        block_c = triton.next_power_of_2(width)
        block_r = max(1, min(64, 4096 // block_c))
        torch.library.wrap_triton(_steer_kernel)[(triton.cdiv(rows, block_r),)](
            x,
            out,
            gates,
            bias,
            bias if slope is None else slope,  # an unused pointer must still be a tensor
            bias if lo is None else lo,
            bias if hi is None else hi,
            bias if weight is None else weight,
            bias if gate_bias is None else gate_bias,
            strength,
            rows,
            width,
            positions,
            floor,
            gate_scale,
            HAS_SLOPE=slope is not None,
            HAS_SUPPORT=lo is not None,
            GATED=gated,
            SIGMOID=sigmoid,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4 if block_c <= 1024 else 8,
        )
        return out, gates


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
    sigmoid: bool = True,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x + λ·s(x)·(T(x) − x)`` in one kernel, with the tensors of a :class:`PreparedLayer`
    (float32 vectors on ``x``'s device): ``bias`` and ``slope`` (``w − 1``, ``None`` for a
    shift) of the map, its ``support`` bounds or ``None``, ``gate`` as ``(weight, bias)`` or
    ``None`` for uniform steering, ``strength`` a 0-dim float32 tensor. Returns the steered
    activation (``x``'s dtype) and the gate values (``x``'s shape without the feature
    dimension), ``None`` when not gated.
    """
    if not KERNEL_AVAILABLE:
        raise RuntimeError("the fused steering kernel needs Triton (pip install triton); use PreparedLayer instead")
    lo, hi = support if support is not None else (None, None)
    weight, gate_bias = gate if gate is not None else (None, None)
    out, gates = _fused_steer_op(
        x, bias, slope, lo, hi, weight, gate_bias, strength, floor, gate_scale, sigmoid, channels_last
    )
    if gate is None:
        return out, None
    return out, gates.view(x.shape[:-1] if channels_last else x.shape[:1] + x.shape[2:])
