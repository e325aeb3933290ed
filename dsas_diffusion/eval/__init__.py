"""Evaluation: CLIP metrics, strength sweeps over steering methods, Pareto fronts.

Run ``dsas eval --config benchmarks/eval_banana.yaml`` (or ``python -m dsas_diffusion.eval``;
``accelerate launch -m dsas_diffusion.eval ...`` shards it over processes).
"""

from .config import ALL_METHODS, ConfigError, EvalConfig, Method, load_config, parse_method
from .metrics import ClipScorer, default_clip_for
from .report import hypervolume, write_report
from .sweep import EvalResult, Job, run_evaluation

__all__ = [
    "ALL_METHODS",
    "ClipScorer",
    "ConfigError",
    "EvalConfig",
    "EvalResult",
    "Job",
    "Method",
    "default_clip_for",
    "hypervolume",
    "load_config",
    "parse_method",
    "run_evaluation",
    "write_report",
]
