"""The example steerings shipped with the package (fitted on ``shapes-sd``), and their recipe.

``dsas examples`` refits them: it loads ``shapes-sd`` as a DSAS pipeline and calls
:func:`fit_example_steering` for each concept. This module only needs that pipeline's
``fit_steering``; it does not import the diffusers integration.

Example:
    >>> sorted(example_steerings())
    ['banana', 'red']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..steering.persistence import CONFIG_NAME
from .concepts import concept_prompts

__all__ = ["EXAMPLES_DIR", "EXAMPLE_CONCEPTS", "EXAMPLE_FIT", "example_steerings", "fit_example_steering"]

EXAMPLES_DIR = Path(__file__).resolve().parent / "steering"
EXAMPLE_CONCEPTS = ("banana", "red")
#: the ``fit_steering`` arguments of the shipped examples: its defaults (those of ``make demo``), seed 0
EXAMPLE_FIT: dict[str, Any] = {"seed": 0}


def example_steerings() -> dict[str, Path]:
    """The shipped example steerings by concept name."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(EXAMPLES_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def fit_example_steering(pipe: Any, concept: str = "banana", out: str | os.PathLike[str] | None = None) -> Path:
    """Fit the example steering of a Shapes concept with ``pipe`` (a DSAS pipeline of
    ``shapes-sd``) from the shipped prompt sets and save it (to the package's
    ``shapes/steering/<concept>`` unless ``out`` is given). The same machine and library
    versions give the same files on every run."""
    source, target, control = concept_prompts(concept)
    torch.manual_seed(0)
    steerer = pipe.fit_steering(source, target, control, progress=False, **EXAMPLE_FIT)
    steerer.provenance["base_model"] = "shapes-sd"  # not the local folder it was loaded from
    target_dir = Path(out) if out is not None else EXAMPLES_DIR / concept
    steerer.save_pretrained(target_dir)
    return target_dir
