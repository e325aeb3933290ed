"""What moves DSAS's trade-off on shapes-sd: one setting changed at a time.

    python benchmarks/eval_ablations.py [--map linear-act] [--out outputs/eval-banana-ablations]

Runs ``dsas eval``'s banana config (``benchmarks/eval_banana.yaml``) for one map with DSAS
gates under each variant below, sharing one image cache with the main evaluation
(``outputs/eval-images``), and prints the hypervolumes and the figures at λ = 3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsas_diffusion.eval import load_config, run_evaluation

HERE = Path(__file__).resolve().parent

# name -> (config fields changed, what it tests)
VARIANTS: dict[str, tuple[dict, str]] = {
    "defaults": ({}, "fit_steering's defaults, the conditional CFG half steered"),
    "cfg-both": ({"steering_cfg": "both"}, "steer both CFG halves"),
    "all-layers": ({"fit": {"gate_threshold": None}}, "keep layers whose gate accuracy is under 0.75"),
    "threshold-0.9": ({"fit": {"gate_threshold": 0.9}}, "keep only layers with gate accuracy >= 0.9"),
    "early-steps": ({"fit": {"collect_steps": [0, 1, 2]}}, "collect from the first 3 of 10 steps only"),
    "late-steps": ({"fit": {"collect_steps": [7, 8, 9]}}, "collect from the last 3 of 10 steps only"),
    "positions": ({"fit": {"gate_fit_on": "positions"}}, "fit gates on single positions, not pooled means"),
    "uncalibrated": ({"fit": {"gate_calibration": "none"}}, "gates as fitted (no control-position calibration)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", default="linear-act", choices=["caa", "iti", "linear-act", "lineas"])
    parser.add_argument("--config", default=str(HERE / "eval_banana.yaml"))
    parser.add_argument("--out", default="outputs/eval-banana-ablations")
    parser.add_argument("--cache-dir", default="outputs/eval-images")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    lines = []
    for name in args.variants:
        fields, meaning = VARIANTS[name]
        config = load_config(
            args.config,
            {
                "methods": [f"{args.map}/dsas"],
                "out": str(Path(args.out) / name),
                "cache_dir": args.cache_dir,
                "strengths": [0, 1, 2, 3, 4],  # one fixed grid: the variants are compared at λ = 3
                "pairs_prompts": [],
                **fields,
            },
        )
        result = run_evaluation(config, progress=False)
        score = result.methods[0]
        at3 = next(line for line in result.summary if line["strength"] == 3.0)
        lines.append(
            f"| {name} | {meaning} | {score['hypervolume_clip']:.3f} | {score.get('hypervolume_detector', float('nan')):.3f} "
            f"| {at3.get('concept_drawn', float('nan')):.2f} | {at3['concept_presence']:.3f} | {at3['control_similarity']:.3f} |"
        )
    print(f"\n{args.map} + DSAS on shapes-sd, banana (λ = 3 columns at strength 3):\n")
    print(
        "| variant | what changes | hypervolume (CLIP) | hypervolume (detector) | banana drawn λ=3 | "
        "CLIP presence λ=3 | control similarity λ=3 |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
