"""A first look at the banana concept on ``shapes-lm``, fitted from the image prompt files.

    python benchmarks/text_banana.py ['{"n_components": 20}']

Fits ``DSASLanguageModel.fit_steering`` on ``prompts/banana`` (source / target / control, the
files that steer ``shapes-sd``) with the given settings (JSON; ``gate_threshold`` is off so
that every layer is kept), prints each layer's held-out gate accuracy, the per-token gates of
a banana text and of the same text with a square, and the share of 200 sampled continuations
(temperature 1, seed 0) that mention a banana after a banana prompt and after a square prompt,
unsteered and with uniform and DSAS steering at λ 1 and 4.
"""

from __future__ import annotations

import json
import sys

import torch

from dsas_diffusion.config import FitConfig
from dsas_diffusion.shapes import concept_prompts
from dsas_diffusion.text import DSASLanguageModel

TEXTS = ("a yellow banana lies on the left. the banana is easy to see.",
         "a yellow square lies on the left. the square is easy to see.")  # fmt: skip
PROMPTS = ("a yellow banana lies on the left.", "a red square lies on the left.")
RUNS = (("unsteered", 0.0, "dsas"), ("uniform", 1.0, "none"), ("DSAS", 1.0, "dsas"), ("uniform", 4.0, "none"),
        ("DSAS", 4.0, "dsas"))  # fmt: skip


def main() -> None:
    settings = {"gate_threshold": None, **json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")}
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    # the first look's base: the method as published (the language models' defaults came later)
    steerer = lm.fit_steering(*concept_prompts("banana"), FitConfig(), progress=False, **settings)
    print("settings:", settings)
    print("gate accuracy:", ", ".join(f"{layer.name} {layer.gate.accuracy:.2f}" for layer in steerer.layers))
    for item in lm.gates(list(TEXTS)):
        for layer, gates in item["gate_maps"]["default"].items():
            cells = " ".join(
                f"{token.lstrip('▁')}:{value:.2f}" for token, value in zip(item["tokens"], gates.tolist(), strict=True)
            )
            print(f"{layer}: {cells}")
    print("\n| prompt | " + " | ".join(f"{label} λ {strength:g}" for label, strength, _ in RUNS) + " |")
    print("|---|" + "---|" * len(RUNS))
    for prompt in PROMPTS:
        cells = []
        for _, strength, gate in RUNS:
            torch.manual_seed(0)
            out = lm.generate([prompt] * 200, steering_strength=strength, steering_gate=gate, max_new_tokens=40,
                              do_sample=True, top_k=0)  # fmt: skip
            cells.append(f"{100 * sum('banana' in text for text in out.texts) / 200:.1f}%")
        print(f"| {prompt} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
