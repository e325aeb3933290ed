"""Which half of the classifier-free-guidance batch to steer: ``steering_cfg="both"`` or ``"cond"``.

    python benchmarks/cfg_mode.py [--count 16] [--strengths 0.5 1 2]

On ``shapes-sd`` with the banana steering of ``make demo`` (Linear-AcT + DSAS gates), for each
mode and strength: how often a banana is still drawn on held-out banana prompts, and the mean
absolute pixel change (0-255) of banana and of control prompts against the unsteered image.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval import pixel_change
from dsas_diffusion.shapes import ShapeJudge, banana_drawn, concept_prompts, evaluation_prompts


def render(pipe, prompts, seed=100, **kwargs):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, num_inference_steps=25, **kwargs).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--map", default="linear-act")
    args = parser.parse_args()
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    pipe.fit_steering(*concept_prompts(), map=args.map, gate="dsas", progress=False)
    judge = ShapeJudge()
    banana, control = evaluation_prompts(args.count)
    base = {
        "banana": render(pipe, banana, steering_strength=0.0),
        "control": render(pipe, control, steering_strength=0.0),
    }
    print(f"unsteered: banana drawn {np.mean(banana_drawn(judge, base['banana'], banana)):.0%}")
    print("| steering_cfg | gating | strength | banana drawn | change, banana prompts | change, control prompts |")
    print("|---|---|---|---|---|---|")
    for gate in ("dsas", "none"):
        for mode in ("both", "cond"):
            for strength in args.strengths:
                kwargs = dict(steering_strength=strength, steering_cfg=mode, steering_gate=gate)
                images = {"banana": render(pipe, banana, **kwargs), "control": render(pipe, control, **kwargs)}
                drawn = np.mean(banana_drawn(judge, images["banana"], banana))
                change = {
                    group: np.mean([pixel_change(a, b) for a, b in zip(images[group], base[group], strict=True)])
                    for group in images
                }
                print(
                    f"| {mode} | {'uniform' if gate == 'none' else 'DSAS'} | {strength} | {drawn:.0%} | "
                    f"{change['banana']:.2f} | {change['control']:.2f} |"
                )


if __name__ == "__main__":
    main()
