"""The Shapes concept sets shipped with the package: prompt files to fit and evaluate steering.

Each concept has a folder ``prompts/<concept>/`` with ``source.txt`` (prompts showing the
concept), ``target.txt`` (the same scenes without it) and ``control.txt`` (prompts steering
must leave alone), and evaluation prompts: ``eval_concept.txt`` / ``eval_control.txt`` (32
each; no pair of them is in a fitting set) and ``eval_pairs.txt`` (32 pairs of one object
carrying the concept and one not, for the spatial test). The ``star``, ``green`` and
``triangle`` sets are :func:`make_concept_sets` with seed 0; the evaluation sets of ``banana``
and ``red`` extend hand-made fitting sets with prompts drawn by it (seeds 1-5).

Examples:
    >>> source, target, control = concept_prompts("banana")
    >>> source[0], target[0]
    ('a red banana on a white background', 'a red circle on a white background')
"""

from __future__ import annotations

import random
from pathlib import Path

from ..prompts import read_prompts
from .data import BACKGROUNDS, COLOURS, SHAPES

__all__ = [
    "EVAL_SETS",
    "FIT_SETS",
    "HELD_OUT_CONCEPTS",
    "PROMPTS_DIR",
    "TUNING_CONCEPTS",
    "concept_dir",
    "concept_names",
    "concept_prompts",
    "evaluation_prompts",
    "make_concept_sets",
]

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
FIT_SETS = ("source", "target", "control")
EVAL_SETS = ("eval_concept", "eval_control", "eval_pairs")
#: concepts the settings may be tuned on: an object (banana), a colour, a shape
TUNING_CONCEPTS = ("banana", "red", "star")
#: concepts set aside before any tuning (their prompt files were committed first); reported last
HELD_OUT_CONCEPTS = ("green", "triangle")


def concept_names() -> list[str]:
    """The concepts that ship prompt sets, sorted."""
    return sorted(p.name for p in PROMPTS_DIR.iterdir() if (p / "source.txt").is_file())


def concept_dir(concept: str) -> Path:
    """The folder of a shipped concept's prompt files (a ``ValueError`` names the shipped ones)."""
    folder = PROMPTS_DIR / concept
    if not (folder / "source.txt").is_file():
        raise ValueError(f"no Shapes concept {concept!r}; shipped concepts: {', '.join(concept_names())}")
    return folder


def concept_prompts(concept: str | Path = "banana") -> tuple[list[str], list[str], list[str]]:
    """The source / target / control prompt sets of a shipped concept (or of a folder holding
    ``source.txt``, ``target.txt`` and ``control.txt``)."""
    folder = concept if isinstance(concept, Path) else concept_dir(concept)
    source, target, control = (read_prompts(folder / f"{name}.txt") for name in FIT_SETS)
    return source, target, control


def evaluation_prompts(count: int = 16, seed: int = 2024) -> tuple[list[str], list[str]]:
    """Held-out banana prompts (two-object pairs absent from the fitting sets, and single
    bananas with new seeds) and control prompts without a banana, drawn from ``seed``."""
    folder = concept_dir("banana")
    seen = set(read_prompts(folder / "source.txt")) | set(read_prompts(folder / "control.txt"))
    colours, backgrounds = tuple(COLOURS), tuple(BACKGROUNDS)
    other_shapes = tuple(shape for shape in SHAPES if shape != "banana")
    rng = random.Random(seed)
    banana: list[str] = []
    control: list[str] = []
    while len(banana) < count:
        colour, background = rng.choice(colours), rng.choice(backgrounds)
        if len(banana) % 2 == 0:
            prompt = f"a {colour} banana on a {background} background"
        else:
            other = rng.choice([c for c in colours if c != colour])
            prompt = f"a {colour} banana and a {other} {rng.choice(other_shapes)} on a {background} background"
        if prompt not in banana and (len(banana) % 2 == 0 or prompt not in seen):
            banana.append(prompt)
    while len(control) < count:
        colour, background = rng.choice(colours), rng.choice(backgrounds)
        prompt = f"a {colour} {rng.choice(other_shapes)} on a {background} background"
        if prompt not in control and prompt not in seen:
            control.append(prompt)
    return banana, control


# -- making concept sets -------------------------------------------------------------------------
def _caption(objects: list[tuple[str, str]], background: str) -> str:
    described = " and ".join(f"a {colour} {shape}" for colour, shape in objects)
    return f"{described} on a {background} background"


