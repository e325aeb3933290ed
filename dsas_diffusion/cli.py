"""The ``dsas`` command.

    dsas fit --model shapes-sd --source S.txt --target T.txt --control C.txt --map linear-act --out DIR
    dsas generate --model shapes-sd --steering DIR --prompt "a yellow banana on a white background" \\
        --strength 1.0 --seed 0 --compare --out grid.png
    dsas eval --config benchmarks/eval_banana.yaml
    dsas demo
    dsas examples

Prompt files hold one prompt per line (blank lines and lines starting with ``#`` are skipped).
Building the parser imports no torch, diffusers or gradio: ``dsas --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .app.options import add_server_arguments
from .eval.command import add_arguments as add_eval_arguments
from .names import CFG_MODES, DIFFUSION_PRESETS, MAP_NAMES

__all__ = ["build_parser", "main"]


def _fit(args: argparse.Namespace) -> None:
    from .diffusion.loading import load_pipeline
    from .prompts import read_prompts

    if args.gate != "none" and not args.control:
        raise SystemExit("dsas fit: --gate dsas needs --control (prompts without the concept)")
    source, target = read_prompts(args.source), read_prompts(args.target)
    control = read_prompts(args.control) if args.control else None
    pipe = load_pipeline(args.model, device=args.device)
    steps = "all" if args.collect_steps == "all" else [int(s) for s in args.collect_steps.split(",")]
    chosen = {"map": args.map, "preset": args.preset, "n_components": args.components, "gate_floor": args.gate_floor}
    steerer = pipe.fit_steering(
        source,
        target,
        control,
        gate=args.gate,
        collect_steps=steps,
        num_inference_steps=args.steps,
        seed=args.seed,
        **{name: value for name, value in chosen.items() if value is not None},  # else fit_steering's defaults
    )
    steerer.save_pretrained(args.out)
    print(steerer)
    print(f"saved to {args.out}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .diffusion.loading import load_pipeline
    from .diffusion.visual import compare, comparison_grid
    from .prompts import read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise SystemExit("dsas generate: give --prompt (repeatable) or --prompts FILE")
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_steering(args.steering)
    call = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    if args.steering_cfg is not None:
        call["steering_cfg"] = args.steering_cfg
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        comparison_grid(compare(pipe, prompts, strength=args.strength, seed=args.seed, **call)).save(out)
    else:
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        images = pipe(
            prompts, generator=generators, steering_strength=args.strength, steering_gate=not args.uniform, **call
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
    from .diffusion.loading import load_pipeline
    from .shapes import EXAMPLE_CONCEPTS, fit_example_steering

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    for concept in args.concepts or EXAMPLE_CONCEPTS:
        out = None if args.out is None else Path(args.out) / concept
        print(f"fitted {concept}: {fit_example_steering(pipe, concept, out)}")


def _run_eval(args: argparse.Namespace) -> None:
    from .eval.command import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsas", description="Dynamically Scaled Activation Steering for diffusers")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a steering from source / target / control prompt files")
    fit.add_argument("--model", required=True, help="hub id, local folder, or shapes-sd / shapes-mmdit")
    fit.add_argument("--source", required=True, help="prompts showing the concept (one per line)")
    fit.add_argument("--target", required=True, help="the same prompts without the concept")
    fit.add_argument("--control", help="prompts steering must leave alone (needed by --gate dsas)")
    fit.add_argument("--map", choices=MAP_NAMES, help="steering map (default: fit_steering's, caa)")
    fit.add_argument("--gate", choices=("dsas", "none"), default="dsas")
    fit.add_argument("--preset", choices=DIFFUSION_PRESETS, help="hook points (default: cross-attention)")
    fit.add_argument("--steps", type=int, default=10, help="denoising steps of the collection runs")
    fit.add_argument("--collect-steps", default="all", help="'all' or comma-separated step indices, e.g. 0,1,2")
    fit.add_argument("--components", type=int, help="PCA rank of the DSAS gates (default 20)")
    fit.add_argument("--gate-floor", type=float, help="gates opened less than this are 0 (default 0.5)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default=None)
    fit.add_argument("--out", required=True, help="directory for steering_config.json + steering.safetensors")
    fit.set_defaults(run=_fit)

    gen = commands.add_parser("generate", help="generate images with a fitted steering")
    gen.add_argument("--model", required=True)
    gen.add_argument("--steering", required=True, help="a directory written by `dsas fit`")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    gen.add_argument("--prompts", help="a file of prompts, one per line")
    gen.add_argument("--strength", type=float, default=1.0)
    gen.add_argument("--uniform", action="store_true", help="steer uniformly instead of with DSAS gates")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--steering-cfg", choices=CFG_MODES, help="steer the conditional CFG half (default) or both")
    gen.add_argument("--device", default=None)
    gen.add_argument("--compare", action="store_true", help="one grid: unsteered | uniform | DSAS | gate heatmap")
    gen.add_argument("--out", required=True, help="image path (a grid with --compare)")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="serve the Gradio demo (unsteered | uniform | DSAS, CLIP scores, gates)")
    add_server_arguments(demo)
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser(
        "eval", help="strength sweeps of steering methods scored with CLIP; Pareto fronts (see dsas_diffusion.eval)"
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_run_eval)

    examples = commands.add_parser("examples", help="refit the example steerings shipped with the package")
    examples.add_argument("concepts", nargs="*", help="Shapes concepts (default: every shipped example)")
    examples.add_argument("--out", default=None, help="parent directory (default: the package's shapes/steering/)")
    examples.set_defaults(run=_examples)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .steering import SteeringError

    try:
        args.run(args)
    except SteeringError as error:
        print(f"dsas {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
