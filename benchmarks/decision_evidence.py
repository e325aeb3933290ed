"""Which image-level evidence finds the concept nobody asked for, on shapes-sd.

The gates of ``image_gates.IMAGE`` are fitted for each concept; then, on unsteered 25-step
renders, every cross-attention's query input is read at the steps before ``--start`` and
turned into one number per image and layer and step:

* ``mean``: the sample gate's logit on the image's mean query input (what
  ``sample_decision="accumulated"`` uses);
* ``max`` / ``top4``: the largest / the mean of the 4 largest positional gate logits;
* ``sample-top4``: the sample gate's linear classifier applied at each position, the mean of
  its 4 largest logits (the sample gate itself averages all positions, diluting a small object).

Each is divided by its layer's spread on the control prompts' images (2 seeds each) and
averaged over layers and steps. Printed: the share of images above the control images' maximum
and 95% quantile (named and control development prompts, the empty prompt's images with and
without the concept), and the ROC-AUC of the empty prompt's images with the concept against
those without, also for each layer's sample gate alone (its mean over the steps).

    python benchmarks/decision_evidence.py --concepts banana
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from image_gates import IMAGE, render

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval.diagnostic import roc_auc
from dsas_diffusion.shapes import TUNING_CONCEPTS, ShapeJudge, concept_prompts, make_concept_sets
from dsas_diffusion.shapes.detect import read_objects, unprompted_concept
from dsas_diffusion.steering.hookpoints import read_input
from dsas_diffusion.steering.hooks import HookHandles

KINDS = ("mean", "max", "top4", "sample-top4")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of the images with the concept (``labels``) against those without."""
    return roc_auc(torch.from_numpy(scores[labels]), torch.from_numpy(scores[~labels]))


def evidence(pipe, layers, prompts, seeds, start: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per kind and layer, ``(images, steps)`` of the conditional rows' evidence at steps < start."""
    out: dict[str, dict[str, list[torch.Tensor]]] = {kind: {layer.name: [] for layer in layers} for kind in KINDS}
    for begin in range(0, len(prompts), 16):
        chunk: dict[str, dict[str, list[torch.Tensor]]] = {kind: {layer.name: [] for layer in layers} for kind in KINDS}

        def make_hook(layer, chunk=chunk):
            def hook(module, args, kwargs, output):
                if len(chunk["mean"][layer.name]) >= start:
                    return
                query = read_input(args, kwargs, layer.name).float()
                query = query[query.shape[0] // 2 :]
                positions = query @ layer.gate.weight + layer.gate.bias
                chunk["mean"][layer.name].append(query.mean(1) @ layer.sample_gate.weight + layer.sample_gate.bias)
                chunk["max"][layer.name].append(positions.amax(1))
                chunk["top4"][layer.name].append(positions.topk(4, dim=1).values.mean(1))
                sample = query @ layer.sample_gate.weight + layer.sample_gate.bias
                chunk["sample-top4"][layer.name].append(sample.topk(4, dim=1).values.mean(1))

            return hook

        hooks = HookHandles()
        for layer in layers:
            hooks.add(pipe.unet.get_submodule(layer.name).register_forward_hook(make_hook(layer), with_kwargs=True))
        try:
            render(pipe, prompts[begin : begin + 16], seeds[begin : begin + 16], 0.0)
        finally:
            hooks.remove()
        for kind in KINDS:
            for name, values in chunk[kind].items():
                out[kind][name].append(torch.stack(values, 1))
    return {kind: {name: torch.cat(values) for name, values in by_layer.items()} for kind, by_layer in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--start", type=int, default=12, help="steps read, of 25 (default 12: the window 0.48)")
    parser.add_argument("--empty-seeds", type=int, default=64)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the empty prompt's seeds start here (0..127 are the protocol's)"
    )
    args = parser.parse_args(argv)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    judge = ShapeJudge()
    print("| concept | evidence | above | named | control | unasked | clean empty | AUC unasked |")
    print("|---|---|---|---|---|---|---|---|")
    for concept in args.concepts:
        source, target, control = concept_prompts(concept)
        layers = list(pipe.fit_steering(source, target, control, progress=False, **IMAGE).layers)
        pipe.unload_steering()
        sets = make_concept_sets(concept, seed=7)
        empty = [""] * args.empty_seeds
        empty_seeds = list(range(args.first_seed, args.first_seed + args.empty_seeds))
        runs = {
            "calibration": evidence(pipe, layers, list(control) * 2, list(range(2 * len(control))), args.start),
            "named": evidence(pipe, layers, sets["eval_concept"][:16], [0] * 16, args.start),
            "control": evidence(pipe, layers, sets["eval_control"][:16], [0] * 16, args.start),
            "empty": evidence(pipe, layers, empty, empty_seeds, args.start),
        }
        images = render(pipe, empty, empty_seeds, 0.0)
        shows = np.array([bool(unprompted_concept(o, concept)) for o in read_objects(judge, images)])
        for name, values in runs["empty"]["mean"].items():  # each layer alone: its mean over the steps
            print(f"| {concept} | mean, {name} alone | | | | | | {auc(shows, values.mean(1).numpy()):.2f} |")
        for kind in KINDS:
            spread = {name: float(values.std()) for name, values in runs["calibration"][kind].items()}
            score = {
                run: torch.stack([values / spread[name] for name, values in by_kind[kind].items()]).mean((0, 2)).numpy()
                for run, by_kind in runs.items()
            }
            for quantile in (1.0, 0.95):
                threshold = np.quantile(score["calibration"], quantile)
                above = {run: float(np.mean(values > threshold)) for run, values in score.items()}
                unasked = float(np.mean(score["empty"][shows] > threshold))
                clean = float(np.mean(score["empty"][~shows] > threshold))
                print(f"| {concept} | {kind} | {quantile:g} | {above['named']:.2f} | {above['control']:.2f} | "
                      f"{unasked:.2f} | {clean:.2f} | {auc(shows, score['empty']):.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