def _carries(concept: str, colour: str, shape: str) -> bool:
    return concept in (colour, shape)


def _without_concept(concept: str, objects: list[tuple[str, str]], background: str) -> str:
    """The target of a source scene: a shape concept becomes a circle (a lone object) or is
    left out (a pair); a colour concept is repainted in the first of blue, green, red that
    neither the concept nor the other object has."""
    if concept in SHAPES:
        if len(objects) == 1:
            colour, _ = objects[0]
            return _caption([(colour, "circle" if concept != "circle" else "square")], background)
        return _caption([o for o in objects if o[1] != concept], background)
    others = {colour for colour, _ in objects}
    replacement = next(c for c in ("blue", "green", "red") if c != concept and c not in others)
    return _caption([(replacement if c == concept else c, s) for c, s in objects], background)


def make_concept_sets(concept: str, seed: int = 0, fit_pairs: int = 15, eval_count: int = 32) -> dict[str, list[str]]:
    """Prompt sets for a Shapes ``concept`` (a shape or a colour), drawn from ``seed``.

    * ``source``: every single object carrying the concept on every background, then
      ``fit_pairs`` two-object scenes with one object carrying it; ``target``: each source
      scene without the concept (see :func:`_without_concept`), line by line;
    * ``control``: as many scenes without the concept, lone objects and pairs, covering every
      other colour and shape;
    * ``eval_concept``: ``eval_count`` scenes with the concept, half lone objects (the same
      captions as in ``source``, rendered with other seeds), half pairs absent from ``source``;
    * ``eval_control``: ``eval_count`` scenes without it, absent from ``control``;
    * ``eval_pairs``: ``eval_count`` pairs of one object carrying the concept and one that does
      not, absent from ``source``: the spatial test (remove one object, keep the other).
    """
    if concept not in SHAPES and concept not in COLOURS:
        raise ValueError(f"{concept!r} is neither a Shapes shape ({', '.join(SHAPES)}) nor a colour")
    rng = random.Random(f"{concept}-{seed}")
    colours, shapes, backgrounds = tuple(COLOURS), tuple(SHAPES), tuple(BACKGROUNDS)
    objects = [(c, s) for c in colours for s in shapes]
    carrying = [o for o in objects if _carries(concept, *o)]
    free = [o for o in objects if not _carries(concept, *o)]

    def pairs(count: int, with_concept: bool, exclude: set[str]) -> list[str]:
        found: list[str] = []
        while len(found) < count:
            first = rng.choice(carrying if with_concept else free)
            second = rng.choice([o for o in free if o[0] != first[0]])
            scene = [first, second] if rng.random() < 0.5 else [second, first]
            prompt = _caption(scene, rng.choice(backgrounds))
            if prompt not in found and prompt not in exclude:
                found.append(prompt)
        return found

    def lone(count: int, with_concept: bool, exclude: set[str]) -> list[str]:
        pool = [_caption([o], b) for o in (carrying if with_concept else free) for b in backgrounds]
        pool = [p for p in pool if p not in exclude]
        return rng.sample(pool, min(count, len(pool)))

    singles = [_caption([o], b) for o in carrying for b in backgrounds]
    source = singles + pairs(fit_pairs, True, set())
    target = [_without_concept(concept, _objects_of(p), _background_of(p)) for p in source]
    control = lone(len(singles), False, set())
    control += pairs(len(source) - len(control), False, set(control))
    half = eval_count // 2
    eval_concept = rng.sample(singles, min(half, len(singles)))
    eval_concept += pairs(eval_count - len(eval_concept), True, set(source))
    eval_control = lone(half, False, set(control))
    eval_control += pairs(eval_count - len(eval_control), False, set(control) | set(eval_control))
    eval_pairs = pairs(eval_count, True, set(source))
    return {
        "source": source,
        "target": target,
        "control": control,
        "eval_concept": eval_concept,
        "eval_control": eval_control,
        "eval_pairs": eval_pairs,
    }


def _objects_of(prompt: str) -> list[tuple[str, str]]:
    from .data import parse_caption

    return [(o.colour, o.shape) for o in parse_caption(prompt).objects]


def _background_of(prompt: str) -> str:
    from .data import parse_caption

    return parse_caption(prompt).background
