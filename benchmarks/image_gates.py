"""Gates that see the image, fitted by the library, on the development concepts of a Shapes model.

Each configuration is a ``fit_steering`` call (CAA on the cross-attention outputs), rendered on
16 development prompts naming the concept and 16 control prompts (``make_concept_sets(concept,
seed=7)``, seed 0) and on the empty prompt (seeds 0, 1, ...):

* ``output``: today's default (gates on the cross-attention outputs, calibrated on control
  positions);
* ``image``: gates on each cross-attention's query input, fitted on the positions located by
  contrast with the paired target, calibrated two-sided at the 90% quantile of control
  positions, times a sample gate on the image's mean query input (``sample_gate=True``);
* ``image@S``: the same, steering from ``S`` of the schedule on (``steering_steps=(S, 1)``);
* ``decided``: ``image@0.48`` with one decision per image in place of the per-layer sample
  gates (``sample_decision="accumulated"``): the mean of every layer's scaled sample-gate logit
  over the steps before the window, above all of the control prompts' images (2 seeds each);
  ``decided@0.95``: above 95% of them;
* ``stacked``: ``decided`` with the layers weighted by a logistic regression on source against
  control images of the first seed, above all control images of the second.

Reported per strength: *named*, the share of the named prompts' images in which the detector
finds the concept; *named, CLIP*, shapes-clip's zero-shot probability that they show it (a
second judge: the detector reads a crescent whose inner edge is filled in as a triangle); *control sim*, the mean CLIP similarity (shapes-clip) of control images to
their unsteered selves; *unasked left*, the share of the empty prompt's images showing the concept
that still show it; *others sim*, the similarity of the empty prompt's other images.

    python benchmarks/image_gates.py --concepts banana red star
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.diffusion.visual import image_grid
from dsas_diffusion.eval.metrics import ClipScorer
from dsas_diffusion.shapes import TUNING_CONCEPTS, ShapeJudge, concept_prompts, concepts_drawn, make_concept_sets
from dsas_diffusion.shapes.detect import read_objects, unprompted_concept
from dsas_diffusion.shapes.examples import DECIDED, IMAGE_GATES

IMAGE = IMAGE_GATES
CONFIGS = {
    "output": {},
    "image": IMAGE,
    "image@0.2": {**IMAGE, "steering_steps": (0.2, 1.0)},
    "image@0.48": {**IMAGE, "steering_steps": (0.48, 1.0)},
    "decided": {**IMAGE, **DECIDED},
    "decided@0.95": {**IMAGE, **DECIDED, "decision_quantile": 0.95},
    "stacked": {**IMAGE, **DECIDED, "sample_decision": "stacked"},
}


def render(pipe, prompts, seeds, strength):
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    images = []
    for start in range(0, len(prompts), 16):
        chunk = slice(start, start + 16)
        images += pipe(list(prompts[chunk]), generator=generators[chunk], num_inference_steps=25,
                       steering_strength=strength).images  # fmt: skip
    return images


def similarity(clip, images, references) -> float:
    return float(clip.image_similarity(images, references).mean()) if images else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-sd", help="shapes-sd or shapes-mmdit (its joint attentions)")
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--strengths", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--empty-seeds", type=int, default=64)
    parser.add_argument(
        "--set", type=json.loads, default={}, help="fit settings for every configuration but output, as JSON"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/image-gates"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge, clip = ShapeJudge(), ClipScorer("shapes-clip")
    rows = []
    print("| concept | gates | λ | named | named, CLIP | control sim | unasked left | others sim |")
    print("|---|---|---|---|---|---|---|---|")
    for concept in args.concepts:
        sets = make_concept_sets(concept, seed=7)
        named, control = sets["eval_concept"][:16], sets["eval_control"][:16]
        empty, empty_seeds = [""] * args.empty_seeds, range(args.empty_seeds)
        base = {"named": render(pipe, named, [0] * 16, 0.0), "control": render(pipe, control, [0] * 16, 0.0)}
        base["empty"] = render(pipe, empty, empty_seeds, 0.0)
        shows = [bool(unprompted_concept(o, concept)) for o in read_objects(judge, base["empty"])]
        unsteered = float(np.mean(concepts_drawn(judge, base["named"], named, concept)))
        presence = float(clip.concept_presence(base["named"], concept).mean())
        print(f"| {concept} | unsteered | | {unsteered:.2f} | {presence:.2f} | 1 | {sum(shows)} of {len(shows)} | 1 |")
        rows.append({"concept": concept, "config": "unsteered", "named": unsteered, "named_clip": presence,
                     "unasked": sum(shows)})  # fmt: skip
        for name in args.configs:
            settings = {**CONFIGS[name], **(args.set if name != "output" else {})}
            pipe.fit_steering(*concept_prompts(concept), progress=False, **settings)
            for strength in args.strengths:
                named_images = render(pipe, named, [0] * 16, strength)
                control_images = render(pipe, control, [0] * 16, strength)
                empty_images = render(pipe, empty, empty_seeds, strength)
                found = [bool(unprompted_concept(o, concept)) for o in read_objects(judge, empty_images)]
                others = [i for i, s in enumerate(shows) if not s]
                row = {
                    "concept": concept, "config": name, "strength": strength,
                    "named": float(np.mean(concepts_drawn(judge, named_images, named, concept))),
                    "named_clip": float(clip.concept_presence(named_images, concept).mean()),
                    "control_sim": similarity(clip, control_images, base["control"]),
                    "unasked_left": float(np.mean([f for f, s in zip(found, shows, strict=True) if s])) if any(shows) else None,
                    "others_sim": similarity(clip, [empty_images[i] for i in others], [base["empty"][i] for i in others]),
                }  # fmt: skip
                rows.append(row)
                pictures = [base["named"][:8], named_images[:8], base["control"][:8], control_images[:8]]
                unasked_ids = [i for i, s in enumerate(shows) if s][:8]
                pictures += [[base["empty"][i] for i in unasked_ids], [empty_images[i] for i in unasked_ids]]
                labels = ["named", "steered", "control", "steered", "unasked", "steered"]
                image_grid(pictures, row_labels=labels, title=f"{concept}, {name}, λ {strength:g}").save(
                    args.out / f"{concept}_{name}_{strength:g}.png"
                )
                left = "n/a" if row["unasked_left"] is None else f"{row['unasked_left']:.2f}"
                print(f"| {concept} | {name} | {strength:g} | {row['named']:.2f} | {row['named_clip']:.2f} | "
                      f"{row['control_sim']:.3f} | "
                      f"{left} | {row['others_sim']:.3f} |", flush=True)  # fmt: skip
            pipe.unload_steering()
            (args.out / "image_gates.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
