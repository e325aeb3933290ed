"""Pictures the demo returns: image files, upscaling, gate overlays per layer and the
strength-sweep strip."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..diffusion.visual import image_grid, overlay_heatmap
from .validation import InputError

__all__ = ["ImageFiles", "gate_overlays", "sweep_strip", "upscale"]


class ImageFiles:
    """Writes result images to unique PNG files in one private folder (removed at exit).

    Gradio's own caching of returned PIL images rewrites a file named by the image's
    content in place, so two concurrent requests returning the same image (two users with
    the same prompt and seed) can serve each other a half-written file; it copies returned
    *paths* into its cache atomically instead, so the demo returns paths.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dsas-demo-"))
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)

    def save(self, image: Image.Image) -> str:
        """``image`` as a new PNG file; its path."""
        path = self.folder / f"{uuid.uuid4().hex}.png"
        image.save(path, format="PNG")
        return str(path)


def upscale(image: Image.Image, min_side: int = 256) -> Image.Image:
    """``image`` enlarged by a whole factor (nearest neighbour) so that its short side is at
    least ``min_side``; unchanged when already large enough."""
    factor = -(-min_side // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def gate_overlays(
    image: Image.Image, gate_maps: Mapping[str, np.ndarray], step: int = 0, *, min_side: int = 256
) -> list[tuple[Image.Image, str]]:
    """One gate heatmap over ``image`` per layer, plus the mean over layers first.

    ``step`` 0 averages the gates over every steered denoising step; ``step`` k shows the k-th
    steered step (1-based; every step, unless the steering has a step window).
    """
    if not gate_maps:
        return []
    total = next(iter(gate_maps.values())).shape[0]
    step = int(step)
    if not 0 <= step <= total:
        raise InputError(f"The gate step must be between 0 (mean over steps) and {total}, got {step}.")
    when = "mean over steps" if step == 0 else f"steered step {step}/{total}"
    frames = {layer: maps.mean(0) if step == 0 else maps[step - 1] for layer, maps in gate_maps.items()}
    shown = {"all layers": np.mean(list(frames.values()), axis=0), **frames}
    items = []
    for layer, values in shown.items():
        overlay = overlay_heatmap(image, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
        items.append((upscale(overlay, min_side), f"{layer}: mean gate {float(values.mean()):.2f} ({when})"))
    return items


def sweep_strip(rows: Mapping[str, Sequence[Image.Image]], strengths: Sequence[float], cell: int = 128) -> Image.Image:
    """Images at each strength (columns), one row per gating (``{"uniform": [...], "DSAS": [...]}``)."""
    return image_grid(
        [list(images) for images in rows.values()],
        cell_size=(cell, cell),
        column_titles=[f"lambda = {s:.2f}" for s in strengths],
        row_labels=list(rows),
        line_height=16,
    )
