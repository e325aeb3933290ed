"""The example steerings shipped with the package, and their recipe: per concept one fitted
on ``shapes-sd`` with the pipelines' defaults (``steering/<concept>``), the banana also with gates
that see the image (``steering/banana-image``), and per text concept and map one fitted on
``shapes-lm`` (``steering/text/<concept>-<map>``).

``dsas examples`` refits them: it loads ``shapes-sd`` as a DSAS pipeline and calls
:func:`fit_example_steering` for each example (``--text``: ``shapes-lm`` and
:func:`fit_text_example`). This module only needs the models' ``fit_steering``; it does not
import the diffusers integration.

Examples:
    >>> sorted(example_steerings())
    ['banana', 'banana-image', 'red']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import FitConfig
from ..steering.persistence import CONFIG_NAME
from .concepts import concept_prompts

__all__ = [
    "DECIDED",
    "EXAMPLES_DIR",
    "EXAMPLE_CONCEPTS",
    "EXAMPLE_FIT",
    "EXAMPLE_FITS",
    "IMAGE_GATES",
    "TEXT_EXAMPLE_FIT",
    "TEXT_EXAMPLE_MAPS",
    "example_steerings",
    "fit_example_steering",
    "fit_text_example",
    "text_example_steerings",
]

EXAMPLES_DIR = Path(__file__).resolve().parent / "steering"
EXAMPLE_CONCEPTS = ("banana", "red")
#: what the shipped examples are fitted with: the pipelines' defaults (those of ``make demo``), seed 0
EXAMPLE_FIT = FitConfig.for_diffusion(seed=0)
#: gates that see the image (``docs/removal.md``, section 6): on each cross-attention's query
#: input, fitted on the positions found by contrast with the target, shut or fully open at the
#: 90% quantile of control positions, with a sample gate per layer; every layer kept
IMAGE_GATES: dict[str, Any] = dict(
    gate_reads="input",
    gate_fit_on="contrast",
    gate_activation="step",
    gate_calibration="control-positions",
    calibration_quantile=0.9,
    sample_gate=True,
    n_components=16,
    gate_threshold=None,
)
#: one decision per image from the first 12 of 25 steps, steering after them (section 7)
DECIDED: dict[str, Any] = dict(steering_steps=(0.48, 1.0), sample_decision="accumulated", decision_inference_steps=25)
#: the examples by name: ``<concept>`` with :data:`EXAMPLE_FIT`, ``<concept>-image`` with the
#: gates that see the image and the stacked per-image decision (``docs/removal.md``, section 7)
EXAMPLE_FITS = {
    **{concept: (concept, EXAMPLE_FIT) for concept in EXAMPLE_CONCEPTS},
    "banana-image": (
        "banana",
        FitConfig.for_diffusion(**IMAGE_GATES, **{**DECIDED, "sample_decision": "stacked"}, seed=0),
    ),
}


def example_steerings() -> dict[str, Path]:
    """The shipped example steerings by concept name."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(EXAMPLES_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def fit_example_steering(pipe: Any, name: str = "banana", out: str | os.PathLike[str] | None = None) -> Path:
    """Fit the example steering ``name`` (:data:`EXAMPLE_FITS`) with ``pipe`` (a DSAS pipeline of
    ``shapes-sd``) from the shipped prompt sets and save it (to the package's
    ``shapes/steering/<name>`` unless ``out`` is given). The same machine and library
    versions give the same files on every run."""
    if name not in EXAMPLE_FITS:
        raise ValueError(f"no example steering {name!r}; the examples are {sorted(EXAMPLE_FITS)}")
    concept, config = EXAMPLE_FITS[name]
    source, target, control = concept_prompts(concept)
    torch.manual_seed(0)
    steerer = pipe.fit_steering(source, target, control, config, progress=False)
    steerer.provenance["base_model"] = "shapes-sd"  # not the local folder it was loaded from
    target_dir = Path(out) if out is not None else EXAMPLES_DIR / name
    steerer.save_pretrained(target_dir)
    return target_dir


TEXT_EXAMPLES_DIR = EXAMPLES_DIR / "text"
TEXT_EXAMPLE_MAPS = ("caa", "iti", "linear-act")
#: the language models' defaults (docs/text.md), seed 0 (the map is chosen per example); the
#: saved λ is 16, where the CAA example removes most of the negative register (docs/text.md)
TEXT_EXAMPLE_FIT = FitConfig.for_text(seed=0, strength=16.0)


def text_example_steerings() -> dict[tuple[str, str], Path]:
    """The shipped ``shapes-lm`` example steerings by ``(concept, map)``.

    Examples:
        >>> sorted(text_example_steerings())[:2]
        [('banana', 'caa'), ('banana', 'iti')]
    """
    if not TEXT_EXAMPLES_DIR.is_dir():
        return {}
    found = {}
    for folder in sorted(TEXT_EXAMPLES_DIR.iterdir()):
        if (folder / CONFIG_NAME).is_file():
            concept, _, map_name = folder.name.partition("-")
            found[(concept, map_name)] = folder
    return found


def fit_text_example(
    lm: Any, concept: str = "negative", map: str = "caa", out: str | os.PathLike[str] | None = None
) -> Path:
    """Fit the ``shapes-lm`` example steering of a text concept with ``lm`` (a
    ``DSASLanguageModel`` of ``shapes-lm``) on its fitting documents and save it (to the
    package's ``shapes/steering/text/<concept>-<map>`` unless ``out`` is given)."""
    from ..prompts import read_prompts
    from .text_sets import text_concept_files

    files = text_concept_files(concept)
    source, target, control = (read_prompts(files[name]) for name in ("source", "target", "control"))
    torch.manual_seed(0)
    steerer = lm.fit_steering(source, target, control, TEXT_EXAMPLE_FIT.replace(map=map), progress=False)
    steerer.provenance["base_model"] = "shapes-lm"
    steerer.provenance["concept"] = concept
    target_dir = Path(out) if out is not None else TEXT_EXAMPLES_DIR / f"{concept}-{map}"
    steerer.save_pretrained(target_dir)
    return target_dir
