"""dsas-diffusion: Dynamically Scaled Activation Steering for diffusers pipelines and text LLMs.

Names are imported on first use: ``import dsas_diffusion`` loads neither torch nor diffusers
until one of them is asked for.
"""

from importlib import metadata as _metadata

from ._lazy import lazy_exports

try:
    __version__ = _metadata.version("dsas-diffusion")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

_EXPORTS = {
    **dict.fromkeys(("FitConfig", "LinEASConfig"), ".config"),
    **dict.fromkeys(
        (
            "ActivationCollector",
            "HookPoint",
            "Steerer",
            "SteeringError",
            "fit_steerer",
        ),
        ".steering",
    ),
    **dict.fromkeys(
        (
            "DSASFluxPipeline",
            "DSASPipelineMixin",
            "DSASPixArtAlphaPipeline",
            "DSASStableDiffusion3Pipeline",
            "DSASStableDiffusionPipeline",
            "DSASStableDiffusionXLPipeline",
        ),
        ".diffusion",
    ),
    **dict.fromkeys(("DSASLanguageModel", "render_gates"), ".text"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [*sorted(_EXPORTS), "__version__"]
