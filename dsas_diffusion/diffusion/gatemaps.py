"""Gate maps as images: the recorded per-position gates of a call, laid out on the image grid
and upsampled to the output's size."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..steering import SteeringError
from ..steering.hooks import SteeringSession

__all__ = ["image_size", "map_size", "session_gate_maps", "spatial"]


def image_size(output: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a pipeline output's images (PIL, or a NHWC / NCHW array), or ``None``."""
    images = output[0] if isinstance(output, tuple) else output.images
    if isinstance(images, list) and images and hasattr(images[0], "size"):
        width, height = images[0].size
        return height, width
    if hasattr(images, "shape") and len(images.shape) == 4:
        shape = tuple(images.shape)
        return (shape[1], shape[2]) if shape[-1] in (1, 3, 4) else (shape[2], shape[3])
    return None


def spatial(gates: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``(B, H, W)`` or ``(B, tokens)`` gates -> ``(B, H', W')`` at the image size."""
    if gates.ndim == 2:
        tokens = gates.shape[1]
        aspect = 1.0 if size is None else size[0] / size[1]
        height = round(math.sqrt(tokens * aspect))
        if height == 0 or tokens % height:
            raise SteeringError(f"cannot lay {tokens} gate tokens out as an image grid")
        gates = gates.reshape(gates.shape[0], height, tokens // height)
    if size is None:
        return gates
    return F.interpolate(gates.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def map_size(pipe: Any, call: Mapping[str, Any], output: Any) -> tuple[int, int] | None:
    """The size gate maps are drawn at: the output images' size, or for ``output_type="latent"``
    the size the call would have decoded to (its ``height`` / ``width``, else the pipeline's
    default sample size times its VAE scale factor)."""
    if call.get("output_type") != "latent":
        return image_size(output)
    height, width = call.get("height"), call.get("width")
    default = getattr(pipe, "default_sample_size", None) or getattr(pipe.denoiser.config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(default, int) and isinstance(scale, int):
        height, width = height or default * scale, width or default * scale
    return (height, width) if height and width else None


def session_gate_maps(
    session: SteeringSession, *, halves: bool, size: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """One ``(steps, images, H, W)`` tensor per layer from a session's recorded gates (the
    second half of each batch only, when ``halves``: the conditional rows)."""
    maps = {}
    for layer, records in session.gate_maps.items():
        if not records:
            continue
        frames = []
        for record in records:
            gates = record.float()
            if halves:
                gates = gates[gates.shape[0] // 2 :]
            frames.append(spatial(gates, size))
        maps[layer] = torch.stack(frames)
    return maps
