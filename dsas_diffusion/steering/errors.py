"""The library's exceptions (defined in :mod:`dsas_diffusion.errors`, which imports nothing, so
that the configuration and the command line can raise them without loading torch)."""

from __future__ import annotations

from ..errors import (  # noqa: F401 (re-exported)
    ActivationError,
    DSASDeprecationWarning,
    IncompatibleSteeringError,
    InputSetError,
    PromptFileError,
    SteeringError,
    SteeringFileError,
    UnknownModuleError,
    __all__,
)
