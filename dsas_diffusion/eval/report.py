"""Tables, Pareto plots and image grids from the rows of an evaluation.

Files written to the output directory:

- ``rows.csv`` / ``rows.json``: one row per (method, strength, prompt, seed) image;
- ``summary.csv`` / ``summary.md``: per method and strength, concept presence on the concept
  prompts, CLIP score and similarity to the unsteered image on the control prompts (and the
  Shapes detector's rates where it applies);
- ``methods.csv``: one number per method, the hypervolume of its trade-off curve (below);
- ``pareto_similarity.png``, ``pareto_clip_score.png`` (and ``pareto_detector.png`` on the
  Shapes world): one curve per method over the strengths, uniform dashed, DSAS solid;
- ``grids/<method>.png``: a few concept and control prompts across the strengths.

**Hypervolume.** Each strength gives a point (utility, removal) with utility the mean CLIP
similarity of control images to their unsteered images and removal ``1 - concept presence``
on the concept prompts. The hypervolume is the area of the union of the rectangles
``[0, utility] x [0, removal]`` over the method's points (strength 0 included): the part of
the unit square its trade-off curve dominates, with reference point (0, 0). It rewards
removing the concept while keeping control images; 1 would be perfect removal at no change.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..diffusion.visual import image_grid
from .config import EvalConfig
from .operating import empty_rows, hypervolume, mean_of, method_figures, spatial_rows

__all__ = ["hypervolume", "strength_grid", "summarise", "write_report"]

MAP_COLOURS = {"caa": "tab:blue", "iti": "tab:orange", "linear-act": "tab:green", "lineas": "tab:red"}


def settings(
    rows: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> Iterator[tuple[str, float, list[Mapping[str, Any]]]]:
    """``(method, strength, rows)`` per method and strength, strength 0 first with the shared
    unsteered rows."""
    unsteered = [r for r in rows if r["method"] == "unsteered"]
    for method in methods:
        strengths = sorted({r["strength"] for r in rows if r["method"] == method})
        for strength in [0.0, *strengths]:
            if strength == 0.0:
                yield method, strength, unsteered
            else:
                yield method, strength, [r for r in rows if r["method"] == method and r["strength"] == strength]


def summarise(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One line per method and strength (strength 0 is the shared unsteered images)."""
    spatial = [r for r in spatial_rows(rows) if not np.isnan(r["removed"])]  # the units that count
    unasked = empty_rows(rows)
    rows = [r for r in rows if r["group"] not in ("pairs", "empty")]
    lines = []
    for method, strength, chosen in settings(rows, methods):
        concept = [r for r in chosen if r["group"] == "concept"]
        control = [r for r in chosen if r["group"] == "control"]
        line = {
            "method": method,
            "strength": strength,
            "concept_presence": mean_of(concept, "concept_presence"),
            "concept_clip_score": mean_of(concept, "clip_score"),
            "control_clip_score": mean_of(control, "clip_score"),
            "control_similarity": mean_of(control, "clip_similarity"),
            "control_pixel_change": mean_of(control, "pixel_change"),
        }
        if any("concept_drawn" in r for r in chosen):
            line["concept_drawn"] = mean_of(concept, "concept_drawn")
            line["control_as_prompted"] = mean_of(control, "objects_as_prompted")
        pairs = [r for r in spatial if r["method"] == ("unsteered" if strength == 0.0 else method)]
        pairs = [r for r in pairs if strength == 0.0 or r["strength"] == strength]
        if pairs:
            line["spatial_removed"] = mean_of(pairs, "removed")
            line["spatial_kept"] = mean_of(pairs, "kept")
            for name in ("outside_change", "inside_change"):  # 0-255
                value = mean_of(pairs, name)
                line[name] = None if value is None else 255.0 * value
        empty = [r for r in unasked if r["method"] == ("unsteered" if strength == 0.0 else method)]
        empty = [r for r in empty if strength == 0.0 or r["strength"] == strength]
        if empty:
            line["unasked_drawn"] = mean_of(empty, "unasked_drawn")
            line["unasked_similarity"] = mean_of(empty, "unasked_similarity")
            change = mean_of(empty, "unasked_change")
            line["unasked_change"] = None if change is None else 255.0 * change
        lines.append(line)
    return lines


def method_scores(summary: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    scores = []
    for method in methods:
        lines = [line for line in summary if line["method"] == method]
        score = {
            "method": method,
            "hypervolume_clip": hypervolume([(p["control_similarity"], 1 - p["concept_presence"]) for p in lines]),
        }
        if "concept_drawn" in lines[0] and lines[0]["concept_drawn"] is not None:
            score["hypervolume_detector"] = hypervolume(
                [(p["control_similarity"], 1 - p["concept_drawn"]) for p in lines]
            )
        scores.append(score)
    return scores


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    fields = list(rows[0])
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_fmt(row.get(f)) for f in fields) + " |" for row in rows]
    return "\n".join(lines)


