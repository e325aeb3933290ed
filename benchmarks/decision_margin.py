"""What the per-image decision's margin buys and costs on ``shapes-sd``: how far rounding moves a
held-out control image's score, and how many images a threshold at the highest of those scores
plus ``m`` standard deviations of them flags, for several margins ``m`` (0: the highest itself,
compared with ``>``, where rounding decides that control image).

For each development concept and each recipe with a per-image decision (``image_gates``'
*decided* and *stacked*, the shipped ``banana-image`` recipe), the steering is fitted; then the
held-out control images are rendered again as the fit rendered them (batches of 8) and each
alone (a batch of one rounds otherwise), and the images of 16 development prompts naming the
concept (``make_concept_sets(concept, seed=7)``, seed 0) and of the empty prompt (seeds 0, 1,
...) are scored. A score is read from the steps before the window; each call stops there.
Printed per recipe: the spread of the held-out control scores, the largest move of one of them
between the two renderings (in spreads), and the images flagged at each margin.

    python benchmarks/decision_margin.py --concepts banana red star
"""

from __future__ import annotations

import argparse

import torch
from decision_frontier import forced_decisions
from image_gates import CONFIGS

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.shapes import TUNING_CONCEPTS, concept_prompts, make_concept_sets

STEPS = 25


def scores(pipe, prompts: list[str], seeds: list[int], start: float, batch: int = 16) -> torch.Tensor:
    """Each image's decision score, in calls of ``batch`` images stopped where the steering
    window starts."""
    last = int(start * STEPS) - 1  # the last step before the window

    def stop(pipeline, step, timestep, kwargs):
        if step >= last:
            pipeline._interrupt = True
        return kwargs

    found = []
    for begin in range(0, len(prompts), batch):
        chunk = slice(begin, begin + batch)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        with forced_decisions() as made:
            pipe(
                prompts[chunk],
                generator=generators,
                num_inference_steps=STEPS,
                steering_strength=1.0,
                callback_on_step_end=stop,
                output_type="latent",
            )
        found += [decision.score() for decision in made]
    return torch.cat(found)


MARGINS = (0.0, 0.005, 0.01, 0.02, 0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--configs", nargs="+", default=["decided", "stacked"], choices=["decided", "stacked"])
    parser.add_argument("--empty-seeds", type=int, default=64)
    args = parser.parse_args(argv)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    margins = " | ".join(f"m {m:g}" for m in MARGINS)
    print(f"| concept | recipe | spread | rounding move / spread | images | {margins} |")
    print("|---|---|---|---|---|" + "---|" * len(MARGINS))
    for concept in args.concepts:
        source, target, control = concept_prompts(concept)
        named = make_concept_sets(concept, seed=7)["eval_concept"][:16]
        for name in args.configs:
            steerer = pipe.fit_steering(source, target, control, progress=False, **CONFIGS[name])
            saved, fitted = steerer.config["decision"], steerer.config["fit_config"]
            start = steerer.steering_steps[0]
            rounds = range(fitted["decision_seeds"])[-1:] if name == "stacked" else range(fitted["decision_seeds"])
            held_out = [prompt for _ in rounds for prompt in control]
            seeds = [fitted["seed"] + r * len(control) + i for r in rounds for i in range(len(control))]
            batched = scores(pipe, held_out, seeds, start, batch=8)
            alone = scores(pipe, held_out, seeds, start, batch=1)
            highest, spread = float(batched.max()), saved["spread"]
            assert abs(saved["threshold"] - (highest + saved["margin"] * spread)) < 1e-6 * max(1.0, abs(highest))
            move = float((batched - alone).abs().max()) / spread
            sets = {
                "named": scores(pipe, named, [0] * len(named), start),
                "empty": scores(pipe, [""] * args.empty_seeds, list(range(args.empty_seeds)), start),
            }
            for label, values in sets.items():
                flagged = " | ".join(str(int((values > highest + m * spread).sum())) for m in MARGINS)
                print(
                    f"| {concept} | {name} | {spread:.3f} | {move:.1e} | {label} ({values.numel()}) | {flagged} |",
                    flush=True,
                )
            pipe.unload_steering()


if __name__ == "__main__":
    main()
