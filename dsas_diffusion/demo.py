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

Then it shows where the gates open: ``banana_gates.png`` renders banana prompts and empty-prompt
images that show a banana nobody asked for, unsteered, with the fitted steering (its gates read
the cross-attention outputs, where the prompt is mixed in) and with the shipped
``banana-image`` example (gates on the image being drawn, one decision per image from the first
12 of 25 steps), each with its gates over the image (``docs/removal.md``, section 7, says
what it shows).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .names import MAP_NAMES, RENDER_MODES

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs", help="output directory")
    parser.add_argument("--map", default="caa", choices=MAP_NAMES)
    parser.add_argument("--strength", type=float, default=2.0)
    parser.add_argument("--count", type=int, default=16, help="held-out prompts per group")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--image-strength", type=float, default=4.0, help="strength of the image-gate example in banana_gates.png"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from .diffusion.loading import load_pipeline
    from .diffusion.visual import compare, comparison_grid
    from .eval.metrics import pixel_change
    from .shapes import ShapeJudge, banana_drawn, concept_prompts, evaluation_prompts

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
    for mode in RENDER_MODES:
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
    gates_picture(pipe, steerer, banana_prompts[:4], strength=args.strength, image_strength=args.image_strength).save(
        out / "banana_gates.png"
    )
    print(f"wrote {out / 'banana_gates.png'}: where gates on the prompt and gates on the image open")


def gates_picture(pipe, prompt_steerer, named: list[str], *, strength: float, image_strength: float):
    """``named`` and up to 4 empty-prompt images showing a banana, unsteered, with
    ``prompt_steerer`` and with the shipped ``banana-image`` example, each steered image beside
    its gates (the mean over layers and steered steps)."""
    from .diffusion.visual import image_grid, mean_gate_map, overlay_heatmap
    from .shapes import ShapeJudge, example_steerings, read_objects, unprompted_concept
    from .steering import Steerer

    def run(prompts, seeds, value=0.0):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if value == 0.0:
            return pipe(prompts, generator=generators, num_inference_steps=25, steering_strength=0.0).images, None
        result = pipe(
            prompts, generator=generators, num_inference_steps=25, steering_strength=value, return_gate_maps=True
        )
        return result.images, [mean_gate_map(result.gate_maps, i) for i in range(len(prompts))]

    loaded = dict(pipe.steerers)
    try:
        empty, _ = run([""] * 32, range(32))  # seeds 0-31 of the empty prompt; those showing a banana are shown
        found = [i for i, scene in enumerate(read_objects(ShapeJudge(), empty)) if unprompted_concept(scene, "banana")]
        prompts = list(named) + [""] * len(found[:4])
        seeds = [100 + i for i in range(len(named))] + found[:4]
        columns = [run(prompts, seeds)[0]]
        image_steerer = Steerer.from_pretrained(example_steerings()["banana-image"])
        for steerer, value in ((prompt_steerer, strength), (image_steerer, image_strength)):
            pipe.unload_steering()
            pipe.load_steering(steerer)
            images, maps = run(prompts, seeds, value)
            columns += [images, [overlay_heatmap(image, gates) for image, gates in zip(images, maps, strict=True)]]
    finally:
        pipe.unload_steering()
        for name, steerer in loaded.items():
            pipe.load_steering(steerer, name=name)
    rows = [list(row) for row in zip(*columns, strict=True)]
    titles = [
        "unsteered",
        f"prompt gates, λ {strength:g}",
        "their gates",
        f"image gates, λ {image_strength:g}",
        "their gates",
    ]
    return image_grid(rows, scale=3, column_titles=titles, row_titles=[p or "(empty prompt)" for p in prompts])


if __name__ == "__main__":
    main()
