"""DSAS for diffusers: where to hook each denoiser family, collection through pipeline runs,
and the drop-in ``DSAS*Pipeline`` classes."""

from .._extras import require

require("dsas_diffusion.diffusion", "diffusers", "diffusers", "transformers")

from ..names import CFG_MODES
from .architectures import ARCHITECTURES, Architecture, HookGroup, architecture_of, hook_points
from .collect import ImageStreamCheck, check_image_stream, record_denoiser_calls, run_denoiser_call
from .loading import load_pipeline
from .pipelines import (
    DSASFluxPipeline,
    DSASPipelineMixin,
    DSASPixArtAlphaPipeline,
    DSASStableDiffusion3Pipeline,
    DSASStableDiffusionPipeline,
    DSASStableDiffusionXLPipeline,
)
from .visual import compare, comparison_grid

__all__ = [
    "ARCHITECTURES",
    "CFG_MODES",
    "Architecture",
    "DSASFluxPipeline",
    "DSASPipelineMixin",
    "DSASPixArtAlphaPipeline",
    "DSASStableDiffusion3Pipeline",
    "DSASStableDiffusionPipeline",
    "DSASStableDiffusionXLPipeline",
    "HookGroup",
    "ImageStreamCheck",
    "architecture_of",
    "check_image_stream",
    "compare",
    "comparison_grid",
    "hook_points",
    "load_pipeline",
    "record_denoiser_calls",
    "run_denoiser_call",
]
