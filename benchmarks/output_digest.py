"""Digests of what a user gets from every shipped steering, to tell whether a change of the
code changed a single bit of it.

Renders, with the public API only, so that the same script runs on two versions of the code:

* every shipped image steering (``shapes-sd``) on named and control prompts: the stock call,
  λ 0, its saved λ through the gates and uniformly, the conditional half and both CFG halves,
  a step window, one λ per prompt, and the gate maps;
* every shipped text steering (``shapes-lm``): greedy tokens at λ 0 and at its saved λ, one λ
  per prompt, the gates of a teacher-forced pass and perplexities;
* the README's example call (the steering fitted as the README fits it).

and prints one SHA-256 per output, as JSON (``--out`` writes it too). Compare two runs made on
one machine with one kernel setting::

    python benchmarks/output_digest.py --out before.json      # on the old code
    python benchmarks/output_digest.py --out after.json       # on the new code
    diff before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dsas_diffusion import DSASLanguageModel, DSASStableDiffusionPipeline
from dsas_diffusion.shapes import concept_prompts, make_concept_sets, resolve_model_path
from dsas_diffusion.shapes.examples import example_steerings, text_example_steerings


def digest(value) -> str:
    """SHA-256 of images, tensors, lists of them, or dicts of them (keys sorted)."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, dict):
            for key in sorted(v):
                h.update(str(key).encode())
                feed(v[key])
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        elif torch.is_tensor(v):
            h.update(str(tuple(v.shape)).encode() + str(v.dtype).encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif hasattr(v, "tobytes"):
            h.update(np.asarray(v).tobytes())
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()[:16]


def images(pipe, prompts, **kwargs):
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, generator=generators, num_inference_steps=kwargs.pop("steps", 12), output_type="np", **kwargs)
    return out


def image_digests(results: dict) -> None:
    pipe = DSASStableDiffusionPipeline.from_pretrained(resolve_model_path("shapes-sd"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, path in example_steerings().items():
        concept = name.split("-")[0]
        sets = make_concept_sets(concept, seed=7)
        prompts = sets["eval_concept"][:3] + sets["eval_control"][:3]
        pipe.unload_steering()
        results[f"image/{name}/stock"] = digest(images(pipe, prompts).images)
        steerer = pipe.load_steering(path, name=name)
        strength = steerer.strength
        calls = {
            "zero": {"steering_strength": 0.0},
            "saved": {},
            "double": {"steering_strength": 2 * strength},
            "uniform": {"steering_gate": "none", "steering_strength": 1.0},
            "both-halves": {"steering_cfg": "both"},
            "window": {"steering_steps": (0.25, 0.75)},
            "per-prompt": {"steering_strength": [0.0, strength, 2 * strength, 0.0, strength, 2 * strength]},
            "by-name": {"steering_strength": {name: strength}},
        }
        for label, kwargs in calls.items():
            results[f"image/{name}/{label}"] = digest(images(pipe, prompts, **kwargs).images)
        out = images(pipe, prompts, return_gate_maps=True)
        results[f"image/{name}/with-maps"] = digest(out.images)
        results[f"image/{name}/maps"] = digest(out.gate_maps)
    # two steerers at once
    pipe.unload_steering()
    steerings = example_steerings()
    pipe.load_steering(steerings["banana"], name="banana")
    pipe.load_steering(steerings["red"], name="red")
    prompts = ["a yellow banana and a red square", "a red circle on a white background", ""]
    results["image/two/saved"] = digest(images(pipe, prompts).images)
    results["image/two/mixed"] = digest(images(pipe, prompts, steering_strength={"banana": 4.0}).images)
    # the README's example
    pipe.unload_steering()
    source, target, control = concept_prompts("banana")
    pipe.fit_steering(source, target, control, progress=False, name="banana")
    out = pipe(
        ["a yellow banana on a gray background", "a red square on a white background"],
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        num_inference_steps=25,
        steering_strength=2.0,
        steering_gate="dsas",
        steering_cfg="cond",
        return_gate_maps=True,
        output_type="np",
    )
    results["image/readme/images"] = digest(out.images)
    results["image/readme/maps"] = digest(out.gate_maps)


def text_digests(results: dict) -> None:
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    prompts = ["the banana is", "a red square and", "once upon a time the"]
    for (concept, map_name), path in text_example_steerings().items():
        name = f"{concept}-{map_name}"
        lm.unload_steering()
        steerer = lm.load_steering(path, name=name)
        strength = steerer.strength
        for label, value in {"zero": 0.0, "saved": None, "per-prompt": [0.0, strength, strength / 2]}.items():
            out = lm.generate(prompts, steering_strength=value, max_new_tokens=12, do_sample=False)
            results[f"text/{name}/{label}"] = digest(out.sequences)
        out = lm.generate(prompts, max_new_tokens=8, do_sample=False, return_gate_maps=True)
        results[f"text/{name}/maps"] = digest(out.gate_maps)
        results[f"text/{name}/uniform"] = digest(
            lm.generate(prompts, steering_gate="none", steering_strength=1.0, max_new_tokens=8).sequences
        )
        results[f"text/{name}/gates"] = digest([row["gate_maps"] for row in lm.gates(prompts)])
        results[f"text/{name}/perplexity"] = digest(lm.perplexity(prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", choices=["image", "text"])
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, str] = {}
    if args.only != "text":
        image_digests(results)
    if args.only != "image":
        text_digests(results)
    text = json.dumps(results, indent=1, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
