"""How far could a perfect spatial gate go? Steering only inside the concept's mask, on shapes-sd.

An upper bound for gates that see the image. For each concept, the default steerer's CAA maps on the
cross-attention outputs are applied only at positions covered by the concept object: the detector's
mask in the unsteered image, at least a quarter of each position's area at the layer's grid. The
gate is an oracle: no fitted gate locates the object better. Steering starts at denoising step
``--starts`` (each cross-attention runs once per step) and acts on the conditional rows.

Measured on 16 development prompts (``make_concept_sets(concept, seed=7)``, seed 0) and on the
empty prompt's images (seeds 0, 1, ...) that show the concept:
* *named*: the share of the prompts' images in which the detector still finds the concept;
* *CLIP*: shapes-clip's zero-shot probability that the named prompts' images show it (a second
  judge: the detector reads a crescent whose inner edge is filled in as a triangle);
* *unasked left*: the share of the empty prompt's images showing the concept that still show it;
* *outside Δ*: the mean pixel change (0–255) outside the concept's mask.

    python benchmarks/oracle_gates.py --concepts banana red star
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.diffusion.visual import image_grid
from dsas_diffusion.eval.diagnostic import mask_coverage
from dsas_diffusion.eval.metrics import ClipScorer, pixel_change_by_region
from dsas_diffusion.shapes import TUNING_CONCEPTS, ShapeJudge, concept_prompts, concepts_drawn, make_concept_sets
from dsas_diffusion.shapes.detect import colour_mask, concept_mask, read_objects, unprompted_concept


def render(pipe, steerer, prompts, seeds, masks=None, strength=0.0, start=0, steps=25):
    """Images of ``prompts`` (image ``i`` with ``seeds[i]``), steered by ``steerer``'s maps only
    inside ``masks`` from step ``start`` on."""
    handles, calls = [], {}
    if masks is not None:
        pixels = torch.from_numpy(np.stack(masks))
        for layer in steerer.layers:
            vector = layer.map.bias.float()

            def hook(module, args, output, vector=vector, name=layer.name):
                calls[name] = calls.get(name, 0) + 1
                if calls[name] <= start:
                    return None
                side = round(output.shape[1] ** 0.5)
                inside = (mask_coverage(pixels, (side, side)) > 0.25).float()
                half = output.shape[0] // 2  # [unconditional; conditional]
                steered = output.clone()
                steered[half:] += strength * inside[:, :, None] * vector
                return steered

            handles.append(pipe.unet.get_submodule(layer.name).register_forward_hook(hook))
    try:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with torch.no_grad():
            return pipe(list(prompts), generator=generators, num_inference_steps=steps).images
    finally:
        for handle in handles:
            handle.remove()


def outside(images, references, masks) -> float:
    return float(
        np.nanmean([pixel_change_by_region(a, b, m)[1] for a, b, m in zip(images, references, masks, strict=True)])
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--strengths", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--starts", type=int, nargs="+", default=[0, 5, 12])
    parser.add_argument("--empty-seeds", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("outputs/oracle-gates"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    judge, clip = ShapeJudge(), ClipScorer("shapes-clip")
    rows = []
    print("| concept | from step | λ | named | CLIP | outside Δ, named | unasked left | outside Δ, unasked |")
    print("|---|---|---|---|---|---|---|---|")
    for concept in args.concepts:
        steerer = pipe.fit_steering(*concept_prompts(concept), gate_threshold=None, progress=False)
        pipe.unload_steering()
        named = make_concept_sets(concept, seed=7)["eval_concept"][:16]
        seeds = [0] * len(named)
        base = render(pipe, steerer, named, seeds)
        masks = [concept_mask(image, prompt, concept) for image, prompt in zip(base, named, strict=True)]
        empty = [""] * args.empty_seeds
        empty_base = render(pipe, steerer, empty, range(args.empty_seeds))
        objects = read_objects(judge, empty_base)
        found = [colour_mask(im, unprompted_concept(o, concept)) for im, o in zip(empty_base, objects, strict=True)]
        shows = [i for i, mask in enumerate(found) if mask.any()]
        unasked = [empty[i] for i in shows]
        unasked_base, unasked_masks = [empty_base[i] for i in shows], [found[i] for i in shows]
        row = {"concept": concept, "start": None, "strength": 0.0, "unasked_images": len(shows)}
        row["named"] = float(np.mean(concepts_drawn(judge, base, named, concept)))
        row["clip"] = float(clip.concept_presence(base, concept).mean())
        rows.append(row)
        print(f"| {concept} | unsteered | | {row['named']:.2f} | {row['clip']:.2f} | | 1.00 of {len(shows)} | |")
        for start in args.starts:
            for strength in args.strengths:
                images = render(pipe, steerer, named, seeds, masks, strength, start)
                steered = render(pipe, steerer, unasked, shows, unasked_masks, strength, start)
                left = [bool(unprompted_concept(o, concept)) for o in read_objects(judge, steered)]
                row = {
                    "concept": concept, "start": start, "strength": strength,
                    "named": float(np.mean(concepts_drawn(judge, images, named, concept))),
                    "clip": float(clip.concept_presence(images, concept).mean()),
                    "outside_named": outside(images, base, masks),
                    "unasked_left": float(np.mean(left)) if left else float("nan"),
                    "outside_unasked": outside(steered, unasked_base, unasked_masks) if left else float("nan"),
                }  # fmt: skip
                rows.append(row)
                image_grid([base[:8], images[:8]], row_labels=["named", "steered"]).save(
                    args.out / f"{concept}_{start}_{strength:g}.png"
                )
                print(f"| {concept} | {start} | {strength:g} | {row['named']:.2f} | {row['clip']:.2f} | "
                      f"{row['outside_named']:.1f} | "
                      f"{row['unasked_left']:.2f} | {row['outside_unasked']:.1f} |")  # fmt: skip
    (args.out / "oracle_gates.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
