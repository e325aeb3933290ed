"""What a steered call passes through before the first activation changes, and what it checks.

Runs one steered ``shapes-sd`` call (the shipped ``banana`` steering, 2 steps) and one steered
``shapes-lm`` generation (the shipped ``negative-caa`` steering, 2 tokens) under a profiler
and prints, for each:

* the package's modules and functions entered from the call until the steering arithmetic
  first runs (``PreparedLayer.__call__``), each counted once (comprehensions and lambdas not
  counted as functions);
* how often the call validates a strength (``check_strength``) and normalises a gate word
  (``gate_word``), over the whole call;
* the attributes of an attached ``SteeringSession``.

Uses the public API only, so that it runs on two versions of the code::

    python benchmarks/call_path.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

import dsas_diffusion
from dsas_diffusion import DSASLanguageModel, DSASStableDiffusionPipeline
from dsas_diffusion.shapes import resolve_model_path
from dsas_diffusion.shapes.examples import example_steerings, text_example_steerings

PACKAGE = str(Path(dsas_diffusion.__file__).parent)
COUNTED = ("check_strength", "gate_word")


def trace(call) -> dict:
    """Run ``call`` under a profiler; the package's functions until the first steering arithmetic."""
    functions: list[tuple[str, str]] = []
    calls: Counter = Counter()
    state = {"steered": False}

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return
        module = code.co_filename[len(PACKAGE) + 1 :]
        if code.co_name in COUNTED:
            calls[code.co_name] += 1
        if state["steered"]:
            return
        if module.endswith("prepared.py") and code.co_name == "__call__":
            state["steered"] = True
            return
        if not code.co_name.startswith("<"):
            functions.append((module, f"{module}:{code.co_name}:{code.co_firstlineno}"))

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return {
        "modules": len({m for m, _ in functions}),
        "functions": len({f for _, f in functions}),
        "reached the arithmetic": state["steered"],
        **{f"{name} calls": calls[name] for name in COUNTED},
    }


def main() -> None:
    torch.manual_seed(0)
    pipe = DSASStableDiffusionPipeline.from_pretrained(resolve_model_path("shapes-sd"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    steerer = pipe.load_steering(example_steerings()["banana"], name="banana")
    pipe("a banana", num_inference_steps=2, steering_strength=1.0)  # imports and first-use checks
    image = trace(lambda: pipe("a banana", num_inference_steps=2, steering_strength=1.0))
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    lm.load_steering(text_example_steerings()[("negative", "caa")], name="negative")
    lm.generate(["you are"], steering_strength=8.0, max_new_tokens=2)
    text = trace(lambda: lm.generate(["you are"], steering_strength=8.0, max_new_tokens=2))
    session = steerer.attach(pipe.unet, strength=1.0)
    try:
        attributes = sorted(vars(session))
    finally:
        session.detach()
    print("| call | modules | functions | strength checks | gate words |\n|---|---|---|---|---|")
    for label, row in (("image pipeline", image), ("language model", text)):
        print(
            f"| {label} | {row['modules']} | {row['functions']} | {row['check_strength calls']} "
            f"| {row['gate_word calls']} |"
        )
    print(f"\nSteeringSession attributes ({len(attributes)}): {', '.join(attributes)}")


if __name__ == "__main__":
    main()
