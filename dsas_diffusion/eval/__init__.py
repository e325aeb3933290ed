"""Evaluation: CLIP metrics, strength sweeps over steering methods, Pareto fronts.

Run ``dsas eval --config benchmarks/eval_banana.yaml`` (or ``python -m dsas_diffusion.eval``;
``accelerate launch -m dsas_diffusion.eval ...`` shards it over processes). Names are
imported on first use, so the command line can build its options without loading torch.
"""

from .._extras import require

require("dsas_diffusion.eval", "eval", "open_clip", "yaml", "matplotlib")

from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("ALL_METHODS", "ConfigError", "EvalConfig", "Method", "load_config", "parse_method"), ".config"),
    **dict.fromkeys(("ClipScorer", "default_clip_for", "pixel_change"), ".metrics"),
    **dict.fromkeys(("hypervolume", "method_figures", "operating_point"), ".operating"),
    "write_report": ".report",
    **dict.fromkeys(("PromptGate", "bad_words_ids", "safe_latent_diffusion"), ".baselines"),
    **dict.fromkeys(("EvalResult", "run_evaluation"), ".sweep"),
    "Job": ".cache",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
