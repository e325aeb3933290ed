"""Where do the gates open, and where does steering remove the concept? Ground truth on shapes-sd.

For each concept and hook preset, renders development prompts (drawn by
``shapes.make_concept_sets`` with a seed other than the shipped sets', so tuning never sees the
evaluation prompts) unsteered, keeps the hooked activations, and scores each gate variant
against the concept object's pixels (``dsas_diffusion.eval.diagnostic``): ROC-AUC of concept
positions against every control position, mean gate inside the mask, on the rest of the
image and on control images, per layer and per step. ``--removal`` also measures the
concept rate with each layer alone steered.

    python benchmarks/gate_diagnostic.py --concepts banana red star --presets cross-attention blocks norms --removal 2
    python benchmarks/gate_diagnostic.py --model shapes-mmdit --presets cross-attention blocks norms
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval.diagnostic import capture_runs, gate_separation, single_layer_removal, summarise_separation
from dsas_diffusion.shapes import TUNING_CONCEPTS, concept_prompts, make_concept_sets

#: gate variants: name -> fit_steering arguments (the map does not change the gates)
VARIANTS = {
    "pooled": {"gate_fit_on": "pooled", "gate_calibration": "control-positions"},
    "pooled-uncalibrated": {"gate_fit_on": "pooled", "gate_calibration": "none"},
    "contrast": {"gate_fit_on": "contrast", "gate_calibration": "control-positions"},
    "contrast-two-sided": {"gate_fit_on": "contrast", "gate_calibration": "two-sided"},
    # gates reading each hooked module's input (a cross-attention's query input: the image stream)
    "input-pooled": {"gate_fit_on": "pooled", "gate_calibration": "control-positions", "gate_reads": "input"},
    "input-contrast": {"gate_fit_on": "contrast", "gate_calibration": "control-positions", "gate_reads": "input"},
}
DEV_SEED = 7  # development prompts: make_concept_sets(concept, seed=7), never the shipped evaluation sets


def dev_prompts(concept: str, count: int) -> tuple[list[str], list[str]]:
    sets = make_concept_sets(concept, seed=DEV_SEED)
    return sets["eval_concept"][:count], sets["eval_control"][:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--presets", nargs="+", default=["cross-attention", "blocks"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--count", type=int, default=16, help="development prompts per group")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--removal", type=float, default=None, help="also steer each layer alone at this strength")
    parser.add_argument("--map", default="caa")
    parser.add_argument("--out", type=Path, default=Path("outputs/gate-diagnostic"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for concept in args.concepts:
        source, target, control = concept_prompts(concept)
        concept_dev, control_dev = dev_prompts(concept, args.count)
        for preset in args.presets:
            start = time.time()
            steerers = {
                name: pipe.fit_steering(
                    source, target, control, map=args.map, preset=preset, gate_threshold=None, progress=False,
                    name=f"{preset}-{name}", **VARIANTS[name],
                )
                for name in args.variants
            }  # fmt: skip
            # where the maps steer and where every variant's gates read
            points = list(dict.fromkeys(
                point for steerer in steerers.values() for layer in steerer.layers
                for point in (layer.hook_point, layer.gate_point)
            ))  # fmt: skip
            runs = {
                group: capture_runs(pipe, points, prompts, seeds=args.seeds, num_inference_steps=args.steps)
                for group, prompts in (("concept", concept_dev), ("control", control_dev))
            }
            for name, steerer in steerers.items():
                rows = gate_separation(steerer, runs["concept"], runs["control"], concept)
                accuracy = {layer.name: layer.gate.accuracy for layer in steerer.layers}
                for row in rows:
                    row.update(concept=concept, preset=preset, variant=name, accuracy=accuracy[row["layer"]])
                results += rows
                print(f"\n{concept} / {preset} / {name}: gates over all steps")
                print(
                    f"{'layer':<48} {'acc':>5} {'auc':>6} {'spatial':>7} {'in mask':>8} {'rest':>6} "
                    f"{'control':>8} {'ctl open':>8}"
                )
                for row in (r for r in rows if r["step"] == "all"):
                    print(
                        f"{row['layer']:<48} {row['accuracy']:>5.2f} {row['auc']:>6.3f} {row['auc_spatial']:>7.3f} "
                        f"{row['gate_in_mask']:>8.3f} {row['gate_rest_of_image']:>6.3f} {row['gate_control']:>8.3f} "
                        f"{row['control_open']:>8.3f}"
                    )
            if args.removal is not None:
                steerer = steerers[args.variants[0]]
                for gate in ("none", "dsas"):
                    removal = single_layer_removal(
                        pipe, steerer, concept, concept_dev, strength=args.removal, seeds=args.seeds,
                        num_inference_steps=args.steps, steering_gate=gate, steering_cfg="cond",
                    )  # fmt: skip
                    print(f"\n{concept} / {preset}: concept rate, each layer alone at λ={args.removal:g} "
                          f"({'uniform' if gate == 'none' else 'DSAS'}, conditional half)")  # fmt: skip
                    for row in removal:
                        print(f"  {row['steered']:<48} {row['concept_rate']:.3f}")
                        results.append({"concept": concept, "preset": preset, "removal_gate": gate, **row})
            pipe.unload_steering()
            print(f"({concept} / {preset}: {time.time() - start:.0f} s)")
    summary = summarise_separation([r for r in results if "step" in r], ("preset", "variant", "concept"))
    print(f"\n{'preset':<16} {'variant':<20} {'concept':<9} {'auc':>6} {'min':>6} {'spatial':>8} {'in mask':>8} "
          f"{'rest':>6} {'control':>8} {'ctl open':>8}")  # fmt: skip
    for line in summary:
        print(
            f"{line['preset']:<16} {line['variant']:<20} {line['concept']:<9} {line['auc']:>6.3f} {line['auc_min']:>6.2f} "
            f"{line['auc_spatial']:>8.3f} {line['gate_in_mask']:>8.2f} {line['gate_rest_of_image']:>6.2f} "
            f"{line['gate_control']:>8.3f} {line['control_open']:>8.3f}"
        )
    (args.out / "diagnostic.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out / 'diagnostic.json'}")


if __name__ == "__main__":
    main()
