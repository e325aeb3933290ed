"""Load any supported pipeline (a hub id, a local folder or a Shapes name) as its DSAS class."""

from __future__ import annotations

import os
from typing import Any

from ..steering import SteeringError

__all__ = ["DSAS_CLASSES", "load_pipeline"]

#: stock pipeline class name -> DSAS pipeline class name
DSAS_CLASSES = {
    "StableDiffusionPipeline": "DSASStableDiffusionPipeline",
    "StableDiffusionXLPipeline": "DSASStableDiffusionXLPipeline",
    "StableDiffusion3Pipeline": "DSASStableDiffusion3Pipeline",
    "FluxPipeline": "DSASFluxPipeline",
    "PixArtAlphaPipeline": "DSASPixArtAlphaPipeline",
}


def load_pipeline(model: str | os.PathLike[str], *, device: str | None = None, **kwargs: Any):
    """``model`` (hub id, folder, or ``shapes-sd`` / ``shapes-mmdit``) as a ``DSAS*Pipeline``.

    The class is read from the model's ``model_index.json``. A ``StableDiffusion3Pipeline``
    saved without T5 (as ``shapes-mmdit``) loads with ``text_encoder_3=None``. ``kwargs`` go
    to ``from_pretrained`` (``dtype``, ``variant``...); the Shapes models default to float32.

    Examples:
        >>> pipe = load_pipeline("shapes-sd")
        >>> type(pipe).__name__
        'DSASStableDiffusionPipeline'
    """
    import torch
    from diffusers import DiffusionPipeline

    from ..shapes import is_shapes_world, resolve_model_path
    from . import pipelines

    path = resolve_model_path(model)
    if is_shapes_world(model):
        kwargs.setdefault("dtype", torch.float32)
    config = DiffusionPipeline.load_config(path)
    class_name = config.get("_class_name")
    if class_name not in DSAS_CLASSES:
        raise SteeringError(
            f"{model!r} is a {class_name}; DSAS pipelines exist for {', '.join(DSAS_CLASSES)}. For another "
            "pipeline, mix DSASPipelineMixin into its class: class MyPipeline(DSASPipelineMixin, ThatPipeline)."
        )
    if class_name == "StableDiffusion3Pipeline" and config.get("text_encoder_3", [None])[0] is None:
        kwargs.setdefault("text_encoder_3", None)
        kwargs.setdefault("tokenizer_3", None)
    pipe = getattr(pipelines, DSAS_CLASSES[class_name]).from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe
