"""Transparent judges of Shapes images: palette colour masses for colours and backgrounds,
``shapes-clip`` zero-shot for shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .data import BACKGROUNDS, COLOURS, SHAPES

__all__ = [
    "ColourReading",
    "SceneReading",
    "ShapeJudge",
    "banana_drawn",
    "colour_mask",
    "concept_drawn",
    "concept_mask",
    "concepts_drawn",
    "isolate_colour",
    "others_drawn",
    "read_colours",
    "read_objects",
    "read_scenes",
    "unprompted_concept",
]

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


@dataclass
class SceneReading:
    """What the judges read in one image generated for a Shapes caption."""

    objects_as_prompted: bool  # every prompted object found (colour present, shape as prompted)
    background_as_prompted: bool
    shapes: dict[str, str]  # prompted colour -> shape read in that colour's pixels
    present: dict[str, bool]  # prompted colour -> enough pixels of it


def read_scenes(judge: ShapeJudge, images: list[Image.Image], prompts: list[str]) -> list[SceneReading]:
    """Judge each image against its Shapes caption.

    An object counts as found when its colour covers at least ``MIN_OBJECT_PIXELS`` pixels
    (and, for single-object captions, is the dominant object colour) and ``judge`` reads
    the prompted shape in that colour's pixels alone; the background is read off the border.
    """
    from .data import parse_caption

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    readings = [read_colours(image) for image in images]
    specs = [parse_caption(prompt) for prompt in prompts]
    isolated, colours, backgrounds, owners = [], [], [], []
    for index, (spec, reading) in enumerate(zip(specs, readings, strict=True)):
        for obj in spec.objects:
            isolated.append(isolate_colour(images[index], obj.colour, spec.background, reading))
            colours.append(obj.colour)
            backgrounds.append(spec.background)
            owners.append(index)
    shapes = judge.shapes(isolated, colours, backgrounds) if isolated else []
    results = [
        SceneReading(True, reading.background == spec.background, {}, {})
        for reading, spec in zip(readings, specs, strict=True)
    ]
    for owner, colour, shape in zip(owners, colours, shapes, strict=True):
        spec, reading, result = specs[owner], readings[owner], results[owner]
        expected = next(o.shape for o in spec.objects if o.colour == colour)
        present = reading.present(colour)
        ok = present and shape == expected
        if len(spec.objects) == 1:
            ok = ok and reading.dominant_colour == colour
        result.shapes[colour], result.present[colour] = shape, present
        result.objects_as_prompted = result.objects_as_prompted and ok
    return results


def concept_drawn(reading: SceneReading, prompt: str, concept: str) -> bool | None:
    """Is a Shapes ``concept`` (a shape or a colour name) drawn where ``prompt`` asked for it?

    For a shape: the colour of the prompted object of that shape is present and reads as
    that shape. For a colour: that colour is present. ``None`` when the prompt does not
    mention the concept.
    """
    from .data import parse_caption

    spec = parse_caption(prompt)
    if concept in COLOURS:
        if not any(o.colour == concept for o in spec.objects):
            return None
        return reading.present[concept]
    if concept not in SHAPES:
        raise ValueError(f"{concept!r} is neither a Shapes shape ({', '.join(SHAPES)}) nor a colour")
    colours = [o.colour for o in spec.objects if o.shape == concept]
    if not colours:
        return None
    return all(reading.present[c] and reading.shapes[c] == concept for c in colours)


def others_drawn(reading: SceneReading, prompt: str, concept: str) -> bool | None:
    """Are the objects of ``prompt`` that do not carry ``concept`` drawn as prompted (their
    colour present and read as their shape)? ``None`` when every object carries it.

    Example (a red banana and a blue square; the concept is the banana):
        >>> reading = SceneReading(True, True, {"red": "circle", "blue": "square"}, {"red": True, "blue": True})
        >>> others_drawn(reading, "a red banana and a blue square on a white background", "banana")
        True
    """
    from .data import parse_caption

    others = [o for o in parse_caption(prompt).objects if concept not in (o.colour, o.shape)]
    if not others:
        return None
    return all(reading.present.get(o.colour, False) and reading.shapes.get(o.colour) == o.shape for o in others)


def concepts_drawn(judge: ShapeJudge, images: list[Image.Image], prompts: list[str], concept: str) -> list[bool]:
    """For each image: is ``concept`` (a shape or a colour) drawn where its prompt asked for it?

    Prompts that do not mention the concept count as ``False`` (nothing of it drawn there).
    """
    readings = read_scenes(judge, list(images), list(prompts))
    return [bool(concept_drawn(r, p, concept)) for r, p in zip(readings, prompts, strict=True)]


def banana_drawn(judge: ShapeJudge, images: list[Image.Image], prompts: list[str]) -> list[bool]:
    """For each image: is the prompted banana's colour present and shaped like a banana?"""
    return concepts_drawn(judge, images, prompts, "banana")


