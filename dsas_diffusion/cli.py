"""The ``dsas`` command.

    dsas fit --model shapes-sd --source S.txt --target T.txt --control C.txt --map linear-act --out DIR
    dsas generate --model shapes-sd --steering DIR --prompt "a yellow banana on a white background" \\
        --strength 1.0 --seed 0 --compare --out grid.png

Prompt files hold one prompt per line (blank lines and lines starting with ``#`` are skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "read_prompts"]

MAPS = ("caa", "iti", "linear-act", "lineas")


def prompt_lines(text: str) -> list[str]:
    r"""The prompts of a text, one per line; blank lines and ``#`` comment lines are skipped.

    Example:
        >>> prompt_lines("# bananas\n a yellow banana on a white background \n\n")
        ['a yellow banana on a white background']
    """
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file, one per line; errors name the file when it is missing or empty."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"dsas: prompt file {str(file)!r} does not exist")
    prompts = prompt_lines(file.read_text())
    if not prompts:
        raise SystemExit(f"dsas: prompt file {str(file)!r} has no prompts (one per line)")
    return prompts


def _fit(args: argparse.Namespace) -> None:
    from .diffusion.loading import load_pipeline

    if args.gate != "none" and not args.control:
        raise SystemExit("dsas fit: --gate dsas needs --control (prompts without the concept)")
    source, target = read_prompts(args.source), read_prompts(args.target)
    control = read_prompts(args.control) if args.control else None
    pipe = load_pipeline(args.model, device=args.device)
    steps = "all" if args.collect_steps == "all" else [int(s) for s in args.collect_steps.split(",")]
    steerer = pipe.fit_steering(
        source,
        target,
        control,
        map=args.map,
        gate=args.gate,
        preset=args.preset,
        collect_steps=steps,
        num_inference_steps=args.steps,
        n_components=args.components,
        seed=args.seed,
    )
    steerer.save_pretrained(args.out)
    print(steerer)
    print(f"saved to {args.out}")


def _generate(args: argparse.Namespace) -> None:
    from .diffusion.loading import load_pipeline
    from .diffusion.visual import compare, comparison_grid

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_steering(args.steering)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise SystemExit("dsas generate: give --prompt (repeatable) or --prompts FILE")
    call = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        grid = comparison_grid(compare(pipe, prompts, strength=args.strength, seed=args.seed, **call))
        grid.save(out)
    else:
        import torch

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
    """Serve the Gradio demo, ``app.py`` at the root of the source checkout."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "app.py"
    if not path.is_file():
        raise SystemExit(f"dsas demo: {path} not found; the demo runs from a source checkout (python app.py)")
    spec = importlib.util.spec_from_file_location("dsas_app", path)
    app = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(app)  # type: ignore[union-attr]
    app.serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsas", description="Dynamically Scaled Activation Steering for diffusers")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a steering from source / target / control prompt files")
    fit.add_argument("--model", required=True, help="hub id, local folder, or shapes-sd / shapes-mmdit")
    fit.add_argument("--source", required=True, help="prompts showing the concept (one per line)")
    fit.add_argument("--target", required=True, help="the same prompts without the concept")
    fit.add_argument("--control", help="prompts steering must leave alone (needed by --gate dsas)")
    fit.add_argument("--map", choices=MAPS, default="linear-act")
    fit.add_argument("--gate", choices=("dsas", "none"), default="dsas")
    fit.add_argument("--preset", choices=("blocks", "norms"), default="blocks")
    fit.add_argument("--steps", type=int, default=10, help="denoising steps of the collection runs")
    fit.add_argument("--collect-steps", default="all", help="'all' or comma-separated step indices, e.g. 0,1,2")
    fit.add_argument("--components", type=int, default=20, help="PCA rank of the DSAS gates")
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
    gen.add_argument("--device", default=None)
    gen.add_argument("--compare", action="store_true", help="one grid: unsteered | uniform | DSAS | gate heatmap")
    gen.add_argument("--out", required=True, help="image path (a grid with --compare)")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="serve the Gradio demo (unsteered | uniform | DSAS, CLIP scores, gates)")
    from .webapp import add_server_arguments

    add_server_arguments(demo)
    demo.set_defaults(run=_demo)

    from .eval.command import add_arguments
    from .eval.command import run as run_eval

    evaluate = commands.add_parser(
        "eval", help="strength sweeps of steering methods scored with CLIP; Pareto fronts (see dsas_diffusion.eval)"
    )
    add_arguments(evaluate)
    evaluate.set_defaults(run=run_eval)
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
