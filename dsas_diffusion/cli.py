"""The ``dsas`` command.

    dsas fit --model shapes-sd --source S.txt --target T.txt --control C.txt --map linear-act --out DIR
    dsas generate --model shapes-sd --steering DIR --prompt "a yellow banana on a white background" \\
        --strength 1.0 --seed 0 --compare --out grid.png
    dsas fit --model ./my-qwen --source toxic.txt --target polite.txt --control neutral.txt --out DIR
    dsas generate --model ./my-qwen --steering DIR --prompt "You are" --compare --show-gates
    dsas eval --config benchmarks/eval_banana.yaml
    dsas demo
    dsas examples

``--model`` is a diffusers pipeline or a transformers causal language model (a folder with a
``config.json`` and no ``model_index.json``); the text flags (``--max-new-tokens``,
``--layers``, ``--show-gates``...) apply to the latter. Prompt files hold one prompt per line (blank lines and lines starting with ``#`` are skipped).
Building the parser imports no torch, diffusers or gradio: ``dsas --help`` is instant. A user
error ends in one line on stderr and exit status 2 (``--debug`` shows the traceback);
output paths are checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .app.options import add_server_arguments, at_least_one
from .config import FitConfig, is_step_window
from .eval.command import add_arguments as add_eval_arguments
from .names import CFG_MODES, DIFFUSION_PRESETS, GATE_READS, MAP_NAMES, SAMPLE_DECISIONS, TEXT_PRESETS

__all__ = ["build_parser", "main"]


def _steps_list(text: str) -> str | list[int]:
    if text.strip() == "all":
        return "all"
    try:
        steps = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or step indices like 0,1,2, got {text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"expected 'all' or step indices >= 0 like 0,1,2, got {text!r}")
    return steps


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected start,end fractions of the schedule like 0.5,1, got {text!r}"
        ) from None
    if not is_step_window((start, end)):
        raise argparse.ArgumentTypeError(f"expected 0 <= start < end <= 1, got {text!r}")
    return start, end


def _writable_directory(path: str) -> Path:
    """``path`` as a directory that can be written (created if needed), checked before any work."""
    from .steering.errors import SteeringError

    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".dsas-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SteeringError(
            f"cannot write to {str(directory)!r} ({error.strerror or error}); choose another --out"
        ) from None
    return directory


def _writable_image(path: str) -> Path:
    from PIL import Image

    from .steering.errors import SteeringError

    out = Path(path)
    if out.suffix.lower() not in Image.registered_extensions():
        raise SteeringError(f"--out {path!r} needs an image file extension such as .png or .jpg")
    _writable_directory(str(out.parent if str(out.parent) else "."))
    return out


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    from .steering.errors import SteeringError

    try:
        torch.device(device)
    except RuntimeError:
        raise SteeringError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SteeringError(f"--device {device!r} asked for CUDA, which this machine does not have; use --device cpu")


def _fit(args: argparse.Namespace) -> None:
    from .diffusion.loading import load_pipeline
    from .prompts import read_prompts
    from .steering.errors import SteeringError

    if args.gate != "none" and not args.control:
        raise SteeringError("--gate dsas needs --control (prompts without the concept)")
    out = _writable_directory(args.out)
    _check_device(args.device)
    from .text.command import fit_text, is_language_model

    if is_language_model(args.model):
        fit_text(args, out)
        return
    if args.preset in TEXT_PRESETS and args.preset not in DIFFUSION_PRESETS:
        raise SteeringError(
            f"--preset {args.preset!r} is a language-model preset; for a pipeline use {DIFFUSION_PRESETS}"
        )
    source, target = read_prompts(args.source), read_prompts(args.target)
    control = read_prompts(args.control) if args.control else None
    pipe = load_pipeline(args.model, device=args.device)
    steps = args.collect_steps
    chosen = {"map": args.map, "preset": args.preset, "n_components": args.components, "gate_floor": args.gate_floor}
    chosen |= {"gate_reads": args.gate_reads, "steering_steps": args.steering_steps}
    if args.sample_gate:
        chosen["sample_gate"] = True
    if args.sample_decision not in (None, "per-layer"):
        chosen |= {"sample_decision": args.sample_decision, "decision_inference_steps": args.decision_steps}
    steerer = pipe.fit_steering(
        source,
        target,
        control,
        gate=args.gate,
        collect_steps=steps,
        num_inference_steps=args.steps,
        seed=args.seed,
        **{name: value for name, value in chosen.items() if value is not None},  # else FitConfig.for_diffusion()'s
    )
    steerer.save_pretrained(out)
    print(steerer)
    print(f"saved to {out}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .diffusion.loading import load_pipeline
    from .diffusion.visual import compare, comparison_grid
    from .prompts import read_prompts
    from .steering import Steerer
    from .steering.errors import SteeringError

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise SteeringError("give --prompt (repeatable) or --prompts FILE")
    _check_device(args.device)
    from .text.command import generate_text, is_language_model

    if is_language_model(args.model):
        generate_text(args, prompts)
        return
    if args.out is None:
        raise SteeringError("--out is needed for images (an image path, a grid with --compare)")
    out = _writable_image(args.out)
    steerer = Steerer.from_pretrained(args.steering)  # a bad steering fails before the model loads
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_steering(steerer)
    call = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    if args.steering_cfg is not None:
        call["steering_cfg"] = args.steering_cfg
    if args.compare:
        comparison_grid(compare(pipe, prompts, strength=args.strength, seed=args.seed, **call)).save(out)
    else:
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        images = pipe(
            prompts,
            generator=generators,
            steering_strength=args.strength,
            steering_gate="none" if args.uniform else "dsas",
            **call,
        ).images
        if len(images) == 1:
            images[0].save(out)
        else:
            for i, image in enumerate(images):
                image.save(out.with_name(f"{out.stem}_{i}{out.suffix}"))
    print(f"wrote {out}")


def _demo(args: argparse.Namespace) -> None:
    """Serve the Gradio demo from the installed package."""
    from .app.ui import serve

    serve(args)


def _examples(args: argparse.Namespace) -> None:
    """Refit the example steerings shipped with the package."""
    if args.text:
        from .shapes import TEXT_CONCEPTS, TEXT_EXAMPLE_MAPS, fit_text_example
        from .text import DSASLanguageModel

        lm = DSASLanguageModel.from_pretrained("shapes-lm")
        for concept in args.concepts or TEXT_CONCEPTS:
            for map_name in TEXT_EXAMPLE_MAPS:
                out = None if args.out is None else Path(args.out) / f"{concept}-{map_name}"
                print(f"fitted {concept} ({map_name}): {fit_text_example(lm, concept, map_name, out)}")
        return
    from .diffusion.loading import load_pipeline
    from .shapes import EXAMPLE_FITS, fit_example_steering

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    for name in args.concepts or EXAMPLE_FITS:
        out = None if args.out is None else Path(args.out) / name
        print(f"fitted {name}: {fit_example_steering(pipe, name, out)}")


def _run_eval(args: argparse.Namespace) -> None:
    from .eval.command import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsas", description="Dynamically Scaled Activation Steering for diffusers")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fit(commands)
    _add_generate(commands)
    demo = commands.add_parser("demo", help="serve the Gradio demo (unsteered | uniform | DSAS, CLIP scores, gates)")
    add_server_arguments(demo)
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser(
        "eval", help="strength sweeps of steering methods scored with CLIP; Pareto fronts (see dsas_diffusion.eval)"
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_run_eval)

    _add_examples(commands)
    return parser


def _add_fit(commands: Any) -> None:
    """``dsas fit``: the prompt files and every fitting choice, with both presets' defaults."""
    fit = commands.add_parser("fit", help="fit a steering from source / target / control prompt files")
    fit.add_argument("--model", required=True, help="hub id, local folder, or shapes-sd / shapes-mmdit")
    fit.add_argument("--source", required=True, help="prompts showing the concept (one per line)")
    fit.add_argument("--target", required=True, help="the same prompts without the concept")
    fit.add_argument("--control", help="prompts steering must leave alone (needed by --gate dsas)")
    image, text = FitConfig.for_diffusion(), FitConfig.for_text()

    def default(name: str) -> str:  # the defaults of the two presets, so the help cannot drift
        return f"default: {getattr(image, name)} for pipelines, {getattr(text, name)} for language models"

    fit.add_argument("--map", choices=MAP_NAMES, help=f"steering map ({default('map')})")
    fit.add_argument("--gate", choices=("dsas", "none"), default="dsas")
    fit.add_argument(
        "--preset",
        choices=tuple(dict.fromkeys(DIFFUSION_PRESETS + TEXT_PRESETS)),
        help=f"hook points ({default('preset')})",
    )
    fit.add_argument(
        "--layers", type=_int_list, help="language models: decoder layers to hook, e.g. 4,5,6 (default: all)"
    )
    fit.add_argument("--max-length", type=at_least_one, default=256, help="language models: tokens per text")
    fit.add_argument("--steps", type=at_least_one, default=10, help="denoising steps of the collection runs")
    fit.add_argument(
        "--collect-steps", type=_steps_list, default="all", help="'all' or comma-separated step indices, e.g. 0,1,2"
    )
    fit.add_argument("--components", type=at_least_one, help=f"PCA rank of the DSAS gates ({default('n_components')})")
    fit.add_argument("--gate-floor", type=float, help=f"gates opened less than this are 0 ({default('gate_floor')})")
    fit.add_argument(
        "--gate-reads",
        choices=GATE_READS,
        help="what each gate reads at its module: the output it steers, the module's input, or (language models) "
        f"the tokens' context ({default('gate_reads')})",
    )
    fit.add_argument(
        "--sample-gate",
        action="store_true",
        help="pipelines: also gate each image as a whole (a gate on the mean over its positions)",
    )
    fit.add_argument(
        "--sample-decision",
        choices=SAMPLE_DECISIONS,
        help="pipelines, with --sample-gate: each layer's sample gate decides (per-layer, default), or one "
        "decision per image from every layer over the steps before --steering-steps, the layers weighing "
        "alike (accumulated) or weighted by a regression on source against control images (stacked)",
    )
    fit.add_argument(
        "--decision-steps",
        type=at_least_one,
        default=25,
        help="with --sample-decision accumulated or stacked: the schedule its decision is calibrated on, as generated "
        "(default 25, as dsas generate)",
    )
    fit.add_argument(
        "--steering-steps",
        type=_window,
        help="pipelines: the saved default window of denoising steps to steer in, e.g. 0.5,1 (default: all)",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default=None)
    fit.add_argument("--out", required=True, help="directory for steering_config.json + steering.safetensors")
    fit.set_defaults(run=_fit)