def concept_mask(image: Image.Image, prompt: str, concept: str) -> np.ndarray:
    """``(H, W)`` boolean mask of the pixels of the object(s) carrying ``concept`` (a shape
    or a colour) that ``prompt`` asks for, found by colour in ``image``; all ``False`` when
    the prompt has no such object.

    Examples:
        >>> from dsas_diffusion.shapes.data import parse_caption, render_scene
        >>> prompt = "a yellow banana and a red square on a black background"
        >>> scene = render_scene(parse_caption(prompt))
        >>> bool((concept_mask(scene.image, prompt, "banana") == scene.masks[0]).all())
        True
    """
    from .data import parse_caption

    return colour_mask(image, [o.colour for o in parse_caption(prompt).objects if concept in (o.colour, o.shape)])


def read_objects(judge: ShapeJudge, images: list[Image.Image]) -> list[dict[str, str]]:
    """What each image shows, read without a caption (an image of the empty prompt): per object
    colour covering at least ``MIN_OBJECT_PIXELS`` pixels, the shape ``judge`` reads in that
    colour's pixels alone on the background read off the border.

    Examples:
        >>> from dsas_diffusion.shapes.data import parse_caption, render_scene
        >>> image = render_scene(parse_caption("a yellow banana and a red square on a black background")).image
        >>> read_objects(ShapeJudge(), [image])
        [{'red': 'square', 'yellow': 'banana'}]
    """
    readings = [read_colours(image) for image in images]
    isolated, owners, colours, backgrounds = [], [], [], []
    for index, reading in enumerate(readings):
        for colour in COLOURS:
            if reading.present(colour):
                isolated.append(isolate_colour(images[index], colour, reading.background, reading))
                owners.append(index)
                colours.append(colour)
                backgrounds.append(reading.background)
    shapes = judge.shapes(isolated, colours, backgrounds) if isolated else []
    objects: list[dict[str, str]] = [{} for _ in images]
    for owner, colour, shape in zip(owners, colours, shapes, strict=True):
        objects[owner][colour] = shape
    return objects


def unprompted_concept(objects: dict[str, str], concept: str) -> list[str]:
    """The colours of the objects in ``objects`` (a :func:`read_objects` reading) that carry
    ``concept``: a colour concept's own colour when present, a shape concept's objects read
    as that shape. Empty when the concept is not drawn.

    Examples:
        >>> unprompted_concept({"red": "square", "yellow": "banana"}, "banana")
        ['yellow']
    """
    if concept in COLOURS:
        return [concept] if concept in objects else []
    if concept not in SHAPES:
        raise ValueError(f"{concept!r} is neither a Shapes shape ({', '.join(SHAPES)}) nor a colour")
    return [colour for colour, shape in objects.items() if shape == concept]


def colour_mask(image: Image.Image, colours: list[str]) -> np.ndarray:
    """``(H, W)`` boolean mask of the pixels nearest to any of the palette ``colours``."""
    labels = read_colours(image).labels
    mask = np.zeros(labels.shape, dtype=bool)
    for colour in colours:
        mask |= labels == _NAMES.index(colour)
    return mask
