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

__all__ = [
    "ActivationCollector",
    "HookPoint",
    "LinEASConfig",
    "Steerer",
    "SteeringError",
    "__version__",
    "fit_steerer",
]
