"""Pictures of steering: gate heatmaps over images and unsteered | uniform | DSAS comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["Comparison", "compare", "comparison_grid", "gate_heatmap", "mean_gate_map", "overlay_heatmap"]


def mean_gate_map(gate_maps: Mapping[str, Mapping[str, torch.Tensor]], image: int = 0) -> torch.Tensor:
    """One ``(H, W)`` map: image ``image``'s gates averaged over every layer and step."""
    frames = [tensor[:, image].float().mean(0) for layers in gate_maps.values() for tensor in layers.values()]
    if not frames:
        raise ValueError("no gate maps recorded (were all layers deselected by the gate threshold?)")
    return torch.stack(frames).mean(0)


def gate_heatmap(values: torch.Tensor) -> Image.Image:
    """A ``(H, W)`` map in [0, 1] as an RGB heatmap (black -> red -> yellow -> white)."""
    v = values.clamp(0, 1).numpy()
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def overlay_heatmap(image: Image.Image, values: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """``image`` blended with the heatmap of ``values`` (resized to the image)."""
    heat = gate_heatmap(values).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


@dataclass
class Comparison:
    """One prompt rendered unsteered, uniformly steered and with DSAS, plus the DSAS gates."""

    prompt: str
    unsteered: Image.Image
    uniform: Image.Image
    dsas: Image.Image
    gates: torch.Tensor  # (H, W), mean over layers and steps


def compare(
    pipe: Any, prompts: Sequence[str], *, strength: float = 1.0, seed: int = 0, **call_kwargs: Any
) -> list[Comparison]:
    """Render each prompt three ways with the same seed (per prompt ``seed + i``)."""

    def run(**steering: Any):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(list(prompts), generator=generators, **call_kwargs, **steering)

    unsteered = run(steering_strength=0.0).images
    uniform = run(steering_strength=strength, steering_gate=False).images
    gated = run(steering_strength=strength, steering_gate=True, return_gate_maps=True)
    return [
        Comparison(prompt, unsteered[i], uniform[i], gated.images[i], mean_gate_map(gated.gate_maps, i))
        for i, prompt in enumerate(prompts)
    ]


def comparison_grid(comparisons: Sequence[Comparison], scale: int = 3, caption_height: int = 14) -> Image.Image:
    """Rows of ``unsteered | uniform | DSAS | DSAS gates over the DSAS image``, prompt above each row."""
    width, height = comparisons[0].unsteered.size
    cell_w, cell_h = width * scale, height * scale
    titles = ["unsteered", "uniform", "DSAS", "DSAS gate"]
    canvas = Image.new("RGB", (4 * cell_w, caption_height + len(comparisons) * (cell_h + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((col * cell_w + 4, 1), title, fill="black")
    for row, item in enumerate(comparisons):
        top = caption_height + row * (cell_h + caption_height)
        draw.text((4, top + 1), item.prompt, fill="black")
        cells = [item.unsteered, item.uniform, item.dsas, overlay_heatmap(item.dsas, item.gates)]
        for col, cell in enumerate(cells):
            canvas.paste(
                cell.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (col * cell_w, top + caption_height)
            )
    return canvas