def _add_generate(commands: Any) -> None:
    """``dsas generate``: images (or continuations) with a fitted steering."""
    gen = commands.add_parser("generate", help="generate images with a fitted steering")
    gen.add_argument("--model", required=True)
    gen.add_argument("--steering", required=True, help="a directory written by `dsas fit`")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    gen.add_argument("--prompts", help="a file of prompts, one per line")
    gen.add_argument("--strength", type=float, default=1.0)
    gen.add_argument("--uniform", action="store_true", help="steer uniformly instead of with DSAS gates")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=at_least_one, default=25)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--steering-cfg", choices=CFG_MODES, help="steer the conditional CFG half (default) or both")
    gen.add_argument("--device", default=None)
    gen.add_argument(
        "--compare",
        action="store_true",
        help="unsteered | uniform | DSAS: one image grid, or continuations side by side",
    )
    gen.add_argument("--out", help="image path (a grid with --compare); not used for language models")
    gen.add_argument("--max-new-tokens", type=at_least_one, default=32, help="language models: tokens to generate")
    gen.add_argument("--show-gates", action="store_true", help="language models: print tokens coloured by their gates")
    gen.set_defaults(run=_generate)


def _add_examples(commands: Any) -> None:
    """``dsas examples``: refit the shipped example steerings."""
    examples = commands.add_parser("examples", help="refit the example steerings shipped with the package")
    examples.add_argument(
        "concepts", nargs="*", help="examples, e.g. banana or banana-image (default: every shipped example)"
    )
    examples.add_argument("--out", default=None, help="parent directory (default: the package's shapes/steering/)")
    examples.add_argument("--text", action="store_true", help="the shapes-lm examples (shapes/steering/text/)")
    examples.set_defaults(run=_examples)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"dsas {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # every error ends in one line (and a traceback with --debug)
        if args.debug:
            raise
        print(f"dsas {args.command}: {_describe(error)}", file=sys.stderr)
        raise SystemExit(2 if _is_user_error(error) else 1) from None


def _is_user_error(error: BaseException) -> bool:
    from .eval.config import ConfigError
    from .steering.errors import SteeringError

    return isinstance(error, (SteeringError, ConfigError, OSError))


def _describe(error: BaseException) -> str:
    """One line: the message of the library's own errors, and the kind and message of others
    (a model that cannot be loaded, an unreadable file)."""
    if _is_user_error(error) and not isinstance(error, OSError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
        if not isinstance(error, OSError):
            text += " (rerun with --debug for the traceback)"
    return " ".join(text.split())


if __name__ == "__main__":
    main()
