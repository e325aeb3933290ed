"""``dsas eval`` / ``python -m dsas_diffusion.eval``: the command line of an evaluation."""

from __future__ import annotations

import argparse
import sys

from ..names import CFG_MODES, GATES, MAP_NAMES

__all__ = ["add_arguments", "main"]


def _strengths(text: str) -> list[float] | str:
    if text.strip() == "auto":
        return "auto"
    return [float(part) for part in text.replace(",", " ").split()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.replace(",", " ").split()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dsas eval``; each overrides the config file's field of the same name."""
    parser.add_argument("--config", help="YAML or JSON file with the fields of EvalConfig")
    parser.add_argument("--model", help="diffusers model id or path, or shapes-sd / shapes-mmdit")
    parser.add_argument("--concept", help="the concept's name (zero-shot caption, Shapes detector)")
    parser.add_argument("--source", help="source prompts file (to fit steerers)")
    parser.add_argument("--target", help="target prompts file")
    parser.add_argument("--control", help="control prompts file")
    parser.add_argument("--steering", help="an already fitted steering directory instead of the three files")
    parser.add_argument("--concept-prompts", dest="concept_prompts", help="evaluation prompts showing the concept")
    parser.add_argument("--control-prompts", dest="control_prompts", help="evaluation prompts without it")
    parser.add_argument("--seeds", type=_ints, help="e.g. '0,1,2'")
    parser.add_argument("--strengths", type=_strengths, help="'auto' (each method its own range) or e.g. '0,1,2,4'")
    parser.add_argument("--pairs-prompts", dest="pairs_prompts", help="two-object prompts for the spatial test")
    parser.add_argument("--bootstrap", type=int, help="bootstrap replicates for the intervals (default 1000)")
    parser.add_argument(
        "--methods",
        type=lambda t: "all" if t == "all" else t.replace(",", " ").split(),
        help=f"'all' or a comma list of <map>/<gate>: map one of {', '.join(MAP_NAMES)}, gate one of "
        f"{', '.join(GATES)} ('none': uniform; e.g. linear-act/dsas)",
    )
    parser.add_argument("--clip-model", dest="clip_model", help="open_clip model name (default: by model)")
    parser.add_argument("--clip-pretrained", dest="clip_pretrained", help="open_clip pretrained tag or file")
    parser.add_argument("--steps", dest="num_inference_steps", type=int)
    parser.add_argument("--guidance", dest="guidance_scale", type=float)
    parser.add_argument("--steering-cfg", dest="steering_cfg", choices=CFG_MODES)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--device")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--cache-dir", dest="cache_dir", help="image cache (default OUT/images)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    import dataclasses

    from .config import ConfigError, EvalConfig, load_config
    from .sweep import run_evaluation

    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    try:
        config = load_config(args.config, overrides)
        run_evaluation(config, progress=not args.no_progress)
    except ConfigError as error:
        sys.exit(f"dsas eval: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dsas eval", description="Strength sweeps of steering methods scored with CLIP; Pareto fronts."
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
