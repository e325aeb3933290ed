"""Text gates that read the context, evaluated with the text protocol on ``shapes-lm``.

    python benchmarks/text_context_eval.py                                   # every candidate, tuning concepts
    python benchmarks/text_context_eval.py --candidates context --concepts star    # the held-out concept, last

The protocol (``docs/text.md``, "Gates that read the context") was fixed before any figure of it
was read: each candidate fit (``CANDIDATES``) is evaluated with ``dsas eval``'s text protocol
(4 sampled continuations after each of 32 concept prompts, the greedy one after each of 32
control prompts, 40 tokens, sweeps from λ 1/8) on each concept's *document* fitting sets, with
uniform steering, a prompt-level gate and banned words (``bad_words_ids``) in the same run.
Printed per concept: per method the best point (lowest concept rate) at control prefix match
≥ 0.95 and ≥ 0.98, with its interval, the share of grammatical continuations and their
perplexity under the unsteered model, and the hypervolume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dsas_diffusion.eval import load_config, run_evaluation
from dsas_diffusion.shapes import HELD_OUT_TEXT_CONCEPTS, TEXT_CONCEPTS, text_concept_files

#: what every candidate shares: the text evaluation's settings (20 gate components, Linear-AcT
#: without the pooled support, every layer kept), and the published gates unless it says otherwise
BASE_FIT: dict[str, Any] = {
    "n_components": 20,
    "support_quantiles": None,
    "gate_threshold": None,
    "gate_reads": "output",
    "gate_fit_on": "pooled",
    "gate_calibration": "none",
    "gate_floor": 0.0,
}
#: the fits compared, decided before the evaluation: the published gates (pooled, on each
#: token's own activation) on the same document sets, and gates on the context
CANDIDATES: dict[str, dict[str, Any]] = {
    "tokens": {},
    "context": {
        "gate_reads": "context",
        "gate_fit_on": "contrast",
        "gate_calibration": "control-positions",
        "gate_floor": 0.5,
    },
    "context-sigmoid": {"gate_reads": "context", "gate_fit_on": "contrast"},
    # added after the first round, on the tuning concepts: every gate reads the first layer's
    # context, calibrated on both ends or as a step opening above the control quantile
    "layer0-two-sided": {
        "gate_reads": "context",
        "context_layer": 0,
        "gate_fit_on": "contrast",
        "gate_calibration": "two-sided",
        "gate_floor": 0.5,
    },
    "layer0-step": {
        "gate_reads": "context",
        "context_layer": 0,
        "gate_fit_on": "contrast",
        "gate_calibration": "control-positions",
        "gate_activation": "step",
        "gate_floor": 0.0,
    },
}
METHODS = [
    "caa/none", "caa/dsas", "caa/prompt", "iti/none", "iti/dsas",
    "linear-act/none", "linear-act/dsas", "lineas/none", "lineas/dsas", "bad-words",
]  # fmt: skip
THRESHOLDS = (0.95, 0.98)


def config_fields(concept: str, candidate: str, out_root: Path) -> dict[str, Any]:
    files = text_concept_files(concept, documents=True)
    return {
        "model": "shapes-lm",
        "concept": concept,
        **{name: str(files[name]) for name in ("source", "target", "control")},
        "concept_prompts": str(files["eval_concept"]),
        "control_prompts": str(files["eval_control"]),
        "seeds": [0, 1, 2, 3],
        "strengths": "auto",
        "sweep": {"start": 0.125, "max": 64},
        "methods": METHODS,
        "fit": {**BASE_FIT, **CANDIDATES[candidate]},
        "similarity": "prefix_match",
        "max_new_tokens": 40,
        "batch_size": 160,
        "out": str(out_root / candidate / concept),
        "cache_dir": str(out_root / "cache"),
    }


def best_points(summary: list[dict[str, Any]], method: str, threshold: float) -> dict[str, Any]:
    """The method's setting with the lowest concept rate among those whose control prefix match
    is at least ``threshold`` (λ 0, the unsteered point, is always among them)."""
    lines = [
        line
        for line in summary
        if line["method"] in (method, "unsteered") or line["strength"] == 0
        if line["control_similarity"] >= threshold
    ]
    own = [line for line in lines if line["method"] == method] or lines
    return min(own, key=lambda line: (line["concept_drawn"], line["strength"]))


def table(result: Any) -> str:
    summary = result.summary
    unsteered = next(line for line in summary if line["strength"] == 0)
    lines = [
        f"unsteered: concept rate {unsteered['concept_drawn']:.3f}, grammatical {unsteered['concept_valid']:.2f}, "
        f"perplexity {unsteered['concept_perplexity']:.2f}",
        "",
        "| method | ≥ 0.95: λ, concept rate, grammatical, perplexity, prefix match | ≥ 0.98: λ, concept rate | hypervolume |",
        "|---|---|---|---|",
    ]
    methods = {line["method"]: line for line in result.methods}
    for method in METHODS:
        if not any(line["method"] == method for line in summary):
            continue
        loose, strict = (best_points(summary, method, threshold) for threshold in THRESHOLDS)
        volume = methods.get(method, {}).get("hypervolume", float("nan"))
        lines.append(
            f"| {method} | {loose['strength']:g}, {loose['concept_drawn']:.3f}, {loose['concept_valid']:.2f}, "
            f"{loose['concept_perplexity']:.2f}, {loose['control_similarity']:.3f} | {strict['strength']:g}, "
            f"{strict['concept_drawn']:.3f} | {volume:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument(
        "--concepts", nargs="+", default=list(TEXT_CONCEPTS), choices=[*TEXT_CONCEPTS, *HELD_OUT_TEXT_CONCEPTS]
    )
    parser.add_argument("--out-root", type=Path, default=Path("outputs/text-context"))
    parser.add_argument("--set", default="{}", help="config fields to override, as JSON (e.g. fewer seeds)")
    args = parser.parse_args(argv)
    for candidate in args.candidates:
        for concept in args.concepts:
            fields = {**config_fields(concept, candidate, args.out_root), **json.loads(args.set)}
            start = time.time()
            result = run_evaluation(load_config(None, fields), progress=False)
            print(
                f"\n### {concept}, {candidate}: {result.generated} continuations generated, {result.reused} from "
                f"the cache, {(time.time() - start) / 60:.1f} min\n\n{table(result)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
