"""Tables, Pareto plots and sample continuations from the rows of a language-model evaluation.

Files written to the output directory (the image report's, with continuations for images):

- ``rows.csv`` / ``rows.json``: one row per (method, strength, prompt, seed) continuation;
- ``summary.csv`` / ``summary.md``: per method and strength, the concept rate on the concept
  prompts (grammar and word list), the control measures, validity and perplexity; the
  operating points with their intervals; the targets; the hypervolumes;
- ``operating.csv``, ``methods.csv``, ``run.json``;
- ``pareto.png``: concept rate against the control measure, one curve per method;
- ``samples.md``: the first prompts of each group, continued at every strength.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import EvalConfig
from .operating import hypervolume, mean_of, method_figures
from .report import (
    _flat,
    _unsteered_presence,
    _write_csv,
    markdown_table,
    operating_table,
    pareto_plot,
    settings,
    target_table,
)

__all__ = ["summarise_text", "write_text_report"]

#: summary column -> (group, row key)
COLUMNS = {
    "concept_drawn": ("concept", "concept_drawn"),
    "concept_presence": ("concept", "concept_presence"),
    "classifier_score": ("concept", "classifier_score"),
    "concept_valid": ("concept", "valid"),
    "concept_perplexity": ("concept", "perplexity"),
    "control_exact_match": ("control", "exact_match"),
    "control_prefix_match": ("control", "prefix_match"),
    "control_loglik_change": ("control", "loglik_change"),
    "control_valid": ("control", "valid"),
    "control_concept": ("control", "concept_drawn"),
}


def summarise_text(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], similarity: str) -> list[dict[str, Any]]:
    """One line per method and strength (strength 0: the shared unsteered continuations);
    ``control_similarity`` is the mean of the rows' ``similarity`` measure."""
    lines = []
    for method, strength, chosen in settings(rows, methods):
        groups = {g: [r for r in chosen if r["group"] == g] for g in ("concept", "control")}
        line: dict[str, Any] = {"method": method, "strength": strength}
        line["control_similarity"] = mean_of(groups["control"], similarity)
        for column, (group, key) in COLUMNS.items():
            if any(r.get(key) is not None for r in groups[group]):
                line[column] = mean_of(groups[group], key)
        lines.append(line)
    return lines


def _samples(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], per_group: int) -> str:
    """Markdown: the first prompts of each group (first seed), continued at each strength."""
    out = []
    seed = min(r["seed"] for r in rows)
    for method in methods:
        chosen = [r for r in rows if r["method"] in (method, "unsteered") and r["seed"] == seed]
        strengths = sorted({r["strength"] for r in chosen})
        out.append(f"## {method}\n")
        for group in ("concept", "control"):
            prompts = list(dict.fromkeys(r["prompt"] for r in chosen if r["group"] == group))[:per_group]
            for prompt in prompts:
                out.append(f"**{group}: {prompt}**\n")
                for strength in strengths:
                    text = next(
                        r["continuation"] for r in chosen if r["prompt"] == prompt and r["strength"] == strength
                    )
                    out.append(f"- λ {strength:g}: {text!r}")
                out.append("")
    return "\n".join(out)


def write_text_report(
    config: EvalConfig,
    methods: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    run: Mapping[str, Any] | None = None,
    stopped: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write every table, the Pareto plot and the samples; return ``(summary, method scores)``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "rows.csv", rows)
    (out / "rows.json").write_text(json.dumps(list(rows), indent=1))
    summary = summarise_text(rows, methods, config.similarity)
    grammar = any(line.get("concept_drawn") is not None for line in summary)
    presence = "concept_drawn" if grammar else "concept_presence"
    operating = [
        line
        for method in methods
        for line in method_figures(
            rows, method, config.thresholds, replicates=config.bootstrap, similarity_key=config.similarity
        )
    ]
    scores = []
    for method in methods:
        lines = [line for line in summary if line["method"] == method]
        figures = next(line for line in operating if line["method"] == method)["hypervolume"]
        score = {
            "method": method,
            "hypervolume": hypervolume([(p["control_similarity"], 1 - p[presence]) for p in lines]),
            "hypervolume_interval": [round(v, 4) for v in figures[1:]],
        }
        if stopped:
            score["sweep_stopped"] = stopped.get(method, "")
        scores.append(score)
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "methods.csv", scores)
    _write_csv(out / "operating.csv", [_flat(line) for line in operating])
    measured = "the Shapes grammar" if grammar else "the word list"
    text = (
        f"{config.model}, concept {config.concept!r}: {len(config.concept_prompts)} concept prompts x "
        f"{len(config.seeds)} seed(s) (sampled), {len(config.control_prompts)} control prompts (greedy); "
        f"control measure: {config.similarity}\n\n"
        + markdown_table(summary)
        + "\n\nOperating points: per threshold of the control measure, each method at the strongest setting that "
        "stays at least the threshold (rule 'strongest', interpolated) and at its best setting within it (rule "
        "'best', the least concept rate); 95% bootstrap intervals over prompts x seeds, "
        f"{config.bootstrap} replicates (concept_drawn: the grammar; concept_presence: the word list):\n\n"
        + operating_table(operating)
        + f"\n\nTargets at {config.similarity} {max(config.thresholds):g} (best points; concept rate by {measured}):\n\n"
        + target_table(operating, _unsteered_presence(summary), max(config.thresholds))
        + f"\n\nHypervolume ((control measure, 1 - concept rate by {measured}), reference (0, 0)):\n\n"
        + markdown_table(scores)
        + "\n"
    )
    (out / "summary.md").write_text(text)
    (out / "samples.md").write_text(_samples(rows, methods, config.grid_prompts))
    if run is not None:
        (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    labels = {
        "control_similarity": f"{config.similarity.replace('_', ' ')} of greedy continuations (control prompts)",
        "concept_drawn": "concept rate, grammar (sampled continuations)",
        "concept_presence": "concept rate, word list (sampled continuations)",
    }
    title = f"{config.model}: removing {config.concept!r}"
    pareto_plot(summary, methods, "control_similarity", presence, out / "pareto.png", title, labels=labels)
    print(text)
    return summary, scores