def _interval(value: Any) -> str:
    if value is None:
        return "-"
    estimate, low, high = value
    if np.isnan(low):
        return f"{estimate:.3f}"
    return f"{estimate:.3f} [{low:.3f}, {high:.3f}]"


def _flat(line: Mapping[str, Any]) -> dict[str, Any]:
    """An operating-point line with each interval as three columns."""
    flat: dict[str, Any] = {}
    for key, value in line.items():
        if isinstance(value, tuple):
            flat[key], flat[f"{key}_low"], flat[f"{key}_high"] = (round(v, 5) for v in value)
        else:
            flat[key] = value
    return flat


def operating_table(lines: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per method and threshold, each figure with its interval."""
    fields = [
        "method",
        "similarity",
        "rule",
        "strength",
        "control_similarity",
        "concept_drawn",
        "concept_presence",
        "unasked_drawn",
        "unasked_similarity",
        "unasked_change",
        "spatial_removed",
        "spatial_kept",
        "outside_change",
        "inside_change",
    ]
    fields = [f for f in fields if any(line.get(f) is not None for line in lines)]
    out = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for line in lines:
        cells = []
        for field in fields:
            value = line.get(field)
            if field == "strength":
                end = line.get("rule", "strongest") == "strongest" and not line["reached"]
                cells.append(f"{value:.2f}" + (" (end of sweep)" if end else ""))
            elif isinstance(value, tuple) or value is None:
                cells.append(_interval(value))
            else:
                cells.append(_fmt(value))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def target_table(lines: Sequence[Mapping[str, Any]], unsteered: float | None, threshold: float) -> str:
    """Markdown: per steering map with both a uniform and a DSAS row, the issue's targets at
    control similarity ``threshold`` (best points within it): DSAS's presence against half
    the unsteered presence and against uniform steering's, and DSAS's spatial test."""
    chosen = {
        line["method"]: line for line in lines if line["similarity"] == threshold and line.get("rule", "best") == "best"
    }
    out = [
        "| map | unsteered | DSAS | uniform | DSAS <= half | DSAS - uniform | spatial removed | spatial kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(method.split("/")[0] for method in chosen):
        dsas, uniform = chosen.get(f"{name}/dsas"), chosen.get(f"{name}/none")
        if dsas is None or uniform is None or unsteered is None:
            continue
        key = "concept_drawn" if dsas.get("concept_drawn") is not None else "concept_presence"
        d, u = dsas[key][0], uniform[key][0]
        removed, kept = dsas.get("spatial_removed"), dsas.get("spatial_kept")
        ratio = f" ({d / unsteered:.2f})" if unsteered > 0 else ""
        out.append(
            f"| {name} | {unsteered:.3f} | {_interval(dsas[key])} | {_interval(uniform[key])} | "
            f"{'yes' if d <= unsteered / 2 else 'no'}{ratio} | {d - u:+.3f} | "
            f"{_interval(removed)} | {_interval(kept)} |"
        )
    return "\n".join(out)


def pareto_plot(
    summary: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    x: str,
    y: str,
    path: Path,
    title: str,
    labels: Mapping[str, str] | None = None,
) -> None:
    """One curve per method over its strengths, uniform dashed and DSAS solid; ``labels``
    names the axes' measures where the defaults (the image measures) do not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "control_similarity": "CLIP similarity to unsteered (control prompts)",
        "control_clip_score": "CLIP score (control prompts)",
        "concept_presence": "concept presence, CLIP zero-shot (concept prompts)",
        "concept_drawn": "concept drawn, Shapes detector (concept prompts)",
        **(labels or {}),
    }
    figure, axis = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for method in methods:
        lines = [line for line in summary if line["method"] == method and line[x] is not None and line[y] is not None]
        map_name, _, gating = method.rpartition("/")
        if not map_name:  # a baseline: its grid of settings as points, no curve
            marker = "^" if method == "negative-prompt" else "v"
            axis.plot(
                [line[x] for line in lines],
                [line[y] for line in lines],
                marker,
                markersize=6,
                color="tab:gray" if method == "negative-prompt" else "black",
                label=method,
            )
            for line in lines[1:]:
                axis.annotate(f"{line['strength']:g}", (line[x], line[y]), fontsize=6, alpha=0.7)
            continue
        style = {"none": "--", "e2e": ":", "prompt": "-."}.get(gating, "-")
        axis.plot(
            [line[x] for line in lines],
            [line[y] for line in lines],
            style,
            marker={"none": "s", "prompt": "x"}.get(gating, "o"),
            markersize=4,
            color=MAP_COLOURS.get(map_name, "black") if gating != "e2e" else "tab:purple",
            label=method,
        )
        for line in lines:
            if line["strength"] == lines[-1]["strength"]:
                axis.annotate(f"λ={line['strength']:g}", (line[x], line[y]), fontsize=7, alpha=0.7)
    axis.set_xlabel(labels.get(x, x) + "  →  better")
    axis.set_ylabel(labels.get(y, y) + "  ↓  better")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def strength_grid(
    rows: Sequence[Mapping[str, Any]], method: str, out: Path, prompts_per_group: int, scale: int = 2
) -> Image.Image:
    """Rows: the first prompts of each group (first seed); columns: strengths (0 = unsteered)."""
    chosen = [r for r in rows if r["method"] in (method, "unsteered")]
    seed = min(r["seed"] for r in chosen)
    strengths = sorted({r["strength"] for r in chosen})
    prompts: list[str] = []
    for group in ("concept", "control"):
        group_prompts = list(dict.fromkeys(r["prompt"] for r in chosen if r["group"] == group))
        prompts += group_prompts[:prompts_per_group]
    cells = {(r["prompt"], r["strength"]): r["image"] for r in chosen if r["seed"] == seed}
    images = [[Image.open(out / cells[(p, s)]) if (p, s) in cells else None for s in strengths] for p in prompts]
    return image_grid(
        images,
        scale=scale,
        title=f"{method} at each strength (0: unsteered)",  # PIL's default font has no λ
        column_titles=[f"strength {s:g}" for s in strengths],
        row_titles=prompts,
        gap=4,
    )


