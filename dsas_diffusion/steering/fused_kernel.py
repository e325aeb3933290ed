"""The Triton kernel behind :func:`dsas_diffusion.steering.fused.fused_steer` and its custom op
``dsas::fused_steer``. Imported on first use only (importing Triton takes about a second), and
only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_steer_op", "steer_kernel"]


@triton.jit
def _map_delta(x, c, col_ok, bias_ptr, slope_ptr, lo_ptr, hi_ptr, HAS_SLOPE: tl.constexpr, HAS_SUPPORT: tl.constexpr):
    """T(t) − t at each feature of ``x``: the shift ``b``, or the affine map's ``(w − 1)·t + b``;
    0 outside the support ``[lo, hi]`` (NaN is outside)."""
    delta = tl.load(bias_ptr + c, mask=col_ok, other=0.0)[None, :]
    if HAS_SLOPE:
        delta = delta + tl.load(slope_ptr + c, mask=col_ok, other=0.0)[None, :] * x
    if HAS_SUPPORT:
        lo = tl.load(lo_ptr + c, mask=col_ok, other=0.0)[None, :]
        hi = tl.load(hi_ptr + c, mask=col_ok, other=0.0)[None, :]
        delta = tl.where((x >= lo) & (x <= hi), delta, 0.0)
    return delta


@triton.jit
def _gate_logit(
    x,
    r,
    c,
    col_ok,
    row_ok,
    batch,
    u_ptr,
    weight_ptr,
    gate_bias_ptr,
    gate_width,
    positions,
    READS_INPUT: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """The gate's logit at each row: on the steered activation ``x``, or on the module's input
    ``u`` at the same positions (``READS_INPUT``)."""
    if READS_INPUT:
        g = tl.arange(0, BLOCK_G)
        g_ok = g < gate_width
        u_base = batch * gate_width * positions + (r % positions)
        u_offsets = u_base[:, None] + g[None, :].to(tl.int64) * positions
        u = tl.load(u_ptr + u_offsets, mask=row_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + g, mask=g_ok, other=0.0)
        logit = tl.sum(u * weight[None, :], axis=1) + tl.load(gate_bias_ptr)
    else:
        weight = tl.load(weight_ptr + c, mask=col_ok, other=0.0)
        logit = tl.sum(x * weight[None, :], axis=1) + tl.load(gate_bias_ptr)
    return logit


@triton.jit
def _opening(logit, ACTIVATION: tl.constexpr):
    """The gate's opening in [0, 1]; NaN stays NaN, as in torch.clamp (the activation's code is
    passed inline: it is not a tensor)."""
    if ACTIVATION == 0:  # sigmoid
        opening = tl.sigmoid(logit)
    elif ACTIVATION == 2:  # step: 1 above 0 (NaN: 0, as in PyTorch's comparison)
        opening = tl.where(logit > 0.0, 1.0, 0.0)
    else:  # ReLU clipped at 1
        opening = tl.maximum(logit, 0.0, propagate_nan=tl.PropagateNan.ALL)
        opening = tl.minimum(opening, 1.0, propagate_nan=tl.PropagateNan.ALL)
    return opening


@triton.jit
def steer_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    gates_ptr,
    bias_ptr,
    slope_ptr,
    lo_ptr,
    hi_ptr,
    weight_ptr,
    gate_bias_ptr,
    factor_ptr,
    strength_ptr,
    rows,
    width,
    gate_width,
    positions,
    sample_rows,
    floor,
    gate_scale,
    HAS_SLOPE: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    GATED: tl.constexpr,
    READS_INPUT: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    PER_ROW: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # row r is one position: batch r // positions, position r % positions (sample r // sample_rows); feature c of it
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
    delta = _map_delta(x, c, col_ok, bias_ptr, slope_ptr, lo_ptr, hi_ptr, HAS_SLOPE, HAS_SUPPORT)
    if PER_ROW:  # one λ per sample
        strength = tl.load(strength_ptr + r // sample_rows, mask=row_ok, other=0.0)
    else:
        strength = tl.load(strength_ptr)
    if GATED:
        logit = _gate_logit(
            x,
            r,
            c,
            col_ok,
            row_ok,
            batch,
            u_ptr,
            weight_ptr,
            gate_bias_ptr,
            gate_width,
            positions,
            READS_INPUT,
            BLOCK_G,
        )
        opening = _opening(logit, ACTIVATION)
        gate = tl.maximum(opening - floor, 0.0, propagate_nan=tl.PropagateNan.ALL) * gate_scale
        if HAS_FACTOR:  # the sample gate's value for the row's sample
            gate = gate * tl.load(factor_ptr + r // sample_rows, mask=row_ok, other=0.0)
        tl.store(gates_ptr + r, gate, mask=row_ok)
        steered = x + (strength * gate)[:, None] * delta
    elif PER_ROW:
        steered = x + strength[:, None] * delta
    else:
        steered = x + strength * delta
    tl.store(out_ptr + offsets, steered.to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.triton_op("dsas::fused_steer", mutates_args=())
def fused_steer_op(
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
    activation: int,
    channels_last: bool,
    gate_input: torch.Tensor | None = None,
    sample_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    u = x if gate_input is None else gate_input.contiguous()
    width = x.shape[-1] if channels_last else x.shape[1]
    gate_width = u.shape[-1] if channels_last else u.shape[1]
    positions = 1 if channels_last else x.numel() // max(1, x.shape[0] * width)
    rows = x.numel() // max(1, width)
    out = torch.empty_like(x)
    gated = weight is not None
    gates = torch.empty(rows if gated else 0, device=x.device, dtype=torch.float32)
    if rows == 0:  # an empty batch: no program to launch
        return out, gates
    block_c = triton.next_power_of_2(width)
    block_g = triton.next_power_of_2(gate_width) if gate_input is not None else 1
    block_r = max(1, min(64, 4096 // max(block_c, block_g)))
    torch.library.wrap_triton(steer_kernel)[(triton.cdiv(rows, block_r),)](
        x,
        u,
        out,
        gates,
        bias,
        bias if slope is None else slope,  # an unused pointer must still be a tensor
        bias if lo is None else lo,
        bias if hi is None else hi,
        bias if weight is None else weight,
        bias if gate_bias is None else gate_bias,
        bias if sample_factor is None else sample_factor.contiguous(),
        strength,
        rows,
        width,
        gate_width,
        positions,
        rows // max(1, x.shape[0]),  # the rows of one sample
        floor,
        gate_scale,
        HAS_SLOPE=slope is not None,
        HAS_SUPPORT=lo is not None,
        GATED=gated,
        READS_INPUT=gate_input is not None,
        HAS_FACTOR=sample_factor is not None,
        PER_ROW=strength.ndim == 1,
        ACTIVATION=activation,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BLOCK_G=block_g,
        num_warps=4 if max(block_c, block_g) <= 1024 else 8,
    )
    return out, gates
