"""Names of the embedded Shapes models, usable wherever a hub id or local path is accepted."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHAPES_MODELS", "is_shapes_model", "is_shapes_world", "load_shapes_pipeline", "resolve_model_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHAPES_MODELS = ("shapes-sd", "shapes-mmdit", "shapes-clip", "shapes-lm")


def is_shapes_model(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is the name of a shipped Shapes model (``shapes-sd``, ...)."""
    return str(name) in SHAPES_MODELS


def is_shapes_world(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` is a Shapes model: a shipped name, or a folder with a Shapes name such
    as the ones ``python -m dsas_diffusion.shapes.train`` writes (``--out DIR`` gives ``DIR/shapes-sd``).
    Such models are scored with ``shapes-clip`` and the Shapes detectors, and load in float32.

    Examples:
        >>> is_shapes_world("shapes-sd"), is_shapes_world("stabilityai/stable-diffusion-2-1")
        (True, False)
    """
    return is_shapes_model(model) or (Path(model).name in SHAPES_MODELS and Path(model).is_dir())


def resolve_model_path(name: str | os.PathLike[str]) -> Path | str:
    """The local folder of a Shapes model name; any other id or path is returned unchanged.

    Examples:
        >>> resolve_model_path("shapes-sd").name
        'shapes-sd'
        >>> resolve_model_path("stabilityai/stable-diffusion-3-medium-diffusers")
        'stabilityai/stable-diffusion-3-medium-diffusers'
    """
    if not is_shapes_model(name):
        return name
    path = WEIGHTS_DIR / str(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"the embedded model {name!r} is not at {path}; it ships with the repository. Rebuild it with "
            f"`python -m dsas_diffusion.shapes.train {str(name).removeprefix('shapes-')}`."
        )
    return path


def load_shapes_pipeline(name: str | os.PathLike[str] = "shapes-sd", **kwargs):
    """Load ``shapes-sd`` or ``shapes-mmdit`` (or a folder of that name written by
    ``python -m dsas_diffusion.shapes.train``) with the stock diffusers classes.

    ``shapes-mmdit`` is a ``StableDiffusion3Pipeline`` with its two CLIP text encoders and no
    T5 (``text_encoder_3=None, tokenizer_3=None``, the stock way to drop T5). Weights are
    stored in float16 and loaded as float32 (``dtype=torch.float32``) unless you pass ``dtype``.

    Examples:
        >>> pipe = load_shapes_pipeline("shapes-sd")
        >>> type(pipe).__name__
        'StableDiffusionPipeline'
    """
    import torch
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    path = resolve_model_path(name)
    # stored in float16; without a dtype diffusers loads its models in float32 but transformers
    # keeps the text encoders in float16, which cannot run together
    kwargs.setdefault("dtype", torch.float32)
    kind = Path(name).name  # a shipped name, or a folder of that name written by shapes.train
    if kind == "shapes-mmdit":
        kwargs.setdefault("text_encoder_3", None)
        kwargs.setdefault("tokenizer_3", None)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, **kwargs)
    elif kind == "shapes-sd":
        pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    else:
        raise ValueError(f"{name!r} is not a Shapes pipeline; choose 'shapes-sd' or 'shapes-mmdit'")
    pipe.set_progress_bar_config(disable=True)
    return pipe
