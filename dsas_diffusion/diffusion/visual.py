"""Pictures of steering: gate heatmaps over images and unsteered | uniform | DSAS comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "Comparison",
    "compare",
    "comparison_grid",
    "gate_heatmap",
    "image_grid",
    "mean_gate_map",
    "overlay_heatmap",
    "rows_of",
]


def rows_of(items: Sequence[Any], columns: int) -> list[list[Any]]:
    """``items`` in rows of ``columns`` (the last row may be shorter).

    Examples:
        >>> rows_of([1, 2, 3, 4, 5], 2)
        [[1, 2], [3, 4], [5]]
    """
    return [list(items[i : i + columns]) for i in range(0, len(items), columns)]


def image_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    *,
    scale: int = 1,
    cell_size: tuple[int, int] | None = None,
    title: str | None = None,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell_notes: Sequence[Sequence[str]] | None = None,
    gap: int = 0,
    line_height: int = 12,
    label_width: int = 56,
    note_width: int = 90,
) -> Image.Image:
    """The one image-grid drawing of the project (CLI, app, evaluation report, benchmarks).

    Args:
        rows: rows of images (``None`` leaves a cell blank); each is resized (nearest
            neighbour) to ``cell_size``, by default the first image's size times ``scale``.
        title: a line above everything.
        column_titles: a line of titles above the columns.
        row_titles: a caption line above each row (e.g. its prompt).
        row_labels: a label left of each row, in a ``label_width`` column.
        cell_notes: text drawn right of each cell, in a ``note_width`` margin.
        gap: pixels between columns.

    Examples:
        >>> cells = [[Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]]
        >>> image_grid(cells, scale=2, column_titles=["a", "b"]).size
        (32, 28)
    """
    first = next((image for row in rows for image in row if image is not None), None)
    if first is None:
        raise ValueError("image_grid needs at least one image")
    width, height = cell_size or (first.size[0] * scale, first.size[1] * scale)
    columns = max(len(row) for row in rows)
    note = note_width if cell_notes is not None else 0
    left = label_width if row_labels is not None else 0
    column_step = width + note + gap
    header = line_height * ((title is not None) + (column_titles is not None))
    row_caption = line_height if row_titles is not None else 0
    row_step = height + row_caption
    canvas = Image.new("RGB", (left + columns * column_step - gap, header + len(rows) * row_step), "white")
    draw = ImageDraw.Draw(canvas)
    if title is not None:
        draw.text((2, 0), title, fill="black")
    if column_titles is not None:
        for col, text in enumerate(column_titles):
            draw.text((left + col * column_step + 2, header - line_height), text, fill="black")
    for index, row in enumerate(rows):
        top = header + index * row_step
        if row_titles is not None:
            draw.text((2, top), row_titles[index], fill="black")
        if row_labels is not None:
            draw.text((4, top + row_caption + height // 2 - 6), row_labels[index], fill="black")
        for col, image in enumerate(row):
            x, y = left + col * column_step, top + row_caption
            if image is not None:
                canvas.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (x, y))
            if cell_notes is not None and cell_notes[index][col]:
                draw.text((x + width + 4, y + height // 2 - 18), cell_notes[index][col], fill="black")
    return canvas


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
    uniform = run(steering_strength=strength, steering_gate="none").images
    gated = run(steering_strength=strength, steering_gate="dsas", return_gate_maps=True)
    return [
        Comparison(prompt, unsteered[i], uniform[i], gated.images[i], mean_gate_map(gated.gate_maps, i))
        for i, prompt in enumerate(prompts)
    ]


def comparison_grid(comparisons: Sequence[Comparison], scale: int = 3) -> Image.Image:
    """Rows of ``unsteered | uniform | DSAS | DSAS gates over the DSAS image``, prompt above each row."""
    rows = [[c.unsteered, c.uniform, c.dsas, overlay_heatmap(c.dsas, c.gates)] for c in comparisons]
    return image_grid(
        rows,
        scale=scale,
        column_titles=["unsteered", "uniform", "DSAS", "DSAS gate"],
        row_titles=[c.prompt for c in comparisons],
        line_height=14,
    )
