"""Names of the embedded Shapes models, usable wherever a hub id or local path is accepted."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHAPES_MODELS", "is_shapes_model", "load_shapes_pipeline", "resolve_model_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHAPES_MODELS = ("shapes-sd", "shapes-mmdit", "shapes-clip")


def is_shapes_model(name: str | os.PathLike[str]) -> bool:
    return str(name) in SHAPES_MODELS


def resolve_model_path(name: str | os.PathLike[str]) -> Path | str:
    """The local folder of a Shapes model name; any other id or path is returned unchanged.

    Example:
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


def load_shapes_pipeline(name: str = "shapes-sd", **kwargs):
    """Load ``shapes-sd`` or ``shapes-mmdit`` with the stock diffusers classes.

    ``shapes-mmdit`` is a ``StableDiffusion3Pipeline`` with its two CLIP text encoders and no
    T5 (``text_encoder_3=None, tokenizer_3=None``, the stock way to drop T5). Weights are
    stored in float16 and loaded as float32 (``dtype=torch.float32``) unless you pass ``dtype``.

    Example:
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
    if name == "shapes-mmdit":
        kwargs.setdefault("text_encoder_3", None)
        kwargs.setdefault("tokenizer_3", None)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, **kwargs)
    elif name == "shapes-sd":
        pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    else:
        raise ValueError(f"{name!r} is not a Shapes pipeline; choose 'shapes-sd' or 'shapes-mmdit'")
    pipe.set_progress_bar_config(disable=True)
    return pipe
