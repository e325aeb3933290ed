"""dsas-diffusion: Dynamically Scaled Activation Steering for diffusers pipelines and text LLMs."""

__version__ = "0.1.0"

from .steering import (
    ActivationCollector,
    HookPoint,
    LinEASConfig,
    Steerer,
    SteeringError,
    fit_steerer,
)

# the diffusers integration is imported on first use, so that the text path and the core
# do not pay for importing diffusers
_DIFFUSION_EXPORTS = (
    "DSASFluxPipeline",
    "DSASPipelineMixin",
    "DSASPixArtAlphaPipeline",
    "DSASStableDiffusion3Pipeline",
    "DSASStableDiffusionPipeline",
    "DSASStableDiffusionXLPipeline",
)


def __getattr__(name: str):
    if name in _DIFFUSION_EXPORTS:
        from . import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module 'dsas_diffusion' has no attribute {name!r}")


__all__ = [
    *_DIFFUSION_EXPORTS,
    "ActivationCollector",
    "HookPoint",
    "LinEASConfig",
    "Steerer",
    "SteeringError",
    "__version__",
    "fit_steerer",
]