def _unsteered_presence(summary: Sequence[Mapping[str, Any]]) -> float | None:
    zero = [line for line in summary if line["strength"] == 0.0]
    if not zero:
        return None
    value = zero[0].get("concept_drawn")
    return zero[0].get("concept_presence") if value is None else value


def write_report(
    config: EvalConfig,
    methods: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    run: Mapping[str, Any] | None = None,
    stopped: Mapping[str, str] | None = None,
    defaults: Mapping[str, float] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write every table, plot and grid; return ``(summary, method scores)``.

    ``stopped``: why each method's adaptive sweep stopped (``methods.csv`` and the text);
    ``defaults``: each baseline's default setting (its ``default`` operating line)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "rows.csv", rows)
    (out / "rows.json").write_text(json.dumps(list(rows), indent=1))
    summary = summarise(rows, methods)
    scores = method_scores(summary, methods)
    operating = [
        line
        for method in methods
        for line in method_figures(
            rows, method, config.thresholds, replicates=config.bootstrap, default=(defaults or {}).get(method)
        )
    ]
    for score in scores:
        figures = next(line for line in operating if line["method"] == score["method"])
        score["hypervolume_interval"] = [round(v, 4) for v in figures["hypervolume"][1:]]
        if stopped:
            score["sweep_stopped"] = stopped.get(score["method"], "")
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "methods.csv", scores)
    _write_csv(out / "operating.csv", [_flat(line) for line in operating])
    pairs = len(config.pairs_prompts)
    text = (
        f"{config.model}, concept {config.concept!r}: {len(config.concept_prompts)} concept / "
        f"{len(config.control_prompts)} control / {pairs} pair prompts x {len(config.seeds)} seed(s)\n\n"
        + markdown_table(summary)
        + "\n\nOperating points: per threshold, each method at the strongest setting whose control "
        "similarity stays at least the threshold (rule 'strongest', interpolated) and at its best setting "
        "within it (rule 'best', the least concept presence; for a baseline, the best of its grid, and its "
        "default setting as rule 'default'); unasked: the empty prompt's images (drawn among the seeds whose "
        "unsteered image shows the concept; similarity and change, 0-255, of the others); outside / inside: "
        "pixel change (0-255) outside / inside the concept object's mask on the two-object images; 95% "
        f"bootstrap intervals over prompts x seeds, {config.bootstrap} replicates:\n\n"
        + operating_table(operating)
        + f"\n\nTargets at control similarity {max(config.thresholds):g} (best points; presence by "
        "the Shapes detector where it applies, else CLIP):\n\n"
        + target_table(operating, _unsteered_presence(summary), max(config.thresholds))
        + "\n\nHypervolume (area dominated in the (control similarity, 1 - concept presence) plane, "
        "reference (0, 0); higher is better):\n\n" + markdown_table(scores) + "\n"
    )
    (out / "summary.md").write_text(text)
    if run is not None:
        (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    title = f"{config.model}: removing {config.concept!r}"
    pareto_plot(summary, methods, "control_similarity", "concept_presence", out / "pareto_similarity.png", title)
    pareto_plot(summary, methods, "control_clip_score", "concept_presence", out / "pareto_clip_score.png", title)
    if summary and summary[0].get("concept_drawn") is not None:
        pareto_plot(summary, methods, "control_similarity", "concept_drawn", out / "pareto_detector.png", title)
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    for method in methods:
        strength_grid(rows, method, out, config.grid_prompts).save(grids / f"{method.replace('/', '_')}.png")
    print(text)
    return summary, scores
