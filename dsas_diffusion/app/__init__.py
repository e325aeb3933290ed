"""The Gradio demo (``python app.py``, ``python -m dsas_diffusion.app``, ``dsas demo``).

One job per module: :mod:`.options` (command-line options), :mod:`.serving` (model cache,
per-request pipelines, locks), :mod:`.validation` (request checks), :mod:`.actions`
(generate, sweep, fit), :mod:`.images` (files, overlays, strips), :mod:`.text_tab` (the Text
tab: language models, their continuations and per-token gates) and :mod:`.ui` (the page).
Names are imported on first use, so ``dsas --help`` loads neither gradio nor torch.
"""

from .._extras import require

require("dsas_diffusion.app", "app", "gradio")

from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("build_demo", "main", "parse_args", "serve"), ".ui"),
    **dict.fromkeys(("ModelCache", "configure_torch_threads", "request_pipeline"), ".serving"),
    **dict.fromkeys(("GenerateSettings", "InputError", "LIMITS", "validate_settings"), ".validation"),
    **dict.fromkeys(("generate", "fit_from_text", "resolve_steering", "strength_sweep"), ".actions"),
    "add_server_arguments": ".options",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
