"""How far the per-image decision's threshold can move the empty-prompt trade-off, on shapes-sd.

For each concept and each positional quantile (``calibration_quantile``: the share of control
positions the positional gates keep shut), the shipped ``banana-image`` recipe (``image_gates``'
*stacked*) is fitted; then the empty prompt's images (seeds 0, 1, ..., or from ``--first-seed``)
and 16 development control prompts are rendered unsteered and *forced*: every image steered at
its positional gates, whatever its decision score, which is recorded. An image's score does not depend on the
steering (it is read from the steps before the window, which are not steered), so for any
threshold ``t`` the call's outcome is the forced image where the score is above ``t`` and the
unsteered one elsewhere. Printed per strength:

* *removed if forced*: of the empty prompt's images showing the concept, the share without it
  once steered (what a perfect decision would remove);
* *clean forced sim*: the CLIP similarity of the empty prompt's other images, all steered, to
  their unsteered selves (the damage of a false flag);
* at the calibrated threshold (what a call does): *removed*, *others sim*, *control sim*;
* at the best threshold for the empty prompt: the most removed with the other empty-prompt
  images at similarity ≥ 0.98, and the control similarity there; *and control*: the most
  removed with the control images at ≥ 0.98 too. These thresholds are chosen on the images they
  are scored on: upper bounds, not operating points.

    python benchmarks/decision_frontier.py --concepts banana red
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from image_gates import CONFIGS, render

from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval.metrics import ClipScorer
from dsas_diffusion.shapes import TUNING_CONCEPTS, ShapeJudge, concept_prompts, make_concept_sets
from dsas_diffusion.shapes.detect import read_objects, unprompted_concept
from dsas_diffusion.steering import Steerer
from dsas_diffusion.steering.decision import SampleDecision

TARGET = 0.98


@contextlib.contextmanager
def forced_decisions() -> Iterator[list[SampleDecision]]:
    """Every call's decision steers all of its images (threshold -inf); the decisions made are
    collected, so that their scores can be read after the call."""
    made: list[SampleDecision] = []
    stock = Steerer.new_decision

    def new_decision(steerer: Steerer) -> SampleDecision | None:
        decision = stock(steerer)
        if decision is not None:
            decision.threshold = float("-inf")
            made.append(decision)
        return decision

    Steerer.new_decision = new_decision  # type: ignore[method-assign]
    try:
        yield made
    finally:
        Steerer.new_decision = stock  # type: ignore[method-assign]


def forced(pipe, prompts, seeds, strength) -> tuple[list, np.ndarray]:
    """The images, all steered, and each one's decision score."""
    with forced_decisions() as made:
        images = render(pipe, prompts, seeds, strength)
    return images, torch.cat([decision.score() for decision in made]).numpy()


def outcome(t: float, shows, scores, found, sim, control_scores, control_sim) -> tuple[float, float, float]:
    """(removed, others sim, control sim) of a call deciding at threshold ``t``."""
    flagged = scores > t
    removed = float(np.mean(flagged[shows] & ~found[shows]))
    others = float(np.where(flagged[~shows], sim[~shows], 1.0).mean())
    control = float(np.where(control_scores > t, control_sim, 1.0).mean())
    return removed, others, control


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.97, 0.99])
    parser.add_argument("--strengths", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--empty-seeds", type=int, default=128)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the empty prompt's seeds start here (0..127 are the protocol's)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/decision-frontier"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    judge, clip = ShapeJudge(), ClipScorer("shapes-clip")
    rows = []
    print(
        "| concept | positional q | λ | removed if forced | clean forced sim | calibrated: removed / others / control |"
        " best for the empty prompt: removed / others / control | and control: removed |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for concept in args.concepts:
        empty, seeds = [""] * args.empty_seeds, list(range(args.first_seed, args.first_seed + args.empty_seeds))
        control = make_concept_sets(concept, seed=7)["eval_control"][:16]
        base, control_base = render(pipe, empty, seeds, 0.0), render(pipe, control, [0] * 16, 0.0)
        shows = np.array([bool(unprompted_concept(o, concept)) for o in read_objects(judge, base)])
        for quantile in args.quantiles:
            settings = {**CONFIGS["stacked"], "calibration_quantile": quantile}
            steerer = pipe.fit_steering(*concept_prompts(concept), progress=False, **settings)
            threshold = steerer.decision_threshold
            for strength in args.strengths:
                images, scores = forced(pipe, empty, seeds, strength)
                control_images, control_scores = forced(pipe, control, [0] * 16, strength)
                found = np.array([bool(unprompted_concept(o, concept)) for o in read_objects(judge, images)])
                sim = clip.image_similarity(images, base).numpy()
                control_sim = clip.image_similarity(control_images, control_base).numpy()
                measured = (shows, scores, found, sim, control_scores, control_sim)
                calibrated = outcome(threshold, *measured)
                candidates = [outcome(t, *measured) for t in np.unique(np.concatenate([scores, [threshold]]))]
                best = max((c for c in candidates if c[1] >= TARGET), default=(float("nan"),) * 3)
                both = max((c for c in candidates if min(c[1:]) >= TARGET), default=(float("nan"),) * 3)
                row = {
                    "concept": concept, "first_seed": args.first_seed, "quantile": quantile, "strength": strength,
                    "threshold": threshold,
                    "unasked": int(shows.sum()), "removed_if_forced": float(1 - found[shows].mean()),
                    "clean_forced_sim": float(sim[~shows].mean()), "calibrated": calibrated, "best": best,
                    "best_with_control": both, "shows": shows.tolist(), "scores": scores.tolist(), "found": found.tolist(),
                    "sim": sim.tolist(), "control_scores": control_scores.tolist(), "control_sim": control_sim.tolist(),
                }  # fmt: skip
                rows.append(row)
                print(
                    f"| {concept} | {quantile:g} | {strength:g} | {row['removed_if_forced']:.2f} "
                    f"| {row['clean_forced_sim']:.3f} | {' / '.join(f'{v:.2f}' for v in calibrated)} "
                    f"| {' / '.join(f'{v:.2f}' for v in best)} | {both[0]:.2f} |",
                    flush=True,
                )
                (args.out / "decision_frontier.json").write_text(json.dumps(rows, indent=1))
            pipe.unload_steering()


if __name__ == "__main__":
    main()
