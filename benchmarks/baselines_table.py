"""The side-by-side tables of docs/baselines.md, from finished `dsas eval` runs.

    python benchmarks/baselines_table.py outputs/baselines-banana [outputs/baselines-red ...]
        [--similarity 0.98 0.95]

Per run and control similarity: every method at its best setting within it (steering: the
strongest λ or the best one, as in `operating.csv`'s rule 'best'; the baselines: their best
grid setting and their default), with 95% bootstrap intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

COLUMNS = {  # operating.csv column -> table heading
    "concept_drawn": "named",
    "unasked_drawn": "unasked",
    "unasked_similarity": "unasked sim.",
    "unasked_change": "unasked Δ",
    "spatial_removed": "removed",
    "spatial_kept": "kept",
    "outside_change": "outside Δ",
    "inside_change": "inside Δ",
}


def cell(line: dict[str, str], key: str, interval: bool = True) -> str:
    value = line.get(key, "")
    if value in ("", "None"):
        return "-"
    low, high = line.get(f"{key}_low", ""), line.get(f"{key}_high", "")
    digits = 1 if key.endswith("change") else 2
    text = f"{float(value):.{digits}f}"
    if interval and low not in ("", "nan") and high not in ("", "nan"):
        text += f" [{float(low):.{digits}f}, {float(high):.{digits}f}]"
    return text


def header(out: Path) -> str:
    run = json.loads((out / "run.json").read_text())
    rows = json.loads((out / "rows.json").read_text())
    unsteered = [r for r in rows if r["method"] == "unsteered"]
    concept = [r["concept_drawn"] for r in unsteered if r["group"] == "concept" and r.get("concept_drawn") is not None]
    empty = [r["concept_drawn"] for r in unsteered if r["group"] == "empty"]
    config = run["config"]
    return (
        f"**{config['model']}, {config['concept']}**: unsteered, the concept is drawn on "
        f"{sum(concept) / max(len(concept), 1):.2f} of the named images and on {int(sum(empty))} of "
        f"{len(empty)} empty-prompt images; {len(run.get('pair_units') or [])} two-object units; "
        f"{run['images']} images ({run['generated']} rendered by the last run)."
    )


def table(out: Path, similarity: float) -> str:
    with (out / "operating.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    chosen = [
        line
        for line in lines
        if (line["rule"] == "best" and float(line["similarity"]) == similarity) or line["rule"] == "default"
    ]
    heads = ["method", "setting", "control sim.", *COLUMNS.values()]
    text = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for line in chosen:
        name = line["method"] + (" (default)" if line["rule"] == "default" else "")
        setting = float(line["strength"])
        shown = f"{setting:g}" if setting else "none within (unsteered)"
        cells = [name, shown, cell(line, "control_similarity", interval=False)]
        cells += [cell(line, key) for key in COLUMNS]
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--similarity", nargs="+", type=float, default=[0.98, 0.95])
    args = parser.parse_args()
    for out in args.runs:
        print(header(out) + "\n")
        for similarity in args.similarity:
            print(f"Control similarity ≥ {similarity:g}:\n\n{table(out, similarity)}\n")


if __name__ == "__main__":
    main()
