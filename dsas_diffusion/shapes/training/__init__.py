"""Training recipes of the Shapes models, one module each; ``python -m dsas_diffusion.shapes.train``
runs them (see :data:`RECIPES`)."""

from .clip import train_clip
from .common import DEFAULT_WORK_DIR, train_stages
from .mmdit import MMDIT_STAGES, train_mmdit
from .sd import SD_STAGES, train_sd
from .vae import train_vae

__all__ = [
    "DEFAULT_WORK_DIR",
    "MMDIT_STAGES",
    "SD_STAGES",
    "train_clip",
    "train_mmdit",
    "train_sd",
    "train_stages",
    "train_vae",
]
