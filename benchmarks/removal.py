"""Does DSAS remove the concept and spare the rest? Concept rate and control change over strengths.

For each concept and configuration: fit a steering on the concept's shipped fitting sets,
render its evaluation prompts (``eval_concept.txt``, ``eval_control.txt``; or development
prompts with ``--prompts dev``) with every seed at every strength, and measure

* the concept rate: the fraction of concept images in which the Shapes detector still finds
  the concept where the prompt put it;
* the control change: the mean absolute pixel difference (0-255) of control images to their
  unsteered selves.

The target (on shapes-sd): at some strength the concept rate is at most half the unsteered
rate while the control change is at most 2, and at every strength swept the control change
stays at most 2 (or the steering is refused with an error).

    python benchmarks/removal.py                                  # the target check, defaults vs previous
    python benchmarks/removal.py --fit '{"max_strength": null}'   # the same steerers without the strength bound
    python benchmarks/removal.py --prompts dev --count 16 --seeds 0 --configs defaults cfg-both
    python benchmarks/removal.py --model shapes-mmdit --concepts banana
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval import pixel_change
from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes import TUNING_CONCEPTS, ShapeJudge, concept_dir, concept_prompts, concepts_drawn
from dsas_diffusion.steering import SteeringError

#: configuration name -> (fit_steering arguments, pipeline call arguments)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "defaults": ({}, {}),
    "uniform": ({}, {"steering_gate": "none"}),
    # what fit_steering and the pipelines did before the removal work: pooled sigmoid gates
    # calibrated on control positions, Linear-AcT on the block outputs, both CFG halves
    "previous": (
        {
            "map": "linear-act",
            "preset": "blocks",
            "gate_fit_on": "pooled",
            "gate_calibration": "control-positions",
            "gate_floor": 0.0,
            "n_components": 20,
            "support_quantiles": None,
            "max_strength": None,
        },
        {"steering_cfg": "both"},
    ),
}
DEV_SEED = 7
TARGET_CHANGE = 2.0


def prompts_for(concept: str, which: str, count: int) -> tuple[list[str], list[str]]:
    if which == "dev":
        from dsas_diffusion.shapes import make_concept_sets

        sets = make_concept_sets(concept, seed=DEV_SEED)
        return sets["eval_concept"][:count], sets["eval_control"][:count]
    folder = concept_dir(concept)
    return read_prompts(folder / "eval_concept.txt")[:count], read_prompts(folder / "eval_control.txt")[:count]


def render(pipe, prompts: list[str], seeds: list[int], steps: int, batch: int = 16, **steering: Any) -> list:
    images = []
    for seed in seeds:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            generators = [torch.Generator().manual_seed(seed) for _ in chunk]
            with torch.no_grad():
                images += pipe(chunk, generator=generators, num_inference_steps=steps, **steering).images
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--configs", nargs="+", default=["defaults", "uniform", "previous"])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prompts", choices=["eval", "dev"], default="eval")
    parser.add_argument("--count", type=int, default=32, help="prompts per group")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--fit", default="{}", help="extra fit_steering arguments as JSON, for every config")
    parser.add_argument(
        "--candidates", type=Path, help='more configs, a JSON file {"name": {"fit": {...}, "call": {...}}}'
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/removal"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra_fit = json.loads(args.fit)
    configs = dict(CONFIGS)
    if args.candidates is not None:
        for name, spec in json.loads(args.candidates.read_text()).items():
            configs[name] = (spec.get("fit", {}), spec.get("call", {}))
    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge = ShapeJudge()
    rows = []
    for concept in args.concepts:
        source, target, control = concept_prompts(concept)
        concept_eval, control_eval = prompts_for(concept, args.prompts, args.count)
        labels = [p for _ in args.seeds for p in concept_eval]
        base = {
            "concept": render(pipe, concept_eval, args.seeds, args.steps),
            "control": render(pipe, control_eval, args.seeds, args.steps),
        }
        unsteered_rate = float(np.mean(concepts_drawn(judge, base["concept"], labels, concept)))
        print(f"\n{args.model} / {concept}: unsteered concept rate {unsteered_rate:.3f} "
              f"({len(labels)} concept, {len(base['control'])} control images)")  # fmt: skip
        for config in args.configs:
            fit_args, call_args = configs[config]
            start = time.time()
            steerer = pipe.fit_steering(source, target, control, progress=False, **{**fit_args, **extra_fit})
            kept = sum(layer.gate is None or layer.gate.enabled for layer in steerer.layers)
            print(f"  {config}: {steerer.config['map']} on {steerer.provenance['preset']} "
                  f"({kept}/{len(steerer.layers)} layers kept), call {call_args or 'defaults'}")  # fmt: skip
            print(f"  {'λ':>6} {'concept rate':>13} {'control change':>15} {'concept change':>15}")
            for strength in args.strengths:
                try:
                    images = {
                        group: render(pipe, prompts, args.seeds, args.steps, steering_strength=strength, **call_args)
                        for group, prompts in (("concept", concept_eval), ("control", control_eval))
                    }
                except SteeringError as error:
                    print(f"  {strength:>6g} refused: {error}")
                    rows.append({"model": args.model, "concept": concept, "config": config, "strength": strength,
                                 "refused": str(error)})  # fmt: skip
                    continue
                rate = float(np.mean(concepts_drawn(judge, images["concept"], labels, concept)))
                change = {
                    group: float(np.mean([pixel_change(a, b) for a, b in zip(images[group], base[group], strict=True)]))
                    for group in images
                }
                print(f"  {strength:>6g} {rate:>13.3f} {change['control']:>15.2f} {change['concept']:>15.2f}")
                rows.append(
                    {
                        "model": args.model,
                        "concept": concept,
                        "config": config,
                        "strength": strength,
                        "unsteered_rate": unsteered_rate,
                        "concept_rate": rate,
                        "control_change": change["control"],
                        "concept_change": change["concept"],
                    }
                )
            met = [
                r["strength"]
                for r in rows
                if r["concept"] == concept and r["config"] == config and "concept_rate" in r
                and r["concept_rate"] <= unsteered_rate / 2 and r["control_change"] <= TARGET_CHANGE
            ]  # fmt: skip
            within = all(
                r.get("control_change", 0.0) <= TARGET_CHANGE
                for r in rows
                if r["concept"] == concept and r["config"] == config
            )
            print(f"  target: half removed with control change <= {TARGET_CHANGE:g} at λ in {met or 'none'}; "
                  f"control within the bound at every λ: {within} ({time.time() - start:.0f} s)")  # fmt: skip
            pipe.unload_steering()
    (args.out / f"removal-{args.model}.json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out / f'removal-{args.model}.json'}")


if __name__ == "__main__":
    main()
