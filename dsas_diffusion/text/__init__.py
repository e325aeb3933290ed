"""DSAS for transformers causal language models: :class:`DSASLanguageModel`, the hook
presets per model family (:mod:`.architectures`) and per-token gate views (:mod:`.render`)."""

from .._extras import require

require("dsas_diffusion.text", "text", "transformers")

from .architectures import TEXT_ARCHITECTURES, TEXT_PRESETS, TextArchitecture, check_token_stream, hook_points
from .model import DSASLanguageModel, TextGeneration
from .render import render_gates

__all__ = [
    "TEXT_ARCHITECTURES",
    "TEXT_PRESETS",
    "DSASLanguageModel",
    "TextArchitecture",
    "TextGeneration",
    "check_token_stream",
    "hook_points",
    "render_gates",
]
