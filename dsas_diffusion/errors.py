"""Exceptions raised by dsas_diffusion. Every message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "ActivationError",
    "DSASDeprecationWarning",
    "IncompatibleSteeringError",
    "InputSetError",
    "PromptFileError",
    "SteeringError",
    "SteeringFileError",
    "UnknownModuleError",
]


class SteeringError(ValueError):
    """Base class of every error this library raises on bad input."""


class UnknownModuleError(SteeringError, KeyError):
    """A hook point names a module the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputSetError(SteeringError):
    """A source / target / control set is empty, too small or unbalanced."""


class PromptFileError(InputSetError):
    """A prompt (or text) file is missing, unreadable or empty."""


class ActivationError(SteeringError):
    """A hooked module produced something that cannot be steered (NaN, wrong shape, ...)."""


class IncompatibleSteeringError(SteeringError):
    """A steering file or steerer does not fit the model it is applied to."""


class SteeringFileError(SteeringError):
    """A steering directory is missing files, corrupt, or of an unknown format."""


class DSASDeprecationWarning(DeprecationWarning):
    """A spelling this library still accepts for one release (the warning names its
    replacement). The test suite turns it into an error, so that the library, its tests, docs
    and benchmarks use none."""
