"""``make demo``: remove bananas from ``shapes-sd`` with DSAS and write the comparison to ``outputs/``.

It fits a steering on the banana prompt sets shipped with the project (source: prompts with
a banana; target: the same scenes with the banana made a circle or left out; control:
prompts without one), then renders held-out banana and control prompts unsteered, with
uniform steering and with DSAS, and measures on each:

* how often a banana is still drawn (the prompted colour isolated, its shape read by
  ``shapes-clip``),
* how much the image changed (mean absolute pixel difference to the unsteered image, 0-255).

Writes ``banana_comparison.png`` (unsteered | uniform | DSAS | DSAS gates), ``banana_table.txt``
and the fitted ``steering-banana/``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from .shapes import data

PROMPTS_DIR = Path(__file__).resolve().parent / "shapes" / "prompts"
COLOURS, BACKGROUNDS = tuple(data.COLOURS), tuple(data.BACKGROUNDS)
OTHER_SHAPES = tuple(shape for shape in data.SHAPES if shape != "banana")


def concept_prompts(path: Path = PROMPTS_DIR / "banana") -> tuple[list[str], list[str], list[str]]:
    """The shipped source / target / control prompt sets of a Shapes concept."""
    from .cli import read_prompts

    return tuple(read_prompts(path / f"{name}.txt") for name in ("source", "target", "control"))  # type: ignore[return-value]


def evaluation_prompts(count: int = 16, seed: int = 2024) -> tuple[list[str], list[str]]:
    """Held-out banana prompts (two-object pairs absent from the fitting sets, and single
    bananas with new seeds) and control prompts without a banana."""
    from .cli import read_prompts

    seen = set(read_prompts(PROMPTS_DIR / "banana" / "source.txt")) | set(
        read_prompts(PROMPTS_DIR / "banana" / "control.txt")
    )
    rng = random.Random(seed)
    banana, control = [], []
    while len(banana) < count:
        colour, background = rng.choice(COLOURS), rng.choice(BACKGROUNDS)
        if len(banana) % 2 == 0:
            prompt = f"a {colour} banana on a {background} background"
        else:
            other = rng.choice([c for c in COLOURS if c != colour])
            prompt = f"a {colour} banana and a {other} {rng.choice(OTHER_SHAPES)} on a {background} background"
        if prompt not in banana and (len(banana) % 2 == 0 or prompt not in seen):
            banana.append(prompt)
    while len(control) < count:
        colour, background = rng.choice(COLOURS), rng.choice(BACKGROUNDS)
        prompt = f"a {colour} {rng.choice(OTHER_SHAPES)} on a {background} background"
        if prompt not in control and prompt not in seen:
            control.append(prompt)
    return banana, control


def banana_drawn(judge, images, prompts) -> list[bool]:
    """For each image: is the prompted banana's colour present and shaped like a banana?"""
    from .shapes.detect import concept_drawn, read_scenes

    readings = read_scenes(judge, list(images), list(prompts))
    return [bool(concept_drawn(r, p, "banana")) for r, p in zip(readings, prompts, strict=True)]


def pixel_change(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs", help="output directory")
    parser.add_argument("--map", default="linear-act", choices=["caa", "iti", "linear-act", "lineas"])
    parser.add_argument("--strength", type=float, default=3.0)
    parser.add_argument("--count", type=int, default=16, help="held-out prompts per group")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from .diffusion.loading import load_pipeline
    from .diffusion.visual import compare, comparison_grid
    from .shapes.detect import ShapeJudge

    torch.manual_seed(0)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    source, target, control = concept_prompts()
    print(
        f"Fitting {args.map} + DSAS gates on shapes-sd: {len(source)} banana / {len(target)} target / "
        f"{len(control)} control prompts"
    )
    steerer = pipe.fit_steering(source, target, control, map=args.map, gate="dsas")
    steerer.save_pretrained(out / "steering-banana")

    judge = ShapeJudge()
    banana_prompts, control_prompts = evaluation_prompts(args.count)
    rows = []
    results = {}
    for group, prompts in (("banana", banana_prompts), ("control", control_prompts)):
        results[group] = compare(pipe, prompts, strength=args.strength, seed=100, num_inference_steps=args.steps)
    for mode in ("unsteered", "uniform", "dsas"):
        images = [getattr(c, mode) for c in results["banana"]]
        drawn = banana_drawn(judge, images, banana_prompts)
        changes = {
            group: np.mean([pixel_change(getattr(c, mode), c.unsteered) for c in items])
            for group, items in results.items()
        }
        rows.append((mode, float(np.mean(drawn)), changes["banana"], changes["control"]))

    header = f"{'images':<10} {'banana still drawn':>19} {'change, banana prompts':>23} {'change, control prompts':>24}"
    lines = [
        f"shapes-sd, {args.map}, strength {args.strength}: {args.count} held-out banana and {args.count} control prompts",
        header,
        "-" * len(header),
    ]
    lines += [f"{mode:<10} {drawn:>19.0%} {a:>23.2f} {b:>24.2f}" for mode, drawn, a, b in rows]
    table = "\n".join(lines)
    print(table)
    (out / "banana_table.txt").write_text(table + "\n")
    shown = results["banana"][:4] + results["control"][:4]
    comparison_grid(shown).save(out / "banana_comparison.png")
    print(f"wrote {out / 'banana_comparison.png'}, {out / 'banana_table.txt'} and {out / 'steering-banana'}/")


if __name__ == "__main__":
    main()
