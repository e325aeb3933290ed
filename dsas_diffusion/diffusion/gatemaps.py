"""Gate maps as images: the recorded per-position gates of a call, laid out on the image grid
and upsampled to the output's size."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..steering import SteeringError

__all__ = ["image_size", "spatial"]


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
