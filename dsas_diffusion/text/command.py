"""``dsas fit`` and ``dsas generate`` for causal language models (the command picks this
path when ``--model`` is a transformers checkpoint rather than a diffusers pipeline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..prompts import read_prompts
from ..steering import Steerer, SteeringError

__all__ = ["fit_text", "generate_text", "is_language_model"]


def is_language_model(model: str) -> bool:
    """Whether ``model`` (a folder or hub id) is a transformers checkpoint with no diffusers
    ``model_index.json``: a folder (or ``shapes-lm``) is read directly, a hub id through the
    local cache."""
    from ..shapes import resolve_model_path

    path = Path(resolve_model_path(model))
    if path.is_dir():
        return not (path / "model_index.json").is_file() and (path / "config.json").is_file()
    try:
        from huggingface_hub import hf_hub_download

        for name in ("model_index.json", "config.json"):
            try:
                file = hf_hub_download(model, name)
            except Exception:
                continue
            if name == "model_index.json":
                return False
            return "architectures" in json.loads(Path(file).read_text())
    except ImportError:
        pass
    return False


def _load(args: argparse.Namespace):
    from .model import DSASLanguageModel

    kwargs = {} if args.device is None else {"device_map": args.device}
    return DSASLanguageModel.from_pretrained(args.model, **kwargs)


def fit_text(args: argparse.Namespace, out: Path) -> None:
    from ..names import TEXT_PRESETS

    if args.preset is not None and args.preset not in TEXT_PRESETS:
        raise SteeringError(
            f"--preset {args.preset!r} is an image preset; for a language model use one of {TEXT_PRESETS}"
        )
    lm = _load(args)
    chosen = {
        "map": args.map,
        "preset": args.preset,
        "layers": args.layers,
        "n_components": args.components,
        "gate_floor": args.gate_floor,
        "gate_reads": args.gate_reads,
    }
    steerer = lm.fit_steering(
        read_prompts(args.source),
        read_prompts(args.target),
        read_prompts(args.control) if args.control else None,
        gate=args.gate,
        max_length=args.max_length,
        seed=args.seed,
        **{name: value for name, value in chosen.items() if value is not None},  # else FitConfig.for_text()'s
    )
    steerer.save_pretrained(out)
    print(steerer)
    print(f"saved to {out}")


def generate_text(args: argparse.Namespace, prompts: list[str]) -> None:
    steerer = Steerer.from_pretrained(args.steering)  # a bad steering fails before the model loads
    lm = _load(args)
    lm.load_steering(steerer)
    call = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    runs = [("DSAS", args.strength, "dsas")]
    if args.compare:
        runs = [("unsteered", 0.0, "dsas"), ("uniform", args.strength, "none"), ("DSAS", args.strength, "dsas")]
    elif args.uniform:
        runs = [("uniform", args.strength, "none")]
    outputs = {
        label: lm.generate(
            prompts,
            steering_strength=strength,
            steering_gate=gate,
            return_gate_maps=args.show_gates and gate != "none" and strength != 0,
            **call,
        )
        for label, strength, gate in runs
    }
    width = max(len(label) for label in outputs)
    for row, prompt in enumerate(prompts):
        print(prompt)
        for label, out in outputs.items():
            print(f"  {label:<{width}} | {' '.join(out.texts[row].split())}")
            if out.gate_maps:
                print(f"  {'gates':<{width}} | {out.render(row, format='ansi')}")
