"""The Shapes world: deterministic procedural scenes with captions and exact ground truth.

Every scene has one or two flat-coloured objects on a plain background, and a caption in
exactly one of two forms::

    a {colour} {shape} on a {background} background
    a {colour} {shape} and a {colour} {shape} on a {background} background

Examples:
    >>> scene = render_scene(sample_spec(seed=3))
    >>> scene.image.size, scene.caption == caption_for(scene.spec)
    ((64, 64), True)
    >>> spec = parse_caption("a yellow banana and a red square on a black background")
    >>> [(o.colour, o.shape) for o in spec.objects], spec.background
    ([('yellow', 'banana'), ('red', 'square')], 'black')
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "RESOLUTION",
    "SHAPES",
    "ObjectSpec",
    "Scene",
    "SceneSpec",
    "caption_for",
    "parse_caption",
    "render_scene",
    "sample_spec",
    "scene_seed",
]

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle", "star", "banana")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
_SUPERSAMPLE = 4
_CAPTION = re.compile(r"^a (?P<c1>\w+) (?P<s1>\w+)(?: and a (?P<c2>\w+) (?P<s2>\w+))? on a (?P<bg>\w+) background$")


@dataclass(frozen=True)
class ObjectSpec:
    """One object: what it is, where its centre is (pixels), its radius (pixels), its angle (degrees)."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    angle: float = 0.0


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]
    background: str
    resolution: int = RESOLUTION


@dataclass
class Scene:
    """A rendered scene: the RGB image, its caption, and per-object boolean masks (H, W)."""

    image: Image.Image
    caption: str
    spec: SceneSpec
    masks: list[np.ndarray] = field(default_factory=list)


def caption_for(spec: SceneSpec) -> str:
    parts = [f"a {o.colour} {o.shape}" for o in spec.objects]
    return f"{' and '.join(parts)} on a {spec.background} background"


def parse_caption(caption: str, seed: int = 0) -> SceneSpec:
    """The scene a caption describes, with a random layout drawn from ``seed``."""
    match = _CAPTION.match(caption.strip().lower())
    if not match:
        raise ValueError(
            f"{caption!r} is not a Shapes caption; write 'a <colour> <shape> on a <background> background' "
            "or 'a <colour> <shape> and a <colour> <shape> on a <background> background'"
        )
    pairs = [(match["c1"], match["s1"])] + ([(match["c2"], match["s2"])] if match["c2"] else [])
    for colour, shape in pairs:
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; choose from {', '.join(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if match["bg"] not in BACKGROUNDS:
        raise ValueError(f"unknown background {match['bg']!r}; choose from {', '.join(BACKGROUNDS)}")
    rng = random.Random(seed)
    return SceneSpec(_layout(rng, pairs), match["bg"])


def scene_seed(index: int, split: str = "train") -> int:
    """The seed of scene ``index`` in a split; train and test never share a seed."""
    offsets = {"train": 0, "test": 1_000_000_007, "eval": 2_000_000_011}
    if split not in offsets:
        raise ValueError(f"split must be one of {list(offsets)}, got {split!r}")
    return offsets[split] + index


def sample_spec(seed: int, n_objects: int | None = None, resolution: int = RESOLUTION) -> SceneSpec:
    """Draw a scene: objects (1 or 2, distinct in colour or shape), background and layout."""
    rng = random.Random(seed)
    count = n_objects if n_objects is not None else rng.choice((1, 2))
    if count not in (1, 2):
        raise ValueError("a Shapes scene has one or two objects")
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        pair = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if pair not in pairs:
            pairs.append(pair)
    background = rng.choice(list(BACKGROUNDS))
    return SceneSpec(_layout(rng, pairs, resolution), background, resolution)


def _layout(rng: random.Random, pairs: list[tuple[str, str]], resolution: int = RESOLUTION) -> tuple[ObjectSpec, ...]:
    scale = resolution / 64.0
    low, high = (10.0, 17.0) if len(pairs) == 1 else (8.0, 12.0)
    for _ in range(1000):
        objects = []
        for colour, shape in pairs:
            radius = rng.uniform(low, high) * scale
            margin = radius + 1.0 * scale
            x = rng.uniform(margin, resolution - margin)
            y = rng.uniform(margin, resolution - margin)
            objects.append(ObjectSpec(shape, colour, x, y, radius, rng.uniform(0.0, 360.0)))
        if len(objects) == 1 or math.dist((objects[0].x, objects[0].y), (objects[1].x, objects[1].y)) > (
            objects[0].radius + objects[1].radius + 2.0 * scale
        ):
            return tuple(objects)
    raise RuntimeError("could not place the objects without overlap")  # pragma: no cover


def _polygon(obj: ObjectSpec, factor: float) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * factor, obj.y * factor, obj.radius * factor
    theta = math.radians(obj.angle)

    def ring(count: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(theta + offset + 2 * math.pi * k / count),
                cy + radius * math.sin(theta + offset + 2 * math.pi * k / count),
            )
            for k in range(count)
        ]

    if obj.shape == "square":
        return ring(4, r * 0.92, math.pi / 4)
    if obj.shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if obj.shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [point for pair in zip(outer, inner, strict=True) for point in pair]
    raise ValueError(obj.shape)


def _object_mask(obj: ObjectSpec, resolution: int) -> np.ndarray:
    """Boolean mask at ``resolution``, rasterised at 4x and box-downsampled (coverage >= 0.5)."""
    factor = _SUPERSAMPLE
    size = resolution * factor
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = obj.x * factor, obj.y * factor, obj.radius * factor
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif obj.shape == "banana":
        # a crescent: a disc minus a shifted disc, rotated by the object's angle
        theta = math.radians(obj.angle)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        sx, sy = cx + 0.45 * r * math.cos(theta), cy + 0.45 * r * math.sin(theta)
        rr = r * 0.85
        draw.ellipse((sx - rr, sy - rr, sx + rr, sy + rr), fill=0)
    else:
        draw.polygon(_polygon(obj, factor), fill=255)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(resolution, factor, resolution, factor).mean((1, 3))
    return coverage >= 127.5


def render_scene(spec: SceneSpec) -> Scene:
    """Draw ``spec``: flat colours, no anti-aliasing, so every pixel is exactly one palette colour
    and the masks are exactly the pixels of each object."""
    resolution = spec.resolution
    pixels = np.empty((resolution, resolution, 3), dtype=np.uint8)
    pixels[:] = BACKGROUNDS[spec.background]
    masks = []
    for obj in spec.objects:
        mask = _object_mask(obj, resolution)
        pixels[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return Scene(Image.fromarray(pixels, "RGB"), caption_for(spec), spec, masks)
