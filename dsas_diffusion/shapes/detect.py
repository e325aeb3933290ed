"""Transparent judges of Shapes images: palette colour masses for colours and backgrounds,
``shapes-clip`` zero-shot for shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .data import BACKGROUNDS, COLOURS, SHAPES

__all__ = ["ColourReading", "ShapeJudge", "isolate_colour", "read_colours"]

_NAMES = list(COLOURS) + [f"bg:{name}" for name in BACKGROUNDS]
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
MIN_OBJECT_PIXELS = 20  # an object of the smallest drawn size covers more than 60 pixels


@dataclass
class ColourReading:
    """Pixel counts per palette colour, and the background read off the image's border."""

    masses: dict[str, int]
    background: str
    labels: np.ndarray  # (H, W) index into the palette of each pixel

    @property
    def dominant_colour(self) -> str:
        return max(COLOURS, key=lambda name: self.masses[name])

    def present(self, colour: str, min_pixels: int = MIN_OBJECT_PIXELS) -> bool:
        return self.masses[colour] >= min_pixels


def read_colours(image: Image.Image) -> ColourReading:
    """Assign every pixel to its nearest palette colour (RGB distance) and count.

    The background is the background colour nearest to the median of the 1-pixel frame.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    labels = distances.argmin(-1)
    counts = np.bincount(labels.ravel(), minlength=len(_PALETTE))
    frame = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    median = np.median(frame, axis=0)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    background = list(BACKGROUNDS)[int(((backgrounds - median) ** 2).sum(-1).argmin())]
    return ColourReading({name: int(c) for name, c in zip(_NAMES, counts, strict=True)}, background, labels)


def isolate_colour(
    image: Image.Image, colour: str, background: str, reading: ColourReading | None = None
) -> Image.Image:
    """The image with every pixel not of ``colour`` painted ``background``: one object alone."""
    reading = reading or read_colours(image)
    keep = reading.labels == _NAMES.index(colour)
    out = np.empty((*keep.shape, 3), dtype=np.uint8)
    out[:] = BACKGROUNDS[background]
    out[keep] = COLOURS[colour]
    return Image.fromarray(out, "RGB")


class ShapeJudge:
    """Zero-shot shape classification with an open_clip model (``shapes-clip`` by default):
    the shape whose caption ``a {colour} {shape} on a {background} background`` scores highest."""

    def __init__(self, model=None, preprocess=None, tokenizer=None, device: str = "cpu") -> None:
        if model is None:
            from .clip import load_shapes_clip

            model, preprocess, tokenizer = load_shapes_clip(device)
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device
        self._text_cache: dict[tuple[str, str], torch.Tensor] = {}

    def _text(self, colour: str, background: str) -> torch.Tensor:
        key = (colour, background)
        if key not in self._text_cache:
            captions = [f"a {colour} {shape} on a {background} background" for shape in SHAPES]
            with torch.no_grad():
                self._text_cache[key] = self.model.encode_text(self.tokenizer(captions).to(self.device), normalize=True)
        return self._text_cache[key]

    @torch.no_grad()
    def shapes(self, images: list[Image.Image], colours: list[str], backgrounds: list[str]) -> list[str]:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        features = self.model.encode_image(batch, normalize=True)
        out = []
        for feature, colour, background in zip(features, colours, backgrounds, strict=True):
            out.append(SHAPES[int((self._text(colour, background) @ feature).argmax())])
        return out
